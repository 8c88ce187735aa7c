"""The KV-cache manager: a PageTable, a BlockAllocator and a record of its sequences.

No Python object exists per block or per sequence: the allocator is two int32 arrays
(reference counts and a free stack), and the manager's sequence registry keeps each
sequence's token count and table row in arrays indexed by the registry's own slots,
so a decode step for thousands of sequences is a few passes over contiguous arrays.

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
from libc.stdint cimport int32_t, int64_t, INT32_MAX, INT64_MAX
from libc.string cimport memcpy

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._accept cimport int_vector, seq_arg
from pagetable._allocator cimport BlockAllocator, allocator_from_arrays
from pagetable._blocks cimport BlockGeometry, block_geometry, block_index, block_offset, blocks_for
from pagetable._buffers cimport empty
from pagetable._persist cimport Persistent
from pagetable._registry cimport SequenceRegistry, SequenceSlot
from pagetable._results cimport AppendResult, new_result
from pagetable._table cimport PageTable, wait_while_set

import operator

import numpy as np

from pagetable import _state
from pagetable._convert import as_index, check_range
from pagetable._results import OutOfBlocksError

_CONCURRENT_WRITE = (
    "another thread is changing this KVCacheManager (or its table or allocator) right "
    "now; changes from several threads must take turns (hold a lock around them)")
_READ_DURING_CHANGE = (
    "a change to this KVCacheManager has been in progress for over half a second (is "
    "the read running inside it?); a read cannot see a change half-done")
_READ_KEPT_CHANGING = (
    "this KVCacheManager kept changing in another thread while it was being read; "
    "hold a lock around changes and reads")
_TAMPERED = (
    "the manager's table or allocator was changed from outside the manager; "
    "its state can no longer be trusted")

cnp.import_array()

# Error codes reported by the nogil planning kernel; the caller raises with the GIL.
cdef enum:
    PLAN_OK = 0
    PLAN_UNKNOWN = 1
    PLAN_DUPLICATE = 2
    PLAN_NEGATIVE = 3
    # A read that overlapped a change from another thread is run again, up to this
    # many times in all, before it gives up with RuntimeError.
    READ_ATTEMPTS = 4


cdef inline int64_t _with_room_to_grow(int64_t blocks) noexcept nogil:
    """Row capacity to reserve for a new sequence of ``blocks`` blocks.

    A sequence only grows, so a row reserved at its exact size moves to the pool's tail
    at its first block boundary; with a batch of prefills that is a burst of moves and
    a compaction a few decode steps later.  A quarter more plus 4 blocks (the
    PageTable's own growth step) lets a sequence decode 64+ tokens before its first
    move, for about one int32 per 4 blocks.
    """
    return blocks + (blocks >> 2) + 4


cdef inline object _int64_vector(values, str name):
    """``values`` as the int64 vector the loops read (see ``_accept.pxd``)."""
    return int_vector(values, name, cnp.NPY_INT64)


cdef struct _StepPlan:
    # One step's checked arguments and plan (see KVCacheManager._plan_step).
    Py_ssize_t n                 # sequences
    const int32_t* slots         # their registry slots
    const int64_t* counts        # new tokens per sequence, read at i * stride
    Py_ssize_t stride            # 1, or 0 when one count (``scalar``) serves all
    int64_t scalar
    int64_t need                 # fresh blocks the step takes
    int64_t num_copies           # copy-on-write copies it makes
    int64_t num_slots            # slots it returns


@cython.final
cdef class KVCacheManager(Persistent):
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
        SequenceRegistry _sequences
        int64_t _block_size
        BlockGeometry _geometry   # shifts instead of divisions on the hot paths
        object _pending_arr       # int32 by block id: planning scratch, all zero between calls
        int32_t[::1] _pending
        int32_t _writing          # a change in progress (see _begin_write)
        int64_t _epoch            # bumped as each change begins and ends (see _read_begin)

    def __init__(self, num_blocks, block_size=16):
        pass

    def __cinit__(self, num_blocks, block_size=16, *args, **kwargs):
        block_size = check_range(as_index(block_size, "block_size"), 1, INT32_MAX, "block_size")
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, INT32_MAX, "num_blocks")
        if num_blocks * block_size > INT32_MAX:
            raise ValueError(
                f"num_blocks * block_size must be below 2**31, got {num_blocks} * {block_size}")
        self._block_size = block_size
        self._geometry = block_geometry(block_size)
        self._table = PageTable(block_size)
        self._allocator = BlockAllocator(num_blocks)
        # Both are the manager's alone: their own changing methods refuse to run, so
        # that nothing can add a row or take a block behind the manager's back.
        self._table.mark_owned(True)
        self._allocator.mark_owned(True)
        self._sequences = SequenceRegistry()
        self._pending_arr = np.zeros(num_blocks, dtype=np.int32)
        self._pending = self._pending_arr
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
        if self._writing or self._table.is_changing() or self._allocator.is_changing():
            raise RuntimeError(_CONCURRENT_WRITE)
        self._check_untampered()
        self._writing = 1
        self._table.mark_changing(True)
        self._allocator.mark_changing(True)
        self._epoch += 1
        return 0

    cdef void _end_write(self) noexcept:
        self._epoch += 1
        self._writing = 0
        self._table.mark_changing(False)
        self._allocator.mark_changing(False)

    cdef int _check_untampered(self) except -1:
        """Refuse to work on a table or pool that was released for changes from outside.

        Only the private ``_set_owned`` can release them (tests of :meth:`check` do);
        the manager's record of its sequences then may not match its table, and the
        rows it holds could point past the table's.
        """
        if not self._table.is_owned() or not self._allocator.is_owned():
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
            wait_while_set(&self._writing, _READ_DURING_CHANGE)
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
        return self._allocator.block_count()

    @property
    def num_free_blocks(self):
        """Blocks currently free."""
        return self._allocator.free_count()

    @property
    def usage(self):
        """Fraction of the pool's blocks in use, 0.0 .. 1.0."""
        return 1.0 - self._allocator.free_count() / <double>self._allocator.block_count()

    def __len__(self):
        return self._sequences.count()

    def __contains__(self, seq_id):
        try:
            seq = operator.index(seq_id)
        except TypeError:
            return False
        if seq < 0 or seq > INT64_MAX:
            return False
        return self._sequences.find(seq) >= 0

    def __repr__(self):
        return (f"KVCacheManager(num_blocks={self.num_blocks}, block_size={self._block_size}, "
                f"sequences={len(self)}, free_blocks={self.num_free_blocks})")

    # -- C helpers -----------------------------------------------------------------------
    cdef inline int64_t _block_offset(self, int64_t position) noexcept nogil:
        return block_offset(&self._geometry, position)

    cdef inline int64_t _blocks_needed(self, int64_t tokens) noexcept nogil:
        return blocks_for(&self._geometry, tokens)

    cdef inline slot_t _slot(self, const block_id_t* data, int64_t position) noexcept nogil:
        return (<slot_t>data[block_index(&self._geometry, position)] * self._block_size
                + self._block_offset(position))

    cdef int64_t _find_slots(self, const int64_t* seq_ids, Py_ssize_t n, int32_t* slots,
                             bint distinct, int* error) noexcept nogil:
        """Resolve ids to registry slots; on a bad entry set ``error`` and return its index."""
        cdef Py_ssize_t i
        cdef int32_t slot
        cdef int64_t mark = self._sequences.mark_new() if distinct else 0
        for i in range(n):
            if seq_ids[i] < 0:
                error[0] = PLAN_NEGATIVE
                return i
            slot = self._sequences.find(seq_ids[i])
            if slot < 0:
                error[0] = PLAN_UNKNOWN
                return i
            if distinct:
                if self._sequences.slots[slot].mark == mark:
                    error[0] = PLAN_DUPLICATE
                    return i
                self._sequences.slots[slot].mark = mark
            slots[i] = slot
        error[0] = PLAN_OK
        return -1

    cdef object _slots(self, seq_ids, bint distinct, str name="seq_ids"):
        """The slots (int32 array) of a batch of known sequence ids, raising on a bad entry."""
        ids = _int64_vector(seq_ids, name)
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0)
        slots = empty(n, cnp.NPY_INT32)
        cdef int error = PLAN_OK
        cdef int64_t bad
        cdef const int64_t* ids_data = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef int32_t* slot_data = <int32_t*>cnp.PyArray_DATA(slots)
        # The GIL stays held: marking slots touches shared scratch (the marks), and
        # another thread's call may grow the registry, which this lookup reads.
        bad = self._find_slots(ids_data, n, slot_data, distinct, &error)
        if error == PLAN_UNKNOWN:
            raise KeyError(f"{name}[{bad}] = {ids_data[bad]} is not a sequence of this manager")
        if error == PLAN_NEGATIVE:
            raise ValueError(f"{name}[{bad}] = {ids_data[bad]} is negative; sequence ids are 0..2**63-1")
        if error == PLAN_DUPLICATE:
            raise ValueError(f"{name}[{bad}] = {ids_data[bad]} appears more than once")
        return slots

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
        slots = self._slots(seq_ids, True)
        plan.n = cnp.PyArray_DIM(slots, 0)
        plan.slots = <const int32_t*>cnp.PyArray_DATA(slots)
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
        plan.need = self._plan(plan.slots, plan.n, plan.counts, plan.stride,
                               &plan.num_copies, &plan.num_slots)
        return slots, counts

    cdef int64_t _plan(self, const int32_t* slots, Py_ssize_t n, const int64_t* counts,
                       Py_ssize_t count_stride, int64_t* num_copies,
                       int64_t* num_slots) noexcept nogil:
        """Blocks a growth call needs (new blocks plus copy-on-write copies).

        Mirrors the execution exactly: sequences in input order, and a shared last
        block stops needing a copy once the earlier sharers in the call have moved off
        it (counted in ``_pending``, scratch by block id, reset before returning).
        Runs with the GIL held because of that shared scratch.
        """
        cdef Py_ssize_t i
        cdef int64_t need = 0, copies = 0, slot_count = 0, tokens, count
        cdef int64_t limit = <int64_t>self._allocator.block_count() * self._block_size
        cdef int32_t length
        cdef row_t row
        cdef block_id_t last
        cdef const int32_t* refcount = self._allocator.refcounts()
        cdef int32_t* pending = &self._pending[0]
        cdef const SequenceSlot* records = self._sequences.slots
        for i in range(n):
            count = counts[i * count_stride]
            if count == 0:
                continue
            if count > limit:
                need += self._allocator.block_count() + 1   # can never fit
                continue
            row = records[slots[i]].row
            tokens = records[slots[i]].tokens
            length = self._table.row_length(row)
            slot_count += count
            if self._block_offset(tokens) and length > 0:   # length > 0 holds; a tampered table may break it
                last = self._table.row_blocks(row)[length - 1]
                if refcount[last] - pending[last] > 1:
                    need += 1
                    copies += 1
                    pending[last] += 1
            need += self._blocks_needed(tokens + count) - length
        if copies:
            for i in range(n):
                if counts[i * count_stride]:
                    row = records[slots[i]].row
                    length = self._table.row_length(row)
                    if length:
                        pending[self._table.row_blocks(row)[length - 1]] = 0
        num_copies[0] = copies
        num_slots[0] = slot_count
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
        cdef int64_t seq = seq_arg(seq_id, "seq_id")
        if type(num_tokens) is not int:
            num_tokens = as_index(num_tokens, "num_tokens")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if self._sequences.find(seq) >= 0:
            raise ValueError(f"seq_id = {seq} already exists")
        if num_tokens > <int64_t>self._allocator.block_count() * self._block_size:
            raise OutOfBlocksError(-(-num_tokens // self._block_size), self._allocator.free_count())
        cdef int64_t n = num_tokens
        cdef int64_t need = self._blocks_needed(n)
        if need > self._allocator.free_count():
            raise OutOfBlocksError(need, self._allocator.free_count())
        # Everything that can fail comes before the first change.
        slots = empty(n, cnp.NPY_INT64)
        blocks = empty(need, cnp.NPY_INT32)
        cdef AppendResult result = new_result()
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* block_data = <block_id_t*>cnp.PyArray_DATA(blocks)
        cdef const block_id_t* data
        cdef int64_t p
        self._sequences.reserve(1)
        cdef row_t row = self._table.create_row(seq)
        try:
            self._table.reserve_row(row, _with_room_to_grow(need))
        except BaseException:
            self._table.drop_row(row)
            raise
        if need:
            self._allocator.take(need, block_data)
            self._table.append_to_row(row, block_data, need)   # room reserved above
            data = self._table.row_blocks(row)
            # The GIL stays held: another thread's call may grow the table, and must
            # not do so while this loop reads it.
            for p in range(n):
                slot_data[p] = self._slot(data, p)
        self._sequences.add(seq, row, <int32_t>n)
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
        cdef const int32_t* slot_ids = plan.slots
        cdef const int64_t* counts = plan.counts
        cdef Py_ssize_t stride = plan.stride
        cdef int64_t need = plan.need, num_copies = plan.num_copies, num_slots = plan.num_slots
        if need > self._allocator.free_count():
            raise OutOfBlocksError(need, self._allocator.free_count())
        # Nothing in this call adds to the registry, so its records stay where they are.
        cdef SequenceSlot* records = self._sequences.slots
        cdef row_t row
        cdef int64_t add, count
        # Reserve every row's room first, so a MemoryError here leaves nothing changed
        # and the appends below cannot fail.
        for i in range(n):
            count = counts[i * stride]
            if count:
                row = records[slot_ids[i]].row
                add = self._blocks_needed(records[slot_ids[i]].tokens + count) - self._table.row_length(row)
                if add > 0:
                    self._table.reserve_row(row, self._table.row_length(row) + add)
        fresh = empty(need, cnp.NPY_INT32)
        slots = empty(num_slots, cnp.NPY_INT64)
        copy_src = empty(num_copies, cnp.NPY_INT32)
        copy_dst = empty(num_copies, cnp.NPY_INT32)
        cdef AppendResult result = new_result()
        result.slots = slots
        result.copy_src = copy_src
        result.copy_dst = copy_dst
        cdef block_id_t* fresh_data = <block_id_t*>cnp.PyArray_DATA(fresh)
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* src_data = <block_id_t*>cnp.PyArray_DATA(copy_src)
        cdef block_id_t* dst_data = <block_id_t*>cnp.PyArray_DATA(copy_dst)
        cdef const int32_t* refcount = self._allocator.refcounts()
        cdef int64_t taken = 0, copied = 0, written = 0, tokens, p
        cdef int32_t length
        cdef block_id_t* data
        cdef block_id_t last
        self._allocator.take(need, fresh_data)
        for i in range(n):
            count = counts[i * stride]
            if count == 0:
                continue
            row = records[slot_ids[i]].row
            tokens = records[slot_ids[i]].tokens
            length = self._table.row_length(row)
            if self._block_offset(tokens) and length > 0:   # length > 0 holds; a tampered table may break it
                data = self._table.row_blocks(row)
                last = data[length - 1]
                if refcount[last] > 1:
                    src_data[copied] = last
                    dst_data[copied] = fresh_data[taken]
                    copied += 1
                    # The sequence lets go of its shared block (its count stays >= 1,
                    # so the block is never freed here).
                    self._allocator.release(&last, 1)
                    # Through the table, so that device mirrors see the new last block.
                    self._table.set_block_at(row, length - 1, fresh_data[taken])
                    taken += 1
            add = self._blocks_needed(tokens + count) - length
            if add > 0:
                self._table.append_to_row(row, fresh_data + taken, add)   # room reserved above
                taken += add
            data = self._table.row_blocks(row)
            for p in range(tokens, tokens + count):
                slot_data[written] = self._slot(data, p)
                written += 1
            records[slot_ids[i]].tokens = <int32_t>(tokens + count)
        return result

    def can_append(self, seq_ids, num_new_tokens=1):
        """Whether ``append_tokens(seq_ids, num_new_tokens)`` would find enough blocks.

        Checks the arguments exactly as ``append_tokens`` does and changes nothing.
        """
        cdef _StepPlan plan
        self._plan_step(seq_ids, num_new_tokens, &plan)
        return plan.need <= self._allocator.free_count()

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
        cdef int64_t parent = seq_arg(parent_id, "parent_id")
        cdef int64_t child = seq_arg(child_id, "child_id")
        cdef int32_t parent_slot = self._sequences.find(parent)
        if parent_slot < 0:
            raise KeyError(f"parent_id = {parent} is not a sequence of this manager")
        if self._sequences.find(child) >= 0:
            raise ValueError(f"child_id = {child} already exists")
        self._sequences.reserve(1)
        cdef row_t child_row = self._table.create_row(child)
        cdef row_t parent_row = self._sequences.slots[parent_slot].row
        cdef int32_t length = self._table.row_length(parent_row)
        try:
            self._table.reserve_row(child_row, _with_room_to_grow(length))
        except BaseException:
            self._table.drop_row(child_row)
            raise
        # Nothing moves once the child's room is reserved, so the parent's row can be
        # copied straight from the pool.
        cdef const block_id_t* blocks = self._table.row_blocks(parent_row)
        self._table.append_to_row(child_row, blocks, length)
        self._allocator.retain(blocks, length)
        self._sequences.add(child, child_row, self._sequences.slots[parent_slot].tokens)

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
        slots = self._slots(seq_ids, True)
        cdef const int32_t* slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
        cdef Py_ssize_t i
        cdef row_t row
        for i in range(cnp.PyArray_DIM(slots, 0)):
            row = self._sequences.slots[slot_ids[i]].row
            self._allocator.release(self._table.row_blocks(row), self._table.row_length(row))
            self._sequences.remove(slot_ids[i])
            self._table.drop_row(row)

    # -- queries -------------------------------------------------------------------------
    def seq_lens(self, seq_ids):
        """Tokens held by each sequence, int32."""
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n
        cdef const int32_t* slot_ids
        cdef int32_t* out_data
        cdef int64_t epoch
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            out = empty(n, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run.
            out_data = <int32_t*>cnp.PyArray_DATA(out)
            for i in range(n):
                out_data[i] = self._sequences.slots[slot_ids[i]].tokens
            return out
        raise RuntimeError(_READ_KEPT_CHANGING)

    def block_table(self, seq_ids):
        """Dense block table, int32 ``[len(seq_ids), W]`` padded with ``PAD_SLOT_ID``.

        ``W`` is the longest row in the batch.  Pair it with :meth:`seq_lens` for a
        PagedAttention kernel.
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, j, n
        cdef const int32_t* slot_ids
        cdef const SequenceSlot* records = self._sequences.slots
        cdef int32_t width, length
        cdef cnp.npy_intp shape[2]
        cdef block_id_t* out
        cdef int64_t epoch
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            records = self._sequences.slots
            width = 0
            for i in range(n):
                if self._table.row_length(records[slot_ids[i]].row) > width:
                    width = self._table.row_length(records[slot_ids[i]].row)
            shape[0] = n
            shape[1] = width
            table = cnp.PyArray_EMPTY(2, shape, cnp.NPY_INT32, 0)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: the widths hold.
            out = <block_id_t*>cnp.PyArray_DATA(table)
            for i in range(n):
                length = self._table.row_length(records[slot_ids[i]].row)
                memcpy(out, self._table.row_blocks(records[slot_ids[i]].row), <size_t>length * sizeof(block_id_t))
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
        cdef const int32_t* slot_ids
        cdef const SequenceSlot* records = self._sequences.slots
        cdef int64_t nnz, tokens, epoch
        cdef int32_t* indptr_data
        cdef block_id_t* indices_data
        cdef int32_t* last_data
        cdef int32_t length
        cdef int64_t at
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            records = self._sequences.slots
            nnz = 0
            for i in range(n):
                nnz += self._table.row_length(records[slot_ids[i]].row)
            indptr = empty(n + 1, cnp.NPY_INT32)
            indices = empty(nnz, cnp.NPY_INT32)
            last_page_len = empty(n, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: the sizes hold.
            indptr_data = <int32_t*>cnp.PyArray_DATA(indptr)
            indices_data = <block_id_t*>cnp.PyArray_DATA(indices)
            last_data = <int32_t*>cnp.PyArray_DATA(last_page_len)
            at = 0
            indptr_data[0] = 0
            for i in range(n):
                length = self._table.row_length(records[slot_ids[i]].row)
                memcpy(indices_data + at, self._table.row_blocks(records[slot_ids[i]].row),
                       <size_t>length * sizeof(block_id_t))
                at += length
                indptr_data[i + 1] = <int32_t>at
                tokens = self._sequences.slots[slot_ids[i]].tokens
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
        cdef int32_t slot
        cdef Py_ssize_t num_free
        cdef int32_t num_blocks = self._allocator.block_count()
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            # Capture first, all in C (after the first attempt with the GIL held
            # throughout); the dict is built only from a capture of one moment.
            seq_ids, lengths, blocks = self._table.snapshot(True, attempt > 0)
            count = cnp.PyArray_DIM(seq_ids, 0)
            tokens = empty(count, cnp.NPY_INT64)
            refcount = empty(num_blocks, cnp.NPY_INT32)
            free_stack = empty(num_blocks, cnp.NPY_INT32)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run.
            token_data = <int64_t*>cnp.PyArray_DATA(tokens)
            id_data = <const int64_t*>cnp.PyArray_DATA(seq_ids)
            for i in range(count):
                slot = self._sequences.find(id_data[i])
                token_data[i] = self._sequences.slots[slot].tokens if slot >= 0 else -1
            num_free = self._allocator.capture(refcount, free_stack)
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
        cdef BlockAllocator allocator = allocator_from_arrays(num_blocks, refcount, free_stack)
        cdef KVCacheManager manager = KVCacheManager(num_blocks, block_size)
        cdef int64_t i, count = seq_ids.shape[0]
        table.mark_owned(True)
        allocator.mark_owned(True)
        manager._table = table
        manager._allocator = allocator
        manager._sequences.reserve(count)
        for i in range(count):
            manager._sequences.add(seq_ids[i], table.find_row(seq_ids[i]), <int32_t>tokens[i])
        return manager

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
        cdef int64_t num_blocks = self._allocator.block_count()
        references = np.zeros(num_blocks, dtype=np.int64)
        cdef int32_t slot
        cdef int64_t tokens, length, first = 0
        seq_ids, lengths, all_blocks = self._table.snapshot(True)
        if seq_ids.shape[0] != self._sequences.count():
            raise AssertionError(
                f"the table holds {seq_ids.shape[0]} sequences, the manager's record "
                f"{self._sequences.count()}")
        for i in range(seq_ids.shape[0]):
            seq = int(seq_ids[i])
            length = lengths[i]
            blocks = all_blocks[first:first + length]
            first += length
            slot = self._sequences.find(seq)
            if slot < 0:
                raise AssertionError(f"sequence {seq} has no token count in the manager")
            if self._sequences.slots[slot].row != self._table.find_row(seq):
                raise AssertionError(f"the manager's record of sequence {seq} names another row")
            tokens = self._sequences.slots[slot].tokens
            if length != self._blocks_needed(tokens):
                raise AssertionError(
                    f"sequence {seq} holds {tokens} tokens in {length} blocks "
                    f"(block_size {self._block_size} needs {self._blocks_needed(tokens)})")
            if length:
                if blocks.min() < 0 or blocks.max() >= num_blocks:
                    raise AssertionError(f"sequence {seq} maps a block outside the pool: {blocks}")
                np.add.at(references, blocks, 1)
        refcount = empty(num_blocks, cnp.NPY_INT32)
        free_stack = empty(num_blocks, cnp.NPY_INT32)
        free = free_stack[:self._allocator.capture(refcount, free_stack)]
        wrong = np.flatnonzero(refcount != references)
        if wrong.size:
            b = int(wrong[0])
            raise AssertionError(
                f"block {b} has refcount {refcount[b]} but {references[b]} table entries name it")
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


_state.register("KVCacheManager", KVCacheManager._from_state)
