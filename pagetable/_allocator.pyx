"""The block allocator: a reference-counted pool of physical KV-cache blocks.

No Python object exists per block: the pool is two int32 arrays, the reference
counts and a stack of the free blocks.

Reuse order
-----------
Free blocks form a LIFO stack: the most recently freed block is handed out first, and
a fresh allocator hands out 0, 1, 2, ... .  LIFO keeps the set of block ids in use
compact (lightly loaded engines touch a small, low region of the KV pool, which is
kinder to the GPU's TLB and L2 than ids spread over the whole pool), its push and pop
are O(1) with no per-block objects, and it is deterministic, which the reference model
and the simulation's side-by-side check rely on.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, INT32_MAX
from libc.string cimport memcpy

from pagetable._types cimport block_id_t
from pagetable._accept cimport int_vector
from pagetable._buffers cimport empty
from pagetable._guard cimport Guarded

import numpy as np

from pagetable import _state
from pagetable._convert import as_index, check_range
from pagetable._results import OutOfBlocksError

cnp.import_array()

_CONCURRENT_WRITE = (
    "another thread is changing this KVCacheManager (or its table or allocator) right "
    "now; changes from several threads must take turns (hold a lock around them)")
_OWNED_ALLOCATOR = (
    "this BlockAllocator belongs to a KVCacheManager: allocate and free through the "
    "manager (or work on a copy)")


cdef class BlockAllocator(Guarded):
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

    def __init__(self, num_blocks):
        # Set-up happens in __cinit__, which runs even when __init__ is skipped,
        # so that no instance ever has unset arrays.
        pass

    def __cinit__(self, num_blocks, *args, **kwargs):
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, INT32_MAX, "num_blocks")
        self._num_blocks = num_blocks
        self._refcount_arr = np.zeros(num_blocks, dtype=np.int32)
        # Top of the stack is the last entry, so block 0 is handed out first.
        self._free_stack_arr = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)
        self._refcount = self._refcount_arr
        self._free_stack = self._free_stack_arr
        self._num_free = num_blocks
        self._writing = 0
        self._owned = 0
        self._lru_arr = None
        self._cached_arr = None
        self._lru_prev = NULL
        self._lru_next = NULL
        self._cached = NULL
        self._lru_head = -1
        self._lru_tail = -1
        self._num_lru = 0

    cdef int enable_lru(self) except -1:
        if self._cached != NULL:
            return 0
        self._lru_arr = np.full(2 * <int64_t>self._num_blocks, -1, dtype=np.int32)
        self._cached_arr = np.zeros(self._num_blocks, dtype=np.uint8)
        self._lru_prev = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>self._lru_arr)
        self._lru_next = self._lru_prev + self._num_blocks
        self._cached = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._cached_arr)
        return 0

    cdef Py_ssize_t capture_lru(self, object out) noexcept:
        cdef int32_t* data = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out)
        cdef Py_ssize_t n = 0
        cdef int32_t block = self._lru_head
        while block >= 0 and n < self._num_blocks:
            data[n] = block
            n += 1
            block = self._lru_next[block]
        return n

    cdef object cached_flags(self):
        if self._cached_arr is None:
            return None
        return self._cached_arr.copy()

    cdef int _check_writable(self) except -1:
        if self._owned:
            raise RuntimeError(_OWNED_ALLOCATOR)
        if self._writing:
            raise RuntimeError(_CONCURRENT_WRITE)
        return 0

    # -- state ------------------------------------------------------------------------
    def _state(self):
        """The allocator's state dict (plain arrays; see ``pagetable._state``)."""
        refcount = empty(self._num_blocks, cnp.NPY_INT32)
        free_stack = empty(self._num_blocks, cnp.NPY_INT32)
        lru = empty(self._num_blocks, cnp.NPY_INT32)
        cdef Py_ssize_t num_free = self.capture(refcount, free_stack)
        cdef Py_ssize_t num_lru = self.capture_lru(lru)
        if num_lru:
            # A prefix-caching manager's pool: on its own, a cached-free block is just
            # free.  They go below the stack, so the stack's order is kept.
            free_stack = np.concatenate([lru[:num_lru], free_stack[:num_free]])
            num_free += num_lru
        state = _state.header("BlockAllocator")
        state["num_blocks"] = np.array(self._num_blocks, dtype=np.int64)
        state["refcount"] = refcount
        state["free_stack"] = free_stack[:num_free]
        return state

    cdef Py_ssize_t capture(self, object refcount, object free_stack) noexcept:
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
        return allocator_from_arrays(num_blocks, refcount, free_stack)

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
        """Blocks currently free (for a prefix-caching manager's pool, cached-free ones too)."""
        return self.free_count()

    def __repr__(self):
        return f"BlockAllocator(num_blocks={self._num_blocks}, num_free={self.free_count()})"

    # -- C level --------------------------------------------------------------------
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
            self.take(n, &view[0])
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
            if self._refcount[block] == 1:
                self._shared -= 1
            elif self._refcount[block] == 0:
                self._free_stack[self._num_free] = block
                self._num_free += 1
        if bad >= 0:
            # Undo: restore the counts and forget the blocks pushed so far.
            for j in range(bad):
                self._refcount[<block_id_t>ids[j]] += 1
                if self._refcount[<block_id_t>ids[j]] == 2:
                    self._shared += 1
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
                if self._refcount[<block_id_t>ids[i]] == 2:
                    self._shared += 1
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


cdef BlockAllocator allocator_from_arrays(int64_t num_blocks, object refcount, object free_stack):
    """A pool with validated counts and stack (from ``_state.allocator_state``)."""
    cdef BlockAllocator allocator = BlockAllocator(num_blocks)
    cdef Py_ssize_t num_free = cnp.PyArray_DIM(<cnp.ndarray>free_stack, 0)
    memcpy(&allocator._refcount[0], cnp.PyArray_DATA(<cnp.ndarray>refcount),
           <size_t>num_blocks * sizeof(int32_t))
    if num_free:
        memcpy(&allocator._free_stack[0], cnp.PyArray_DATA(<cnp.ndarray>free_stack),
               <size_t>num_free * sizeof(int32_t))
    allocator._num_free = <int32_t>num_free
    allocator._shared = int((refcount >= 2).sum())
    return allocator


cdef int restore_lru(BlockAllocator allocator, object cached, object lru) except -1:
    """Give ``allocator`` its cached flags and cached-free list (both validated)."""
    allocator.enable_lru()
    cdef const uint8_t[::1] flags = cached
    cdef const int32_t[::1] order = lru
    cdef Py_ssize_t i
    for i in range(flags.shape[0]):
        allocator._cached[i] = flags[i]
    for i in range(order.shape[0]):
        allocator._lru_append(order[i])
    return 0


_state.register("BlockAllocator", BlockAllocator._from_state)
