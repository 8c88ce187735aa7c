# cython: auto_pickle = False
"""Block allocator and KV-cache manager over the Cython PageTable.

No Python object exists per block or per sequence: the allocator is two int32 arrays
(reference counts and a free stack) and the manager keeps each sequence's token count
in an int32 array indexed by the PageTable's internal row, so a decode step for
thousands of sequences is a few passes over contiguous arrays.

Reuse order
-----------
Free blocks form a LIFO stack: the most recently freed block is handed out first, and
a fresh allocator hands out 0, 1, 2, ... .  LIFO keeps the set of block ids in use
compact (lightly loaded engines touch a small, low region of the KV pool, which is
kinder to the GPU's TLB and L2 than ids spread over the whole pool), its push and pop
are O(1) with no per-block objects, and it is deterministic, which the reference model
and the simulation's side-by-side check rely on.

Copy-on-write
-------------
``fork`` shares every block of the parent (reference counts rise).  Appending into a
sequence whose last block is partly filled and shared (reference count > 1) first moves
that sequence onto a fresh block and reports the copy (``copy_src`` -> ``copy_dst``)
that the engine must perform before writing.  Full shared blocks are never copied: new
tokens go into new blocks.  Within one call sequences are served in input order, so
of two forks appending together the first copies and the second (then the sole owner)
writes in place.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._core cimport PageTable, _wait_while_set
from pagetable._accept cimport int_vector

import operator

import numpy as np

from pagetable import _state
from pagetable._convert import INT64_MAX, as_index, as_int_array, check_range

_CONCURRENT_WRITE = (
    "another thread is changing this KVCacheManager (or its table or allocator) right "
    "now; changes from several threads must take turns (hold a lock around them)")
_READ_DURING_CHANGE = (
    "a change to this KVCacheManager has been in progress for over half a second (is "
    "the read running inside it?); a read cannot see a change half-done")
_READ_KEPT_CHANGING = (
    "this KVCacheManager kept changing in another thread while it was being read; "
    "hold a lock around changes and reads")
_OWNED_ALLOCATOR = (
    "this BlockAllocator belongs to a KVCacheManager: allocate and free through the "
    "manager (or work on a copy)")
_TAMPERED = (
    "the manager's table or allocator was changed from outside the manager; "
    "its state can no longer be trusted")

cnp.import_array()

BLOCK_ID_LIMIT = 2**31 - 1   # largest int32: block ids and token counts are int32

# Error codes reported by the nogil planning kernel; the caller raises with the GIL.
cdef enum:
    PLAN_OK = 0
    PLAN_UNKNOWN = 1
    PLAN_DUPLICATE = 2
    PLAN_NEGATIVE = 3
    # A read that overlapped a change from another thread is run again, up to this
    # many times in all, before it gives up with RuntimeError.
    READ_ATTEMPTS = 4


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a call needs; the call changed nothing.

    A ``RuntimeError`` rather than a ``MemoryError``: running out of KV blocks is the
    normal back-pressure signal an engine's scheduler handles (by preempting), not a
    failure of host memory, and catching ``MemoryError`` must not swallow it.

    Attributes
    ----------
    requested : int
        Blocks the call needed.
    available : int
        Blocks that were free.
    """

    def __init__(self, requested, available):
        super().__init__(f"need {requested} free blocks, only {available} available")
        self.requested = requested
        self.available = available

    def __reduce__(self):
        return (type(self), (self.requested, self.available))


@cython.final
cdef class AppendResult:
    """What an engine needs after a growth call.

    Attributes
    ----------
    slots : numpy.ndarray of int64
        The cache slot (``block_id * block_size + offset``) of every new token,
        sequence by sequence in input order: the K/V write kernel's slot mapping.
    copy_src, copy_dst : numpy.ndarray of int32
        Copy-on-write block copies to perform before writing, pairwise.
    """

    cdef readonly object slots
    cdef readonly object copy_src
    cdef readonly object copy_dst

    def __init__(self, slots, copy_src, copy_dst):
        slots = as_int_array(slots, "slots")
        copy_src = as_int_array(copy_src, "copy_src", np.dtype(np.int32))
        copy_dst = as_int_array(copy_dst, "copy_dst", np.dtype(np.int32))
        if copy_src.shape[0] != copy_dst.shape[0]:
            raise ValueError(
                f"copy_src and copy_dst must have the same length, "
                f"got {copy_src.shape[0]} and {copy_dst.shape[0]}")
        self.slots = slots
        self.copy_src = copy_src
        self.copy_dst = copy_dst

    def __repr__(self):
        return (f"AppendResult(slots={self.slots!r}, copy_src={self.copy_src!r}, "
                f"copy_dst={self.copy_dst!r})")

    def __eq__(self, other):
        if not isinstance(other, AppendResult):
            return NotImplemented
        return (np.array_equal(self.slots, other.slots)
                and np.array_equal(self.copy_src, other.copy_src)
                and np.array_equal(self.copy_dst, other.copy_dst))

    __hash__ = None

    def __reduce__(self):
        # Through __init__, which checks what it is given.
        return (AppendResult, (self.slots, self.copy_src, self.copy_dst))


cdef AppendResult _new_result():
    """An empty AppendResult, made before a change so that making it cannot fail after."""
    cdef AppendResult result = AppendResult.__new__(AppendResult)
    result.slots = _EMPTY_INT64
    result.copy_src = _EMPTY_INT32
    result.copy_dst = _EMPTY_INT32
    return result


cdef object _EMPTY_INT32 = np.empty(0, dtype=np.int32)
_EMPTY_INT32.flags.writeable = False
cdef object _EMPTY_INT64 = np.empty(0, dtype=np.int64)
_EMPTY_INT64.flags.writeable = False


@cython.final
cdef class BlockAllocator:
    """Reference-counted pool of physical KV-cache blocks ``0 .. num_blocks - 1``.

    Parameters
    ----------
    num_blocks : int
        Size of the pool, 1 .. 2**31 - 1.

    Notes
    -----
    Free blocks are a LIFO stack: the most recently freed block is handed out first
    (a fresh pool hands out 0, 1, 2, ...).  See the module docstring for why.
    """

    cdef:
        int32_t _num_blocks
        int32_t _num_free
        object _refcount_arr      # int32 [num_blocks]
        object _free_stack_arr    # int32 [num_blocks]; entries 0 .. _num_free - 1 are free
        object _pending_arr       # int32 [num_blocks]; scratch for planning, all zero between calls
        int32_t[::1] _refcount
        int32_t[::1] _free_stack
        int32_t[::1] _pending
        int32_t _writing          # set while a KVCacheManager change is in progress
        int32_t _owned            # set while a KVCacheManager owns the pool

    def __init__(self, num_blocks):
        # Set-up happens in __cinit__, which runs even when __init__ is skipped,
        # so that no instance ever has unset arrays.
        pass

    def __cinit__(self, num_blocks, *args, **kwargs):
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, BLOCK_ID_LIMIT, "num_blocks")
        self._num_blocks = num_blocks
        self._refcount_arr = np.zeros(num_blocks, dtype=np.int32)
        # Top of the stack is the last entry, so block 0 is handed out first.
        self._free_stack_arr = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)
        self._pending_arr = np.zeros(num_blocks, dtype=np.int32)
        self._refcount = self._refcount_arr
        self._free_stack = self._free_stack_arr
        self._pending = self._pending_arr
        self._num_free = num_blocks
        self._writing = 0
        self._owned = 0

    cdef int _check_writable(self) except -1:
        if self._owned:
            raise RuntimeError(_OWNED_ALLOCATOR)
        if self._writing:
            raise RuntimeError(_CONCURRENT_WRITE)
        return 0

    def _set_owned(self, owned):
        """Private: mark the pool owned by a manager, or not (tests corrupt it this way)."""
        self._owned = 1 if owned else 0

    # -- state ------------------------------------------------------------------------
    def _state(self):
        """The allocator's state dict (plain arrays; see ``pagetable._state``)."""
        refcount = _empty(self._num_blocks, cnp.NPY_INT32)
        free_stack = _empty(self._num_blocks, cnp.NPY_INT32)
        cdef Py_ssize_t num_free = self._capture(refcount, free_stack)
        state = _state.header("BlockAllocator")
        state["num_blocks"] = np.array(self._num_blocks, dtype=np.int64)
        state["refcount"] = refcount
        state["free_stack"] = free_stack[:num_free]
        return state

    cdef Py_ssize_t _capture(self, object refcount, object free_stack) noexcept:
        """Copy the counts and the stack into arrays of ``num_blocks`` int32; return its height.

        One C section with nothing in it that could let another thread run: the
        counts, the stack and its height are all of one moment.
        """
        cdef Py_ssize_t num_free = self._num_free
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>refcount), &self._refcount[0],
               <size_t>self._num_blocks * sizeof(int32_t))
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>free_stack), &self._free_stack[0],
               <size_t>num_free * sizeof(int32_t))
        return num_free

    @staticmethod
    def _from_state(state):
        """An allocator built from a state dict; ``CorruptStateError`` if it is not valid."""
        _state.check_kind(state, "BlockAllocator")
        num_blocks, refcount, free_stack = _state.allocator_state(state)
        return _allocator_from_arrays(num_blocks, refcount, free_stack)

    def save(self, path):
        """Save the pool (reference counts and free stack) to a file; see :meth:`load`."""
        _state.write(path, self._state())

    @classmethod
    def load(cls, path):
        """Load a pool saved by :meth:`save`; ``CorruptStateError`` for a bad file."""
        return BlockAllocator._from_state(_state.read(path))

    def copy(self):
        """An independent copy (same counts, same free order), never owned by a manager."""
        return BlockAllocator._from_state(self._state())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_restore_allocator, (self._state(),))

    def __eq__(self, other):
        if not isinstance(other, BlockAllocator):
            return NotImplemented
        return (self.num_blocks == other.num_blocks and self.num_free == other.num_free
                and np.array_equal(self._refcounts(), other._refcounts())
                and np.array_equal(self._free_blocks(), other._free_blocks()))

    __hash__ = None

    @property
    def num_blocks(self):
        """Size of the pool."""
        return self._num_blocks

    @property
    def num_free(self):
        """Blocks currently free."""
        return self._num_free

    def __repr__(self):
        return f"BlockAllocator(num_blocks={self._num_blocks}, num_free={self._num_free})"

    # -- C level --------------------------------------------------------------------
    cdef void _take(self, int64_t n, block_id_t* out) noexcept nogil:
        """Pop ``n`` blocks (the caller checked ``n <= _num_free``) with refcount 1."""
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            self._num_free -= 1
            block = self._free_stack[self._num_free]
            self._refcount[block] = 1
            out[i] = block

    cdef void _release(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """Drop one reference from each block (the caller checked they are held)."""
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            block = blocks[i]
            self._refcount[block] -= 1
            # The bound holds whenever counts match the table; it keeps a pool that
            # was tampered with from writing past its stack.
            if self._refcount[block] == 0 and self._num_free < self._num_blocks:
                self._free_stack[self._num_free] = block
                self._num_free += 1

    cdef void _retain(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        cdef int64_t i
        for i in range(n):
            self._refcount[blocks[i]] += 1

    cdef int64_t _check_ids(self, const int64_t[::1] ids) noexcept nogil:
        """Index of the first id outside the pool, or -1."""
        cdef Py_ssize_t i
        for i in range(ids.shape[0]):
            if ids[i] < 0 or ids[i] >= self._num_blocks:
                return i
        return -1

    cdef object _block_ids(self, block_ids):
        ids = int_vector(block_ids, "block_ids", cnp.NPY_INT64)
        cdef int64_t bad = self._check_ids(ids)
        if bad >= 0:
            raise ValueError(
                f"block_ids[{bad}] = {ids[bad]} is out of range 0..{self._num_blocks - 1}")
        return ids

    # -- Python API -----------------------------------------------------------------
    def allocate(self, n):
        """Take ``n`` distinct free blocks, each with reference count 1.

        Parameters
        ----------
        n : int
            Number of blocks, >= 0.

        Returns
        -------
        numpy.ndarray of int32
            The block ids, in the order they were handed out.

        Raises
        ------
        OutOfBlocksError
            Fewer than ``n`` blocks are free; nothing is taken.
        """
        n = as_index(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._check_writable()
        if n > self._num_free:
            raise OutOfBlocksError(n, self._num_free)
        out = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] view = out
        # Making ``out`` may have let another thread run; check again with nothing
        # in between that could.
        self._check_writable()
        if n > self._num_free:
            raise OutOfBlocksError(n, self._num_free)
        if n:
            self._take(n, &view[0])
        return out

    def free(self, block_ids):
        """Drop one reference from each block; a block whose count reaches 0 is free.

        A block listed twice loses two references.  The whole call is checked first:
        an id out of range, or one with fewer references than it is listed, raises
        ``ValueError`` and changes nothing.
        """
        cdef const int64_t[::1] ids = self._block_ids(block_ids)
        cdef Py_ssize_t i, j, n = ids.shape[0]
        cdef int32_t saved_free = self._num_free
        cdef block_id_t block
        cdef int64_t bad = -1
        self._check_writable()
        # The GIL stays held: two threads' frees must not interleave.
        for i in range(n):
            block = <block_id_t>ids[i]
            if self._refcount[block] == 0:
                bad = i
                break
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                self._free_stack[self._num_free] = block
                self._num_free += 1
        if bad >= 0:
            # Undo: restore the counts and forget the blocks pushed so far.
            for j in range(bad):
                self._refcount[<block_id_t>ids[j]] += 1
            self._num_free = saved_free
            raise ValueError(f"block_ids[{bad}] = {ids[bad]} is already free")

    def incref(self, block_ids):
        """Add one reference to each (allocated) block; a block listed twice gains two.

        Raises ``ValueError`` and changes nothing if an id is out of range or free.
        """
        cdef const int64_t[::1] ids = self._block_ids(block_ids)
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef int64_t bad = -1
        self._check_writable()
        # The GIL stays held: two threads' changes must not interleave.
        for i in range(n):
            if self._refcount[<block_id_t>ids[i]] == 0:
                bad = i
                break
        if bad < 0:
            for i in range(n):
                self._refcount[<block_id_t>ids[i]] += 1
        if bad >= 0:
            raise ValueError(
                f"block_ids[{bad}] = {ids[bad]} is free; only allocated blocks can be shared")

    def refcount(self, block_ids):
        """Reference count of each block, int32."""
        cdef const int64_t[::1] ids = self._block_ids(block_ids)
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef int64_t block
        out = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] view = out
        # ``ids`` may be the caller's array, which another thread could change while
        # ``out`` was made: each id is checked again where it is used.
        for i in range(n):
            block = ids[i]
            if block < 0 or block >= self._num_blocks:
                raise ValueError(f"block_ids[{i}] = {block} is out of range 0..{self._num_blocks - 1}")
            view[i] = self._refcount[block]
        return out

    def _free_blocks(self):
        """The free stack, bottom to top (the next block handed out is the last)."""
        return self._free_stack_arr[:self._num_free].copy()

    def _refcounts(self):
        """All reference counts (a copy)."""
        return self._refcount_arr.copy()


cdef BlockAllocator _allocator_from_arrays(int64_t num_blocks, object refcount, object free_stack):
    """A pool with validated counts and stack (from ``_state.allocator_state``)."""
    cdef BlockAllocator allocator = BlockAllocator(num_blocks)
    cdef Py_ssize_t num_free = cnp.PyArray_DIM(<cnp.ndarray>free_stack, 0)
    memcpy(&allocator._refcount[0], cnp.PyArray_DATA(<cnp.ndarray>refcount),
           <size_t>num_blocks * sizeof(int32_t))
    if num_free:
        memcpy(&allocator._free_stack[0], cnp.PyArray_DATA(<cnp.ndarray>free_stack),
               <size_t>num_free * sizeof(int32_t))
    allocator._num_free = <int32_t>num_free
    return allocator


def _restore_allocator(state):
    """Rebuild an allocator from its state dict (pickle support)."""
    return BlockAllocator._from_state(state)


def _restore_manager(state):
    """Rebuild a manager from its state dict (pickle support)."""
    return KVCacheManager._from_state(state)


cdef inline int64_t _blocks_for(int64_t tokens, int64_t block_size) noexcept nogil:
    return (tokens + block_size - 1) // block_size


cdef inline int64_t _with_room_to_grow(int64_t blocks) noexcept nogil:
    """Row capacity to reserve for a new sequence of ``blocks`` blocks.

    A sequence only grows, so a row reserved at its exact size moves to the pool's tail
    at its first block boundary; with a batch of prefills that is a burst of moves and
    a compaction a few decode steps later.  A quarter more plus 4 blocks (the
    PageTable's own growth step) lets a sequence decode 64+ tokens before its first
    move, for about one int32 per 4 blocks.
    """
    return blocks + (blocks >> 2) + 4


cdef inline int32_t _log2_or_minus_one(int64_t value) noexcept nogil:
    """log2(value) for a power of two, else -1."""
    cdef int32_t shift = 0
    if value & (value - 1):
        return -1
    while (<int64_t>1 << shift) < value:
        shift += 1
    return shift


cdef inline object _empty(Py_ssize_t n, int typenum):
    """A new 1-D array (the C call: no Python-level ``np.empty`` on the hot paths)."""
    cdef cnp.npy_intp size = n
    return cnp.PyArray_EMPTY(1, &size, typenum, 0)


cdef inline object _int64_vector(values, str name):
    """``values`` as the int64 vector the loops read (see ``_accept.pxd``)."""
    return int_vector(values, name, cnp.NPY_INT64)


cdef int64_t _as_seq_id(value, str name) except -1:
    if type(value) is int and 0 <= value <= INT64_MAX:     # the common case, no calls
        return value
    return check_range(as_index(value, name), 0, INT64_MAX, name)


cdef struct _StepPlan:
    # One step's checked arguments and plan (see KVCacheManager._plan_step).
    Py_ssize_t n                 # sequences
    const row_t* rows            # their rows
    const int64_t* counts        # new tokens per sequence, read at i * stride
    Py_ssize_t stride            # 1, or 0 when one count (``scalar``) serves all
    int64_t scalar
    int64_t need                 # fresh blocks the step takes
    int64_t num_copies           # copy-on-write copies it makes
    int64_t num_slots            # slots it returns


@cython.final
cdef class KVCacheManager:
    """Paged KV-cache bookkeeping: a PageTable, a BlockAllocator and token counts.

    Parameters
    ----------
    num_blocks : int
        KV-cache blocks in the pool; ``num_blocks * block_size`` must be below 2**31
        so that every token count fits in int32.
    block_size : int, default 16
        Tokens per block.

    Notes
    -----
    Examples
    --------
    >>> from pagetable import KVCacheManager
    >>> kv = KVCacheManager(num_blocks=8, block_size=4)
    >>> kv.add_sequence(0, 6).slots                 # a 6-token prompt: blocks 0 and 1
    array([0, 1, 2, 3, 4, 5])
    >>> kv.fork(0, 1)                               # a second sample shares both blocks
    >>> step = kv.append_tokens([0, 1])             # one decode step for both
    >>> step.slots, step.copy_src, step.copy_dst    # 0 copies the shared partial block
    (array([10,  6]), array([1], dtype=int32), array([2], dtype=int32))
    >>> kv.block_table([0, 1])
    array([[0, 2],
           [0, 1]], dtype=int32)
    >>> kv.flashinfer_layout([0, 1])
    (array([0, 2, 4], dtype=int32), array([0, 2, 0, 1], dtype=int32), array([3, 3], dtype=int32))
    >>> kv.free_sequence([0, 1]); kv.num_free_blocks
    8

    ``page_table`` and ``allocator`` are the manager's own: read them freely, but their
    changing methods raise ``RuntimeError`` (a ``copy()`` of either is an ordinary,
    writable object).  Like a dict, a manager is not meant to be changed from several
    threads at once: a change that starts while another thread's change is in
    progress (one may let other threads run while its table allocates memory) raises
    ``RuntimeError`` and changes nothing.  Reads from other threads answer from one
    state: one that overlaps a change waits for it, or reads again.

    A manager pickles, copies, and saves to a file (:meth:`save`, :meth:`load`)
    through one validated state; a bad file raises ``CorruptStateError``.
    """

    cdef:
        PageTable _table
        BlockAllocator _allocator
        int64_t _block_size
        int32_t _block_shift      # log2(block_size) for a power of two, else -1:
        int64_t _block_mask       # shifts instead of divisions on the hot paths
        object _row_tokens_arr    # int32, token count by PageTable row
        object _row_stamp_arr     # int64, last call that touched the row (duplicate check)
        int32_t[::1] _row_tokens
        int64_t[::1] _row_stamp
        int64_t _stamp
        int32_t _writing          # a change in progress (see _begin_write)
        int64_t _epoch            # bumped as each change begins and ends (see _read_begin)

    def __init__(self, num_blocks, block_size=16):
        pass

    def __cinit__(self, num_blocks, block_size=16, *args, **kwargs):
        block_size = check_range(as_index(block_size, "block_size"), 1, BLOCK_ID_LIMIT, "block_size")
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, BLOCK_ID_LIMIT, "num_blocks")
        if num_blocks * block_size > BLOCK_ID_LIMIT:
            raise ValueError(
                f"num_blocks * block_size must be below 2**31, got {num_blocks} * {block_size}")
        self._block_size = block_size
        self._block_shift = _log2_or_minus_one(block_size)
        self._block_mask = block_size - 1
        self._table = PageTable(block_size)
        self._allocator = BlockAllocator(num_blocks)
        # Both are the manager's alone: their own changing methods refuse to run, so
        # that nothing can add a row or take a block behind the manager's back.
        self._table._owned = 1
        self._allocator._owned = 1
        self._row_tokens_arr = np.zeros(64, dtype=np.int32)
        self._row_stamp_arr = np.zeros(64, dtype=np.int64)
        self._row_tokens = self._row_tokens_arr
        self._row_stamp = self._row_stamp_arr
        self._stamp = 0
        self._epoch = 0
        self._writing = 0

    cdef int _begin_write(self) except -1:
        """Start a change, or refuse it while another thread's change is in progress.

        A change may let other threads run in its middle (the table allocates and
        frees mapped memory), so the manager, its table and its allocator are all
        marked busy for its duration; their changing calls raise meanwhile.
        """
        # Another thread's change first: mid-change, the manager's arrays may lag its
        # table, which the tamper check below must not take for tampering.
        if self._writing or self._table._writing or self._allocator._writing:
            raise RuntimeError(_CONCURRENT_WRITE)
        self._check_untampered()
        self._writing = 1
        self._table._writing = 1
        self._allocator._writing = 1
        self._epoch += 1
        return 0

    cdef void _end_write(self) noexcept:
        self._epoch += 1
        self._writing = 0
        self._table._writing = 0
        self._allocator._writing = 0

    cdef int _check_untampered(self) except -1:
        """Refuse to work on a table or pool that was released for changes from outside.

        Only the private ``_set_owned`` can release them (tests of :meth:`check` do);
        the manager's arrays then may not match its table, and indexing them could
        go out of bounds.
        """
        if (not self._table._owned or not self._allocator._owned
                or self._table._rows_used > self._row_tokens.shape[0]):
            raise RuntimeError(_TAMPERED)
        return 0

    cdef int64_t _read_begin(self) except -1:
        """Start a read: refuse one while a change is half-done; return the epoch.

        Reads hold the GIL, but making their output arrays may let another thread
        run.  So a read sizes its output, makes it, and then checks with
        ``_read_current`` that no change began or ended meanwhile before it copies
        anything, with nothing in between that could let another thread run.
        """
        if self._writing:
            _wait_while_set(&self._writing, _READ_DURING_CHANGE)
        self._check_untampered()
        return self._epoch

    cdef bint _read_current(self, int64_t epoch) noexcept:
        return self._epoch == epoch and not self._writing

    # -- properties ----------------------------------------------------------------------
    @property
    def page_table(self):
        """The PageTable holding every sequence's blocks (read-only from outside)."""
        return self._table

    @property
    def allocator(self):
        """The BlockAllocator owning the pool (read-only from outside)."""
        return self._allocator

    @property
    def block_size(self):
        """Tokens per block."""
        return self._block_size

    @property
    def num_blocks(self):
        """Blocks in the pool."""
        return self._allocator._num_blocks

    @property
    def num_free_blocks(self):
        """Blocks currently free."""
        return self._allocator._num_free

    @property
    def usage(self):
        """Fraction of the pool's blocks in use, 0.0 .. 1.0."""
        return 1.0 - self._allocator._num_free / <double>self._allocator._num_blocks

    def __len__(self):
        return self._table._num_sequences

    def __contains__(self, seq_id):
        try:
            seq = operator.index(seq_id)
        except TypeError:
            return False
        if seq < 0 or seq > INT64_MAX:
            return False
        return self._table._find_row(seq) >= 0

    def __repr__(self):
        return (f"KVCacheManager(num_blocks={self.num_blocks}, block_size={self._block_size}, "
                f"sequences={len(self)}, free_blocks={self.num_free_blocks})")

    # -- C helpers -----------------------------------------------------------------------
    cdef inline int64_t _block_index(self, int64_t position) noexcept nogil:
        if self._block_shift >= 0:
            return position >> self._block_shift
        return position // self._block_size

    cdef inline int64_t _block_offset(self, int64_t position) noexcept nogil:
        if self._block_shift >= 0:
            return position & self._block_mask
        return position % self._block_size

    cdef inline int64_t _blocks_needed(self, int64_t tokens) noexcept nogil:
        return self._block_index(tokens + self._block_size - 1)

    cdef inline slot_t _slot(self, const block_id_t* data, int64_t position) noexcept nogil:
        return (<slot_t>data[self._block_index(position)] * self._block_size
                + self._block_offset(position))

    cdef int _ensure_rows(self, row_t row) except -1:
        """Grow the per-row arrays so that ``row`` is a valid index."""
        cdef Py_ssize_t size = self._row_tokens.shape[0]
        if row < size:
            return 0
        while size <= row:
            size *= 2
        tokens = np.zeros(size, dtype=np.int32)
        stamps = np.zeros(size, dtype=np.int64)
        tokens[:self._row_tokens.shape[0]] = self._row_tokens_arr
        stamps[:self._row_stamp.shape[0]] = self._row_stamp_arr
        self._row_tokens_arr = tokens
        self._row_stamp_arr = stamps
        self._row_tokens = tokens
        self._row_stamp = stamps
        return 0

    cdef int64_t _find_rows(self, const int64_t* seq_ids, Py_ssize_t n, row_t* rows,
                            bint distinct, int* error) noexcept nogil:
        """Resolve ids to rows; on a bad entry set ``error`` and return its index."""
        cdef Py_ssize_t i
        cdef row_t row
        if distinct:
            self._stamp += 1
        for i in range(n):
            if seq_ids[i] < 0:
                error[0] = PLAN_NEGATIVE
                return i
            row = self._table._find_row(seq_ids[i])
            if row < 0:
                error[0] = PLAN_UNKNOWN
                return i
            if distinct:
                if self._row_stamp[row] == self._stamp:
                    error[0] = PLAN_DUPLICATE
                    return i
                self._row_stamp[row] = self._stamp
            rows[i] = row
        error[0] = PLAN_OK
        return -1

    cdef object _rows(self, seq_ids, bint distinct, str name="seq_ids"):
        """The rows (int32 array) of a batch of known sequence ids, raising on a bad entry."""
        ids = _int64_vector(seq_ids, name)
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0)
        rows = _empty(n, cnp.NPY_INT32)
        cdef int error = PLAN_OK
        cdef int64_t bad
        cdef const int64_t* ids_data = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef row_t* rows_data = <row_t*>cnp.PyArray_DATA(rows)
        # The GIL stays held: marking rows touches shared scratch (the stamps), and
        # another thread's call may grow the table, which this lookup reads.
        bad = self._find_rows(ids_data, n, rows_data, distinct, &error)
        if error == PLAN_UNKNOWN:
            raise KeyError(f"{name}[{bad}] = {ids_data[bad]} is not a sequence of this manager")
        if error == PLAN_NEGATIVE:
            raise ValueError(f"{name}[{bad}] = {ids_data[bad]} is negative; sequence ids are 0..2**63-1")
        if error == PLAN_DUPLICATE:
            raise ValueError(f"{name}[{bad}] = {ids_data[bad]} appears more than once")
        return rows

    cdef object _counts(self, num_new_tokens, Py_ssize_t n, int64_t* scalar):
        """Validate ``num_new_tokens``: an int64 array of length ``n``, or None for a scalar.

        A scalar count is stored in ``scalar`` and read with stride 0, so a decode step
        allocates no count array.
        """
        if isinstance(num_new_tokens, np.ndarray) and num_new_tokens.ndim == 0:
            num_new_tokens = num_new_tokens.item()     # a 0-d array is a scalar count
        if isinstance(num_new_tokens, (list, tuple, np.ndarray)):
            counts = _int64_vector(num_new_tokens, "num_new_tokens")
            if counts is num_new_tokens:
                # The plan and the step both read the counts, and reserving room in
                # between may let another thread run: it must not change them.
                counts = counts.copy()
            if counts.shape[0] != n:
                raise ValueError(
                    f"num_new_tokens must have one entry per sequence ({n}), got {counts.shape[0]}")
            if n and counts.min() < 0:
                bad = int(np.argmax(counts < 0))
                raise ValueError(f"num_new_tokens[{bad}] = {counts[bad]} is negative")
            return counts
        count = as_index(num_new_tokens, "num_new_tokens")
        if count < 0:
            raise ValueError(f"num_new_tokens[0] = {count} is negative")
        if count > INT64_MAX:
            raise OverflowError(f"num_new_tokens = {count} does not fit in 64 bits")
        scalar[0] = count
        return None

    cdef object _plan_step(self, seq_ids, num_new_tokens, _StepPlan* plan):
        """Check the arguments of a step and plan it into ``plan`` (nothing changes).

        Returns the arrays ``plan`` points into; the caller keeps them while it uses
        the plan.  A scalar count lives in ``plan.scalar`` and is read with stride 0.
        """
        rows = self._rows(seq_ids, True)
        plan.n = cnp.PyArray_DIM(rows, 0)
        plan.rows = <const row_t*>cnp.PyArray_DATA(rows)
        plan.scalar = 0
        counts = self._counts(num_new_tokens, plan.n, &plan.scalar)
        if counts is None:
            plan.counts = &plan.scalar
            plan.stride = 0
        else:
            plan.counts = <const int64_t*>cnp.PyArray_DATA(counts)
            plan.stride = 1
        plan.num_copies = 0
        plan.num_slots = 0
        plan.need = self._plan(plan.rows, plan.n, plan.counts, plan.stride,
                               &plan.num_copies, &plan.num_slots)
        return rows, counts

    cdef int64_t _plan(self, const row_t* rows, Py_ssize_t n, const int64_t* counts,
                       Py_ssize_t count_stride, int64_t* num_copies,
                       int64_t* num_slots) noexcept nogil:
        """Blocks a growth call needs (new blocks plus copy-on-write copies).

        Mirrors the execution exactly: sequences in input order, and a shared last
        block stops needing a copy once the earlier sharers in the call have moved off
        it (tracked in the allocator's ``_pending`` scratch, reset before returning).
        Runs with the GIL held because of that shared scratch.
        """
        cdef Py_ssize_t i
        cdef int64_t need = 0, copies = 0, slots = 0, tokens, count
        cdef int64_t limit = <int64_t>self._allocator._num_blocks * self._block_size
        cdef int32_t length
        cdef row_t row
        cdef block_id_t last
        cdef int32_t* refcount = &self._allocator._refcount[0]
        cdef int32_t* pending = &self._allocator._pending[0]
        for i in range(n):
            count = counts[i * count_stride]
            if count == 0:
                continue
            if count > limit:
                need += self._allocator._num_blocks + 1   # can never fit
                continue
            row = rows[i]
            tokens = self._row_tokens[row]
            length = self._table._row_length(row)
            slots += count
            if self._block_offset(tokens):
                last = self._table._row_data(row)[length - 1]
                if refcount[last] - pending[last] > 1:
                    need += 1
                    copies += 1
                    pending[last] += 1
            need += self._blocks_needed(tokens + count) - length
        if copies:
            for i in range(n):
                if counts[i * count_stride]:
                    row = rows[i]
                    length = self._table._row_length(row)
                    if length:
                        pending[self._table._row_data(row)[length - 1]] = 0
        num_copies[0] = copies
        num_slots[0] = slots
        return need

    # -- growth --------------------------------------------------------------------------
    def add_sequence(self, seq_id, num_tokens):
        """Start a sequence holding ``num_tokens`` tokens (a prefill).

        Parameters
        ----------
        seq_id : int
            New sequence id, 0 .. 2**63 - 1; an existing id raises ``ValueError``.
        num_tokens : int
            Tokens in the prompt, >= 0 (0 makes an empty sequence with no block).

        Returns
        -------
        AppendResult
            ``slots`` for positions ``0 .. num_tokens - 1``; no copies.

        Raises
        ------
        OutOfBlocksError
            Not enough free blocks; nothing changes.
        """
        self._begin_write()
        try:
            return self._add_sequence(seq_id, num_tokens)
        finally:
            self._end_write()

    cdef object _add_sequence(self, seq_id, num_tokens):
        cdef int64_t seq = _as_seq_id(seq_id, "seq_id")
        if type(num_tokens) is not int:
            num_tokens = as_index(num_tokens, "num_tokens")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if self._table._find_row(seq) >= 0:
            raise ValueError(f"seq_id = {seq} already exists")
        if num_tokens > <int64_t>self._allocator._num_blocks * self._block_size:
            raise OutOfBlocksError(-(-num_tokens // self._block_size), self._allocator._num_free)
        cdef int64_t n = num_tokens
        cdef int64_t need = self._blocks_needed(n)
        if need > self._allocator._num_free:
            raise OutOfBlocksError(need, self._allocator._num_free)
        # Everything that can fail comes before the first change.
        slots = _empty(n, cnp.NPY_INT64)
        blocks = _empty(need, cnp.NPY_INT32)
        cdef AppendResult result = _new_result()
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* block_data = <block_id_t*>cnp.PyArray_DATA(blocks)
        cdef const block_id_t* data
        cdef int64_t p
        # Room for the new row's count first, so that the manager's arrays never lag
        # its table, even while this change lets other threads run.
        self._ensure_rows(self._table._rows_used)
        cdef row_t row = self._table._get_or_create_row(seq)
        try:
            self._table._reserve_row(row, _with_room_to_grow(need))
        except BaseException:
            self._table._drop_row(row)
            raise
        if need:
            self._allocator._take(need, block_data)
            self._table._append_to_row(row, block_data, need)   # room reserved above
            data = self._table._row_data(row)
            # The GIL stays held: another thread's call may grow the table or the
            # token array, and must not do so while this loop reads them.
            for p in range(n):
                slot_data[p] = self._slot(data, p)
        self._row_tokens[row] = <int32_t>n
        result.slots = slots
        return result

    def append_tokens(self, seq_ids, num_new_tokens=1):
        """Grow sequences by ``num_new_tokens`` each: one decode step, or more tokens.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Distinct existing sequence ids.
        num_new_tokens : int or 1-D array-like of int, default 1
            Tokens to add, one count for all or one per sequence; >= 0.

        Returns
        -------
        AppendResult
            ``slots`` (int64) of every new token, sequence by sequence in input order;
            ``copy_src`` / ``copy_dst`` (int32), the copy-on-write copies to perform
            before writing.

        Raises
        ------
        OutOfBlocksError
            The pool cannot cover the whole call; nothing changes.
        KeyError
            An unknown sequence id.
        """
        self._begin_write()
        try:
            return self._append_tokens(seq_ids, num_new_tokens)
        finally:
            self._end_write()

    cdef object _append_tokens(self, seq_ids, num_new_tokens):
        cdef _StepPlan plan
        inputs = self._plan_step(seq_ids, num_new_tokens, &plan)   # keeps plan's arrays alive
        cdef Py_ssize_t i, n = plan.n
        cdef const row_t* row_data = plan.rows
        cdef const int64_t* counts = plan.counts
        cdef Py_ssize_t stride = plan.stride
        cdef int64_t need = plan.need, num_copies = plan.num_copies, num_slots = plan.num_slots
        if need > self._allocator._num_free:
            raise OutOfBlocksError(need, self._allocator._num_free)
        cdef row_t row
        cdef int64_t add, count
        # Reserve every row's room first, so a MemoryError here leaves nothing changed
        # and the appends below cannot fail.
        for i in range(n):
            count = counts[i * stride]
            if count:
                row = row_data[i]
                add = self._blocks_needed(self._row_tokens[row] + count) - self._table._row_length(row)
                if add > 0:
                    self._table._reserve_row(row, self._table._row_length(row) + add)
        fresh = _empty(need, cnp.NPY_INT32)
        slots = _empty(num_slots, cnp.NPY_INT64)
        copy_src = _empty(num_copies, cnp.NPY_INT32)
        copy_dst = _empty(num_copies, cnp.NPY_INT32)
        cdef AppendResult result = _new_result()
        result.slots = slots
        result.copy_src = copy_src
        result.copy_dst = copy_dst
        cdef block_id_t* fresh_data = <block_id_t*>cnp.PyArray_DATA(fresh)
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* src_data = <block_id_t*>cnp.PyArray_DATA(copy_src)
        cdef block_id_t* dst_data = <block_id_t*>cnp.PyArray_DATA(copy_dst)
        cdef int32_t* refcount = &self._allocator._refcount[0]
        cdef int64_t taken = 0, copied = 0, written = 0, tokens, p
        cdef int32_t length
        cdef block_id_t* data
        cdef block_id_t last
        self._allocator._take(need, fresh_data)
        for i in range(n):
            count = counts[i * stride]
            if count == 0:
                continue
            row = row_data[i]
            tokens = self._row_tokens[row]
            length = self._table._row_length(row)
            if self._block_offset(tokens):
                data = self._table._row_data(row)
                last = data[length - 1]
                if refcount[last] > 1:
                    src_data[copied] = last
                    dst_data[copied] = fresh_data[taken]
                    copied += 1
                    refcount[last] -= 1          # stays >= 1: never frees
                    # Through the table, so that device mirrors see the new last block.
                    self._table._set_block_at(row, length - 1, fresh_data[taken])
                    taken += 1
            add = self._blocks_needed(tokens + count) - length
            if add > 0:
                self._table._append_to_row(row, fresh_data + taken, add)   # room reserved above
                taken += add
            data = self._table._row_data(row)
            for p in range(tokens, tokens + count):
                slot_data[written] = self._slot(data, p)
                written += 1
            self._row_tokens[row] = <int32_t>(tokens + count)
        return result

    def can_append(self, seq_ids, num_new_tokens=1):
        """Whether ``append_tokens(seq_ids, num_new_tokens)`` would find enough blocks.

        Checks the arguments exactly as ``append_tokens`` does and changes nothing.
        """
        cdef _StepPlan plan
        self._plan_step(seq_ids, num_new_tokens, &plan)
        return plan.need <= self._allocator._num_free

    def fork(self, parent_id, child_id):
        """Make ``child_id`` share every block and the token count of ``parent_id``.

        Raises ``KeyError`` for an unknown parent and ``ValueError`` if the child exists.
        """
        self._begin_write()
        try:
            return self._fork(parent_id, child_id)
        finally:
            self._end_write()

    cdef object _fork(self, parent_id, child_id):
        cdef int64_t parent = _as_seq_id(parent_id, "parent_id")
        cdef int64_t child = _as_seq_id(child_id, "child_id")
        if self._table._find_row(parent) < 0:
            raise KeyError(f"parent_id = {parent} is not a sequence of this manager")
        if self._table._find_row(child) >= 0:
            raise ValueError(f"child_id = {child} already exists")
        self._ensure_rows(self._table._rows_used)      # see _add_sequence
        cdef row_t child_row = self._table._get_or_create_row(child)
        cdef row_t parent_row = self._table._find_row(parent)
        cdef int32_t length = self._table._row_length(parent_row)
        try:
            self._table._reserve_row(child_row, _with_room_to_grow(length))
        except BaseException:
            self._table._drop_row(child_row)
            raise
        # Nothing moves once the child's room is reserved, so the parent's row can be
        # copied straight from the pool.
        cdef const block_id_t* blocks = self._table._row_data(parent_row)
        self._table._append_to_row(child_row, blocks, length)
        self._allocator._retain(blocks, length)
        self._row_tokens[child_row] = self._row_tokens[parent_row]

    def free_sequence(self, seq_ids):
        """Remove one sequence (an int) or many (an array-like); release their blocks.

        Blocks return to the pool as their counts reach 0, each sequence's blocks in
        order.  Every id is checked first (``KeyError`` for an unknown one,
        ``ValueError`` for a repeat): a call that raises changes nothing.
        """
        self._begin_write()
        try:
            return self._free_sequence(seq_ids)
        finally:
            self._end_write()

    cdef object _free_sequence(self, seq_ids):
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        rows = self._rows(seq_ids, True)
        cdef const row_t* row_data = <const row_t*>cnp.PyArray_DATA(rows)
        cdef Py_ssize_t i
        cdef row_t row
        for i in range(cnp.PyArray_DIM(rows, 0)):
            row = row_data[i]
            self._allocator._release(self._table._row_data(row), self._table._row_length(row))
            self._row_tokens[row] = 0
            self._table._drop_row(row)

    # -- queries -------------------------------------------------------------------------
    def seq_lens(self, seq_ids):
        """Tokens held by each sequence, int32."""
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n
        cdef const row_t* row_data
        cdef int32_t* out_data
        cdef int64_t epoch
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            rows = self._rows(ids, False)
            n = cnp.PyArray_DIM(rows, 0)
            row_data = <const row_t*>cnp.PyArray_DATA(rows)
            out = _empty(n, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run.
            out_data = <int32_t*>cnp.PyArray_DATA(out)
            for i in range(n):
                out_data[i] = self._row_tokens[row_data[i]]
            return out
        raise RuntimeError(_READ_KEPT_CHANGING)

    def block_table(self, seq_ids):
        """Dense block table, int32 ``[len(seq_ids), W]`` padded with ``PAD_SLOT_ID``.

        ``W`` is the longest row in the batch.  Pair it with :meth:`seq_lens` for a
        PagedAttention kernel.
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, j, n
        cdef const row_t* row_data
        cdef int32_t width, length
        cdef cnp.npy_intp shape[2]
        cdef block_id_t* out
        cdef int64_t epoch
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            rows = self._rows(ids, False)
            n = cnp.PyArray_DIM(rows, 0)
            row_data = <const row_t*>cnp.PyArray_DATA(rows)
            width = 0
            for i in range(n):
                if self._table._row_length(row_data[i]) > width:
                    width = self._table._row_length(row_data[i])
            shape[0] = n
            shape[1] = width
            table = cnp.PyArray_EMPTY(2, shape, cnp.NPY_INT32, 0)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: the widths hold.
            out = <block_id_t*>cnp.PyArray_DATA(table)
            for i in range(n):
                length = self._table._row_length(row_data[i])
                memcpy(out, self._table._row_data(row_data[i]), <size_t>length * sizeof(block_id_t))
                for j in range(length, width):
                    out[j] = PAD
                out += width
            return table
        raise RuntimeError(_READ_KEPT_CHANGING)

    def flashinfer_layout(self, seq_ids):
        """FlashInfer's paged-KV inputs for a batch.

        Returns
        -------
        kv_indptr : numpy.ndarray of int32, ``[B + 1]``
            Sequence ``i``'s pages are ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``.
        kv_indices : numpy.ndarray of int32, ``[nnz]``
            Block ids, sequence by sequence.
        kv_last_page_len : numpy.ndarray of int32, ``[B]``
            Tokens in each sequence's last block, ``1 .. block_size``; 0 for a sequence
            holding no token (it has no page at all).
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n
        cdef const row_t* row_data
        cdef int64_t nnz, tokens, epoch
        cdef int32_t* indptr_data
        cdef block_id_t* indices_data
        cdef int32_t* last_data
        cdef int32_t length
        cdef int64_t at
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            rows = self._rows(ids, False)
            n = cnp.PyArray_DIM(rows, 0)
            row_data = <const row_t*>cnp.PyArray_DATA(rows)
            nnz = 0
            for i in range(n):
                nnz += self._table._row_length(row_data[i])
            indptr = _empty(n + 1, cnp.NPY_INT32)
            indices = _empty(nnz, cnp.NPY_INT32)
            last_page_len = _empty(n, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: the sizes hold.
            indptr_data = <int32_t*>cnp.PyArray_DATA(indptr)
            indices_data = <block_id_t*>cnp.PyArray_DATA(indices)
            last_data = <int32_t*>cnp.PyArray_DATA(last_page_len)
            at = 0
            indptr_data[0] = 0
            for i in range(n):
                length = self._table._row_length(row_data[i])
                memcpy(indices_data + at, self._table._row_data(row_data[i]),
                       <size_t>length * sizeof(block_id_t))
                at += length
                indptr_data[i + 1] = <int32_t>at
                tokens = self._row_tokens[row_data[i]]
                last_data[i] = <int32_t>(self._block_offset(tokens - 1) + 1) if tokens else 0
            return indptr, indices, last_page_len
        raise RuntimeError(_READ_KEPT_CHANGING)

    # -- state ---------------------------------------------------------------------------
    def _state(self):
        """The manager's state dict: its table, its pool and each sequence's tokens."""
        cdef int64_t epoch, i, count
        cdef int attempt
        cdef int64_t* token_data
        cdef const int64_t* id_data
        cdef row_t row
        cdef Py_ssize_t num_free
        cdef int32_t num_blocks = self._allocator._num_blocks
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            # Capture first, all in C (after the first attempt with the GIL held
            # throughout); the dict is built only from a capture of one moment.
            seq_ids, lengths, blocks = self._table._snapshot(True, attempt > 0)
            count = cnp.PyArray_DIM(seq_ids, 0)
            tokens = _empty(count, cnp.NPY_INT64)
            refcount = _empty(num_blocks, cnp.NPY_INT32)
            free_stack = _empty(num_blocks, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run.
            token_data = <int64_t*>cnp.PyArray_DATA(tokens)
            id_data = <const int64_t*>cnp.PyArray_DATA(seq_ids)
            for i in range(count):
                row = self._table._find_row(id_data[i])
                token_data[i] = self._row_tokens[row] if row >= 0 else -1
            num_free = self._allocator._capture(refcount, free_stack)
            state = _state.header("KVCacheManager")
            state["block_size"] = np.array(self._block_size, dtype=np.int64)
            state["seq_ids"] = seq_ids
            state["lengths"] = lengths
            state["blocks"] = blocks
            state["num_blocks"] = np.array(num_blocks, dtype=np.int64)
            state["refcount"] = refcount
            state["free_stack"] = free_stack[:num_free]
            state["tokens"] = tokens
            return state
        raise RuntimeError(_READ_KEPT_CHANGING)

    @staticmethod
    def _from_state(state):
        """A manager built from a state dict; ``CorruptStateError`` if it is not valid."""
        _state.check_kind(state, "KVCacheManager")
        (block_size, num_blocks, seq_ids, lengths, blocks, tokens, refcount,
         free_stack) = _state.manager_state(state)
        table_state = _state.header("PageTable")
        table_state.update(block_size=state["block_size"], seq_ids=seq_ids, lengths=lengths,
                           blocks=blocks)
        cdef PageTable table = PageTable._from_state(table_state)
        cdef BlockAllocator allocator = _allocator_from_arrays(num_blocks, refcount, free_stack)
        cdef KVCacheManager manager = KVCacheManager(num_blocks, block_size)
        cdef int64_t i
        cdef row_t row
        table._owned = 1
        allocator._owned = 1
        manager._table = table
        manager._allocator = allocator
        if table._rows_used:
            manager._ensure_rows(table._rows_used - 1)
        for i in range(seq_ids.shape[0]):
            row = table._find_row(seq_ids[i])
            manager._row_tokens[row] = <int32_t>tokens[i]
        return manager

    def save(self, path):
        """Save the manager (table, pool, token counts) to a file; see :meth:`load`.

        The file is an uncompressed ``.npz`` of plain integer arrays in pagetable's
        versioned format (see ``pagetable._state``).
        """
        _state.write(path, self._state())

    @classmethod
    def load(cls, path):
        """Load a manager saved by :meth:`save`.

        Everything is checked before anything is built: reference counts against the
        table, the free stack against the counts, token counts against block counts.

        Raises
        ------
        CorruptStateError
            The file is truncated, tampered with, of another version or kind, or
            holds inconsistent state.
        """
        return KVCacheManager._from_state(_state.read(path))

    def copy(self):
        """An independent copy: same sequences, blocks, counts and free order."""
        return KVCacheManager._from_state(self._state())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_restore_manager, (self._state(),))

    def __eq__(self, other):
        if not isinstance(other, KVCacheManager):
            return NotImplemented
        mine, theirs = self._state(), other._state()
        return mine.keys() == theirs.keys() and all(
            np.array_equal(mine[key], theirs[key]) for key in mine)

    __hash__ = None

    def check(self):
        """Verify every invariant; raise ``AssertionError`` naming the first broken one.

        - each block's reference count equals the number of table entries naming it;
        - the free stack holds exactly the blocks with count 0, each once;
        - each sequence's block count is ``ceil(tokens / block_size)``;
        - every block id in the table is inside the pool.
        """
        cdef int64_t num_blocks = self._allocator._num_blocks
        references = np.zeros(num_blocks, dtype=np.int64)
        cdef row_t row
        cdef int64_t tokens, length, first = 0
        seq_ids, lengths, all_blocks = self._table._snapshot(True)
        for i in range(seq_ids.shape[0]):
            seq = int(seq_ids[i])
            length = lengths[i]
            blocks = all_blocks[first:first + length]
            first += length
            row = self._table._find_row(seq)
            if row < 0 or row >= self._row_tokens.shape[0]:
                raise AssertionError(f"sequence {seq} has no token count in the manager")
            tokens = self._row_tokens[row]
            if length != _blocks_for(tokens, self._block_size):
                raise AssertionError(
                    f"sequence {seq} holds {tokens} tokens in {length} blocks "
                    f"(block_size {self._block_size} needs {_blocks_for(tokens, self._block_size)})")
            if length:
                if blocks.min() < 0 or blocks.max() >= num_blocks:
                    raise AssertionError(f"sequence {seq} maps a block outside the pool: {blocks}")
                np.add.at(references, blocks, 1)
        refcount = self._allocator._refcount_arr
        wrong = np.flatnonzero(refcount != references)
        if wrong.size:
            b = int(wrong[0])
            raise AssertionError(
                f"block {b} has refcount {refcount[b]} but {references[b]} table entries name it")
        free = self._allocator._free_blocks()
        if free.size and (free.min() < 0 or free.max() >= num_blocks):
            raise AssertionError("the free stack holds an id outside the pool")
        on_stack = np.bincount(free, minlength=num_blocks) if free.size else np.zeros(num_blocks, np.int64)
        twice = np.flatnonzero(on_stack > 1)
        if twice.size:
            raise AssertionError(f"block {int(twice[0])} is on the free stack {on_stack[twice[0]]} times")
        used_and_free = np.flatnonzero((on_stack == 1) & (references > 0))
        if used_and_free.size:
            raise AssertionError(f"block {int(used_and_free[0])} is both free and in use")
        lost = np.flatnonzero((on_stack == 0) & (references == 0))
        if lost.size:
            raise AssertionError(f"block {int(lost[0])} is neither free nor in use (leaked)")
