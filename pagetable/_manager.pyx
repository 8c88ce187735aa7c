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
from libc.stdint cimport int32_t, int64_t, uint8_t, INT32_MAX, INT64_MAX
from libc.string cimport memcpy, memset

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._accept cimport block_arg, int_vector, seq_arg
from pagetable._allocator cimport BlockAllocator, allocator_from_arrays, restore_lru
from pagetable._blocks cimport BlockGeometry, block_geometry, block_index, block_offset, blocks_for
from pagetable._table_kernels cimport expand_to_kernel_blocks
from pagetable._buffers cimport empty
from pagetable._persist cimport Persistent
from pagetable._prefix_cache cimport PrefixCache, new_prefix_cache
from pagetable._registry cimport SequenceRegistry, SequenceSlot
from pagetable._results cimport AppendResult, new_result
from cpython.dict cimport PyDict_Next
from cpython.ref cimport PyObject
from pagetable._table cimport PageTable, wait_while_set

import json
import operator
import time

import numpy as np

from pagetable import _state
from pagetable._convert import as_index, check_range, kernel_blocks_per_block
from pagetable import prefix as _prefix
from pagetable.events import _event_batch
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


cdef inline int64_t _saturating_add(int64_t a, int64_t b) noexcept nogil:
    """``a + b`` of two non-negative counts, INT64_MAX where it would overflow."""
    return a + b if b <= INT64_MAX - a else INT64_MAX


cdef inline object _int64_vector(values, str name):
    """``values`` as the int64 vector the loops read (see ``_accept.pxd``)."""
    return int_vector(values, name, cnp.NPY_INT64)


_NO_STATS = _prefix.PrefixCacheStats(0, 0, 0, 0)


cdef int _check_token_ids(object ids) except -1:
    """Raise naming the first negative entry of an int32 array of token ids."""
    cdef const int32_t* data = <const int32_t*>cnp.PyArray_DATA(ids)
    cdef Py_ssize_t i
    for i in range(cnp.PyArray_DIM(ids, 0)):
        if data[i] < 0:
            raise ValueError(f"token_ids[{i}] = {data[i]} is negative; token ids are 0..2**31-1")
    return 0


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
cdef class _CacheCapture:
    """A prefix cache's state captured in one C section (see ``KVCacheManager._state``).

    Everything a capture writes into is made first (``__init__``, which may let other
    threads run); ``take`` then copies the cache with nothing that could, not even an
    allocation that could start the garbage collector; ``fill`` turns it into state
    arrays afterwards.
    """
    cdef:
        object lru, hashes, parents, known, tokens, cached
        Py_ssize_t num_lru
        int64_t requests, queries, hits, evictions
        list extra              # one entry per block (or None when no block has keys)
        list key_seqs, key_values
        Py_ssize_t num_keys

    def __init__(self, KVCacheManager manager):
        cdef PrefixCache cache = manager._cache
        cdef int64_t num_blocks = manager._allocator.block_count()
        self.lru = empty(num_blocks, cnp.NPY_INT32)
        self.hashes = np.empty(num_blocks * cache.digest_size, dtype=np.uint8)
        self.parents = np.empty(num_blocks * cache.digest_size, dtype=np.uint8)
        self.known = np.empty(num_blocks, dtype=np.uint8)
        self.tokens = np.empty(num_blocks * manager._block_size, dtype=np.int32)
        self.cached = np.empty(num_blocks, dtype=np.uint8)
        self.extra = [None] * num_blocks if cache._extra_used else None
        # A change of the key count is a change: the caller's epoch check catches it.
        self.num_keys = len(manager._keys)
        self.key_seqs = [None] * self.num_keys
        self.key_values = [None] * self.num_keys

    cdef void take(self, KVCacheManager manager) noexcept:
        cdef PrefixCache cache = manager._cache
        cdef int64_t num_blocks = manager._allocator.block_count()
        cdef int64_t b, D = cache.digest_size
        cdef Py_ssize_t position = 0, i = 0
        cdef PyObject* key
        cdef PyObject* value
        self.num_lru = manager._allocator.capture_lru(self.lru)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>self.hashes), cnp.PyArray_DATA(<cnp.ndarray>cache._hash_arr),
               <size_t>(num_blocks * D))
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>self.parents), cnp.PyArray_DATA(<cnp.ndarray>cache._parent_arr),
               <size_t>(num_blocks * D))
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>self.known), cnp.PyArray_DATA(<cnp.ndarray>cache._known_arr),
               <size_t>num_blocks)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>self.tokens), cnp.PyArray_DATA(<cnp.ndarray>cache._tokens_arr),
               <size_t>(num_blocks * manager._block_size) * sizeof(int32_t))
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>self.cached),
               cnp.PyArray_DATA(<cnp.ndarray>manager._allocator._cached_arr), <size_t>num_blocks)
        self.requests, self.queries = cache.requests, cache.queries
        self.hits, self.evictions = cache.hits, cache.evictions
        if self.extra is not None:
            for b in range(num_blocks):
                self.extra[b] = cache._extra[b]
        # Registry slots and their keys, by reference (ExtraKeys are immutable); the
        # slots become sequence ids in fill().
        while PyDict_Next(manager._keys, &position, &key, &value) and i < self.num_keys:
            self.key_seqs[i] = <object>key
            self.key_values[i] = <object>value
            i += 1
        for i in range(self.num_keys):
            self.key_seqs[i] = manager._sequences.slots[<int32_t>self.key_seqs[i]].seq_id

    cdef void fill(self, KVCacheManager manager, dict state, stack) except *:
        """The capture as state arrays.

        ``free_stack`` then lists the cached-free blocks (head first) below the free
        stack, so that on its own the pool's state says "free" of every block no
        sequence uses; ``prefix_lru_count`` says how many entries are that list.  The
        configuration never changes, so it is read here.
        """
        cdef PrefixCache cache = manager._cache
        state["prefix_algorithm"] = np.array(manager._algorithm)
        state["prefix_seed"] = np.array(cache.seed)
        state["prefix_medium"] = np.array(cache.medium)
        state["prefix_options"] = np.array(
            [cache.events is not None, cache._int_hashes,
             -1 if manager._dp_rank is None else manager._dp_rank], dtype=np.int64)
        state["free_stack"] = np.concatenate([self.lru[:self.num_lru], stack])
        state["prefix_lru_count"] = np.array(self.num_lru, dtype=np.int64)
        state["prefix_hashes"] = self.hashes
        state["prefix_parents"] = self.parents
        state["prefix_known"] = self.known
        state["prefix_tokens"] = self.tokens
        state["prefix_cached"] = self.cached
        state["prefix_stats"] = np.array([self.requests, self.queries, self.hits, self.evictions],
                                         dtype=np.int64)
        blocks = {}
        if self.extra is not None:
            blocks = {str(b): keys for b, keys in enumerate(self.extra) if keys is not None}
        sequences = {str(seq): keys._to_json() for seq, keys in zip(self.key_seqs, self.key_values)}
        state["prefix_extra"] = np.array(json.dumps({"blocks": blocks, "sequences": sequences}))


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
        PrefixCache _cache        # None without prefix caching
        dict _keys                # registry slot -> ExtraKeys, for sequences that have them
        object _dp_rank           # data_parallel_rank of event batches
        object _stats             # the last PrefixCacheStats handed out
        str _algorithm

    def __init__(self, num_blocks, block_size=16, *, enable_prefix_caching=False,
                 hash_algorithm="sha256", hash_seed=None, enable_kv_cache_events=False,
                 event_hash_format="int", medium="GPU", data_parallel_rank=None):
        pass

    def __cinit__(self, num_blocks, block_size=16, *args, enable_prefix_caching=False,
                  hash_algorithm="sha256", hash_seed=None, enable_kv_cache_events=False,
                  event_hash_format="int", medium="GPU", data_parallel_rank=None, **kwargs):
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
        self._cache = None
        self._stats = None
        self._keys = {}
        self._algorithm = None
        self._dp_rank = None
        if type(enable_prefix_caching) is not bool:
            raise TypeError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        if type(enable_kv_cache_events) is not bool:
            raise TypeError(f"enable_kv_cache_events must be True or False, got {enable_kv_cache_events!r}")
        if hash_algorithm not in _prefix.ALGORITHMS:
            raise ValueError(
                f"hash_algorithm must be one of {', '.join(_prefix.ALGORITHMS)}; got {hash_algorithm!r}")
        if event_hash_format not in ("int", "bytes"):
            raise ValueError(f"event_hash_format must be 'int' or 'bytes', got {event_hash_format!r}")
        if type(medium) is not str:
            raise TypeError(f"medium must be a str, got {type(medium).__name__}")
        if data_parallel_rank is not None:
            data_parallel_rank = check_range(
                as_index(data_parallel_rank, "data_parallel_rank"), 0, INT32_MAX, "data_parallel_rank")
        if enable_kv_cache_events and not enable_prefix_caching:
            raise ValueError(
                "enable_kv_cache_events=True needs enable_prefix_caching=True: the events "
                "describe the blocks the prefix cache holds")
        if not enable_prefix_caching:
            if hash_seed is not None:
                raise ValueError("hash_seed is only used with enable_prefix_caching=True")
            return
        self._algorithm = hash_algorithm
        self._dp_rank = data_parallel_rank
        self._cache = new_prefix_cache(self._allocator, block_size, hash_algorithm, hash_seed,
                                       enable_kv_cache_events, event_hash_format, medium)

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

    # The counters below are read after _read_begin: a change may let other threads run
    # in its middle (prefix hashing calls into Python), and must not be seen half done.
    @property
    def num_free_blocks(self):
        """Blocks currently free (with prefix caching, cached-free ones too)."""
        self._read_begin()
        return self._allocator.free_count()

    @property
    def usage(self):
        """Fraction of the pool's blocks in use, 0.0 .. 1.0."""
        self._read_begin()
        return 1.0 - self._allocator.free_count() / <double>self._allocator.block_count()

    def __len__(self):
        self._read_begin()
        return self._sequences.count()

    def __contains__(self, seq_id):
        try:
            seq = operator.index(seq_id)
        except TypeError:
            return False
        if seq < 0 or seq > INT64_MAX:
            return False
        self._read_begin()
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
            row = records[slots[i]].row
            tokens = records[slots[i]].tokens
            length = self._table.row_length(row)
            slot_count = _saturating_add(slot_count, count)
            if self._block_offset(tokens) and length > 0:   # length > 0 holds; a tampered table may break it
                last = self._table.row_blocks(row)[length - 1]
                if refcount[last] - pending[last] > 1:
                    need += 1
                    copies += 1
                    pending[last] += 1
            if count > limit:
                # Can never fit; the exact need all the same (as the reference reports
                # it), computed so that no sum can overflow: ceil((tokens + count) / B)
                # is count // B + ceil((tokens + count % B) / B).
                need = _saturating_add(need, count // self._block_size - length
                                       + self._blocks_needed(tokens + count % self._block_size))
            else:
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
    def add_sequence(self, seq_id, num_tokens=None, token_ids=None, extra_keys=None):
        """Start a sequence holding ``num_tokens`` tokens (a prefill).

        Parameters
        ----------
        seq_id : int
            New sequence id, 0 .. 2**63 - 1; an existing id raises ``ValueError``.
        num_tokens : int, optional
            Tokens in the prompt, >= 0 (0 makes an empty sequence with no block).
            Defaults to ``len(token_ids)``; must equal it when both are given.
        token_ids : 1-D array-like of int, optional
            The prompt's token ids, each 0 .. 2**31 - 1.  Required with prefix
            caching, which reuses the longest run of cached full blocks matching them.
        extra_keys : pagetable.prefix.ExtraKeys, optional
            What besides the tokens the KV depends on (LoRA adapter, multimodal items,
            cache salt); part of every block hash.  Only with prefix caching.

        Returns
        -------
        AppendResult
            ``slots`` for positions ``num_cached_tokens .. num_tokens - 1`` (the tokens
            the engine computes); no copies.  ``num_cached_tokens`` is the prefix
            found in the cache (always 0 without prefix caching, and at most
            ``num_tokens - 1``: the last token is computed for its logits).

        Raises
        ------
        OutOfBlocksError
            Not enough free blocks; nothing changes.
        """
        self._begin_write()
        try:
            return self._add_sequence(seq_id, num_tokens, token_ids, extra_keys)
        finally:
            self._end_write()

    def add_sequences(self, seq_ids, token_ids, extra_keys=None):
        """Admit several prompts in order, each as ``add_sequence`` would, while they fit.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Distinct new sequence ids.
        token_ids : sequence of 1-D array-likes of int
            Each prompt's token ids (one entry per id).
        extra_keys : sequence of ExtraKeys or None, optional
            One entry per prompt (None for a prompt without), or None for all.

        Returns
        -------
        list of AppendResult
            One per admitted prompt, in order.  Admission stops at the first prompt the
            pool cannot hold (that prompt and the ones after it are not added), so a
            shorter list than ``seq_ids`` is the scheduler's back-pressure signal; a
            later prompt may hit blocks an earlier one of the same call registered.

        Raises
        ------
        ValueError, KeyError, TypeError
            A bad argument anywhere in the call; checked before anything changes.
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(ids, 0)
        if not isinstance(token_ids, (list, tuple)):
            raise TypeError(f"token_ids must be a list of arrays, one per sequence, got {type(token_ids).__name__}")
        if len(token_ids) != n:
            raise ValueError(f"token_ids has {len(token_ids)} prompts for {n} seq_ids")
        if extra_keys is None:
            extra_keys = [None] * n
        elif not isinstance(extra_keys, (list, tuple)) or len(extra_keys) != n:
            raise ValueError(f"extra_keys must be None or a list of {n} entries (one per prompt)")
        self._begin_write()
        try:
            prompts = []
            seen = set()
            for i in range(n):
                seq = int(ids[i])
                if seq < 0:
                    raise ValueError(f"seq_ids[{i}] = {seq} is negative; sequence ids are 0..2**63-1")
                if seq in seen:
                    raise ValueError(f"seq_ids[{i}] = {seq} appears more than once")
                if self._sequences.find(seq) >= 0:
                    raise ValueError(f"seq_ids[{i}] = {seq} already exists")
                seen.add(seq)
                try:
                    prompts.append(self._prompt(None, token_ids[i], extra_keys[i]))
                except (TypeError, ValueError, OverflowError) as error:
                    raise type(error)(f"prompt {i}: {error}") from None
            results = []
            for i in range(n):
                try:
                    results.append(self._add_sequence(int(ids[i]), prompts[i][0], prompts[i][1], extra_keys[i]))
                except OutOfBlocksError:
                    break
            return results
        finally:
            self._end_write()

    cdef object _prompt(self, num_tokens, token_ids, extra_keys):
        """Check a prompt's arguments; return ``(num_tokens, token ids or None)``."""
        ids = None
        if token_ids is not None:
            ids = int_vector(token_ids, "token_ids", cnp.NPY_INT32)
            if ids is token_ids:
                ids = ids.copy()      # hashing may let another thread run: keep them still
            _check_token_ids(ids)
            if num_tokens is None:
                num_tokens = cnp.PyArray_DIM(ids, 0)
        elif self._cache is not None:
            raise ValueError("token_ids is required when prefix caching is on")
        if num_tokens is None:
            raise TypeError("add_sequence needs num_tokens or token_ids")
        if type(num_tokens) is not int:
            num_tokens = as_index(num_tokens, "num_tokens")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if ids is not None and cnp.PyArray_DIM(ids, 0) != num_tokens:
            raise ValueError(
                f"token_ids has {cnp.PyArray_DIM(ids, 0)} entries but num_tokens is {num_tokens}")
        if extra_keys is not None:
            if self._cache is None:
                raise ValueError("extra_keys is only used with enable_prefix_caching=True")
            if type(extra_keys) is not _prefix.ExtraKeys:
                # Not a subclass either: a block's keys are computed in the middle of a
                # change (as it fills), where only ExtraKeys' own checked fields and
                # code guarantee that nothing can fail or run anything else.
                raise TypeError(
                    f"extra_keys must be a pagetable.prefix.ExtraKeys (not a subclass) or "
                    f"None, got {type(extra_keys).__name__}")
        return num_tokens, ids

    cdef object _add_sequence(self, seq_id, num_tokens, token_ids, extra_keys):
        cdef int64_t seq = seq_arg(seq_id, "seq_id")
        num_tokens, ids = self._prompt(num_tokens, token_ids, extra_keys)
        if self._sequences.find(seq) >= 0:
            raise ValueError(f"seq_id = {seq} already exists")
        if self._cache is None and num_tokens > <int64_t>self._allocator.block_count() * self._block_size:
            # Can never fit (and is not worth sizing).  With prefix caching the prompt's
            # ids are already here, and the check below reports the need after its hits.
            raise OutOfBlocksError(-(-num_tokens // self._block_size), self._allocator.free_count())
        cdef int64_t n = num_tokens
        cdef int64_t need = self._blocks_needed(n)
        cdef int64_t num_hit = 0, num_full = 0, available = self._allocator.free_count()
        cdef PrefixCache cache = self._cache
        cdef const int32_t* id_data = NULL
        cdef uint8_t* digests = NULL
        cdef int32_t* hit_data = NULL
        cdef int64_t p
        if cache is not None:
            id_data = <const int32_t*>cnp.PyArray_DATA(ids)
            num_full = n // self._block_size
            hashes = np.empty(num_full * cache.digest_size, dtype=np.uint8)
            digests = <uint8_t*>cnp.PyArray_DATA(hashes)
            cache.prompt_hashes(id_data, num_full, extra_keys, digests)
            hits = empty(num_full, cnp.NPY_INT32)
            hit_data = <int32_t*>cnp.PyArray_DATA(hits)
            num_hit = self._longest_hit(digests, num_full, n, hit_data)
            need -= num_hit
            for p in range(num_hit):
                if self._allocator.refcounts()[hit_data[p]] == 0:
                    available -= 1
        if need > available:
            raise OutOfBlocksError(need, available)
        # Everything that can fail comes before the first change.
        slots = empty(n - num_hit * self._block_size, cnp.NPY_INT64)
        blocks = empty(need, cnp.NPY_INT32)
        cdef AppendResult result = new_result()
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* block_data = <block_id_t*>cnp.PyArray_DATA(blocks)
        cdef const block_id_t* data
        cdef int64_t first = num_hit * self._block_size
        self._sequences.reserve(1)
        cdef row_t row = self._table.create_row(seq)
        try:
            self._table.reserve_row(row, _with_room_to_grow(need + num_hit))
        except BaseException:
            self._table.drop_row(row)
            raise
        if num_hit:
            self._allocator.retain(hit_data, num_hit)
            self._table.append_to_row(row, hit_data, num_hit)   # room reserved above
        if need:
            self._allocator.take(need, block_data)
            self._table.append_to_row(row, block_data, need)   # room reserved above
        cdef int32_t slot = self._sequences.add(seq, row, <int32_t>n)
        data = self._table.row_blocks(row)
        # The GIL stays held: another thread's call may grow the table, and must
        # not do so while this loop reads it.
        for p in range(first, n):
            slot_data[p - first] = self._slot(data, p)
        if cache is not None:
            cache.taken(block_data, need)
            for p in range(first, n):
                cache.tokens[slot_data[p - first]] = id_data[p]
            cache.filled(data, num_hit, num_full, extra_keys, digests + num_hit * cache.digest_size)
            cache.requests += 1
            cache.queries += n
            cache.hits += first
            if extra_keys is not None:
                self._keys[slot] = extra_keys
        result.slots = slots
        result.num_cached_tokens = first
        return result

    cdef int64_t _longest_hit(self, const uint8_t* digests, int64_t num_full, int64_t n,
                              int32_t* hit_blocks) noexcept:
        """Blocks of the longest cached run of a prompt's hashes (at most (n - 1) // B)."""
        cdef int64_t k, limit = (n - 1) // self._block_size if n > 0 else 0
        cdef int32_t block
        if limit > num_full:
            limit = num_full
        for k in range(limit):
            block = self._cache.find(digests + k * self._cache.digest_size)
            if block < 0:
                return k
            hit_blocks[k] = block
        return limit

    def count_cached_tokens(self, token_ids, extra_keys=None):
        """Tokens of a prompt that ``add_sequence`` would find in the prefix cache now.

        Changes nothing (no statistics, no eviction order, no events).  0 without
        prefix caching.
        """
        num_tokens, ids = self._prompt(None, token_ids, extra_keys)
        if self._cache is None:
            return 0
        cdef int64_t n = num_tokens
        cdef int64_t num_full = n // self._block_size
        hashes = np.empty(num_full * self._cache.digest_size, dtype=np.uint8)
        hits = empty(num_full, cnp.NPY_INT32)
        self._cache.prompt_hashes(<const int32_t*>cnp.PyArray_DATA(ids), num_full, extra_keys,
                                  <uint8_t*>cnp.PyArray_DATA(hashes))
        self._read_begin()
        return self._longest_hit(<uint8_t*>cnp.PyArray_DATA(hashes), num_full, n,
                                 <int32_t*>cnp.PyArray_DATA(hits)) * self._block_size

    def reset_prefix_cache(self):
        """Forget every cached block; return how many hashes were dropped.

        Cached-free blocks become plain free blocks; blocks that running sequences
        hold stay theirs but are no longer offered to new prompts (their sequences
        register their later blocks as usual).  Records one ``AllBlocksCleared``
        event.  For instance after the model's weights change.  Without prefix
        caching, returns 0.
        """
        if self._cache is None:
            return 0
        self._begin_write()
        try:
            return self._cache.reset()
        finally:
            self._end_write()

    def take_events(self):
        """The KV-cache events recorded since the last call, as one ``KVEventBatch``.

        ``ts`` is the time of this call (``time.time()``); ``data_parallel_rank`` the
        manager's.  Empties the record.  Needs ``enable_kv_cache_events=True``.
        """
        if self._cache is None or self._cache.events is None:
            raise RuntimeError("take_events() needs KVCacheManager(..., enable_kv_cache_events=True)")
        self._begin_write()
        try:
            events = self._cache.events
            self._cache.events = []
        finally:
            self._end_write()
        return _event_batch(time.time(), events, self._dp_rank)

    def _block_hash(self, block):
        """The hash recorded for what ``block`` holds (bytes), or None (tests use it)."""
        cdef int32_t b = block_arg(block, "block")
        if self._cache is None or b >= self._allocator.block_count():
            return None
        hashes, _, known, _ = self._cache._arrays()
        if not known[b]:
            return None
        return hashes[b * self._cache.digest_size:(b + 1) * self._cache.digest_size].tobytes()

    @property
    def prefix_caching(self):
        """Whether this manager caches prefixes."""
        return self._cache is not None

    @property
    def hash_algorithm(self):
        """The block hash algorithm, or None without prefix caching."""
        return self._algorithm

    @property
    def none_hash(self):
        """The parent hash of every sequence's first block (bytes), or None."""
        return None if self._cache is None else self._cache.none_hash

    @property
    def num_cached_blocks(self):
        """Blocks registered in the prefix cache now (used or cached-free)."""
        if self._cache is None:
            return 0
        self._read_begin()
        return self._cache.registered

    @property
    def prefix_cache_stats(self):
        """A ``pagetable.prefix.PrefixCacheStats``: requests, queries, hits (tokens), evictions."""
        if self._cache is None:
            return _NO_STATS
        cdef PrefixCache cache = self._cache
        self._read_begin()
        # The four counters of one moment, read before anything can let a thread run.
        cdef int64_t requests = cache.requests, queries = cache.queries
        cdef int64_t hits = cache.hits, evictions = cache.evictions
        stats = self._stats
        # The same object while the counters stand still: engines read it every step,
        # and a checked dataclass costs microseconds to build.
        if (stats is None or stats.requests != requests or stats.queries != queries
                or stats.hits != hits or stats.evictions != evictions):
            stats = _prefix.PrefixCacheStats(requests, queries, hits, evictions)
            self._stats = stats
        return stats

    def append_tokens(self, seq_ids, num_new_tokens=1, token_ids=None):
        """Grow sequences by ``num_new_tokens`` each: one decode step, or more tokens.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Distinct existing sequence ids.
        num_new_tokens : int or 1-D array-like of int, default 1
            Tokens to add, one count for all or one per sequence; >= 0.
        token_ids : 1-D array-like of int, optional
            The new tokens' ids, sequence by sequence in input order (as many as the
            tokens added), each 0 .. 2**31 - 1.  Required with prefix caching: a block
            that becomes full is hashed and registered in the cache.

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
            return self._append_tokens(seq_ids, num_new_tokens, token_ids)
        finally:
            self._end_write()

    cdef object _append_tokens(self, seq_ids, num_new_tokens, token_ids):
        cdef _StepPlan plan
        inputs = self._plan_step(seq_ids, num_new_tokens, &plan)   # keeps plan's arrays alive
        cdef Py_ssize_t i, n = plan.n
        cdef const int32_t* slot_ids = plan.slots
        cdef const int64_t* counts = plan.counts
        cdef Py_ssize_t stride = plan.stride
        cdef int64_t need = plan.need, num_copies = plan.num_copies, num_slots = plan.num_slots
        cdef PrefixCache cache = self._cache
        cdef const int32_t* id_data = NULL
        cdef int64_t added = 0
        if token_ids is not None:
            ids = int_vector(token_ids, "token_ids", cnp.NPY_INT32)
            if ids is token_ids:
                ids = ids.copy()      # hashing may let another thread run: keep them still
            # Every count, also one too large to ever fit (which the plan leaves out of
            # num_slots): such a call is out of blocks, not short of token ids.
            for i in range(n):
                added = _saturating_add(added, counts[i * stride])
            if cnp.PyArray_DIM(ids, 0) != added:
                raise ValueError(
                    f"token_ids has {cnp.PyArray_DIM(ids, 0)} entries but the call adds "
                    f"{added} tokens")
            _check_token_ids(ids)
            id_data = <const int32_t*>cnp.PyArray_DATA(ids)
        elif cache is not None:
            raise ValueError("token_ids is required when prefix caching is on")
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
        # With prefix caching: (input index, first, end) of each sequence whose blocks
        # fill in this call, registered after the loop (see PrefixCache.record).
        filling = empty(3 * n if cache is not None else 0, cnp.NPY_INT64)
        cdef int64_t* fill_data = <int64_t*>cnp.PyArray_DATA(filling)
        cdef Py_ssize_t num_filling = 0
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
        if cache is not None:
            cache.taken(fresh_data, need)
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
                    if cache is not None:
                        # The copy holds what the shared block holds.
                        memcpy(cache.tokens + <int64_t>fresh_data[taken] * self._block_size,
                               cache.tokens + <int64_t>last * self._block_size,
                               <size_t>self._block_size * sizeof(int32_t))
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
            if cache is not None:
                for p in range(written - count, written):
                    cache.tokens[slot_data[p]] = id_data[p]
                if block_index(&self._geometry, tokens + count) > block_index(&self._geometry, tokens):
                    fill_data[3 * num_filling] = i
                    fill_data[3 * num_filling + 1] = block_index(&self._geometry, tokens)
                    fill_data[3 * num_filling + 2] = block_index(&self._geometry, tokens + count)
                    cache.record(data, fill_data[3 * num_filling + 1], fill_data[3 * num_filling + 2],
                                 self._keys.get(slot_ids[i]) if self._keys else None, NULL)
                    num_filling += 1
        # Registered in the same order as recorded: sequence by sequence, block by block.
        for p in range(num_filling):
            i = <Py_ssize_t>fill_data[3 * p]
            cache.register(self._table.row_blocks(records[slot_ids[i]].row), fill_data[3 * p + 1],
                           fill_data[3 * p + 2], self._keys.get(slot_ids[i]) if self._keys else None)
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
        cdef int32_t child_slot = self._sequences.add(
            child, child_row, self._sequences.slots[parent_slot].tokens)
        if self._keys and parent_slot in self._keys:
            self._keys[child_slot] = self._keys[parent_slot]

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
            if self._cache is None:
                self._allocator.release(self._table.row_blocks(row), self._table.row_length(row))
            else:
                # Tail first: of a sequence's cached blocks, the head is the likeliest
                # to be shared, so it is the last to be evicted.
                self._allocator.release_reversed(self._table.row_blocks(row), self._table.row_length(row))
                if self._keys:
                    self._keys.pop(slot_ids[i], None)
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

    def block_table(self, seq_ids, kernel_block_size=None):
        """Dense block table, int32 ``[len(seq_ids), W]`` padded with ``PAD_SLOT_ID``.

        ``W`` is the longest row in the batch.  Pair it with :meth:`seq_lens` for a
        PagedAttention kernel.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Existing sequence ids (repeats allowed).
        kernel_block_size : int, optional
            For a kernel that pages the cache in blocks of ``b`` tokens, a positive
            divisor of :attr:`block_size` ``B``: list kernel blocks instead, block
            ``m`` being kernel blocks ``m*k .. m*k + k - 1`` (``k = B // b``), a
            padded entry ``k`` padded ones.  A sequence of ``c`` tokens lists
            ``ceil(c / b)`` of them, so the table equals that of a manager of block
            size ``b``.  Slots need no conversion: ``m*B + o`` is
            ``(m*k + o//b)*b + o%b``.

        Returns
        -------
        numpy.ndarray of int32, ``[len(seq_ids), W]``

        Raises
        ------
        KeyError
            An unknown sequence id.
        TypeError, ValueError
            ``kernel_block_size`` is not a positive integer dividing the block size.
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        if kernel_block_size is not None:
            return self._kernel_block_table(
                ids, kernel_blocks_per_block(kernel_block_size, self._block_size))
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

    def flashinfer_layout(self, seq_ids, kernel_block_size=None):
        """FlashInfer's paged-KV inputs for a batch.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Existing sequence ids (repeats allowed).
        kernel_block_size : int, optional
            Pages of ``b`` tokens, a positive divisor of :attr:`block_size`: the
            pages are kernel blocks, as in :meth:`block_table`, and
            ``kv_last_page_len`` counts tokens in the last kernel block (``1 .. b``).
            Equal to the layout of a manager of block size ``b``.

        Returns
        -------
        kv_indptr : numpy.ndarray of int32, ``[B + 1]``
            Sequence ``i``'s pages are ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``.
        kv_indices : numpy.ndarray of int32, ``[nnz]``
            Block ids, sequence by sequence.
        kv_last_page_len : numpy.ndarray of int32, ``[B]``
            Tokens in each sequence's last block, ``1 .. block_size``; 0 for a sequence
            holding no token (it has no page at all).

        Raises
        ------
        KeyError
            An unknown sequence id.
        TypeError, ValueError
            ``kernel_block_size`` is not a positive integer dividing the block size.
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        if kernel_block_size is not None:
            return self._kernel_flashinfer_layout(
                ids, kernel_blocks_per_block(kernel_block_size, self._block_size))
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

    # Kernel blocks (see block_table).  The pool holds fewer than 2**31 tokens, so
    # every kernel block id m*k + j < num_blocks * B fits in int32.
    cdef inline int64_t _kernel_blocks_of(self, const SequenceSlot* record,
                                          const BlockGeometry* kernel, int64_t per_block) noexcept nogil:
        """Kernel blocks a sequence lists: ``ceil(tokens / b)``, within its row."""
        return min(blocks_for(kernel, record.tokens),
                   <int64_t>self._table.row_length(record.row) * per_block)

    cdef object _kernel_block_table(self, ids, int64_t per_block):
        """``block_table`` in kernel blocks, ``per_block`` to a block."""
        cdef BlockGeometry kernel = block_geometry(self._block_size // per_block)
        cdef Py_ssize_t i, j, n
        cdef const int32_t* slot_ids
        cdef const SequenceSlot* records
        cdef const SequenceSlot* record
        cdef int64_t width, count, epoch
        cdef cnp.npy_intp shape[2]
        cdef block_id_t* out
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            records = self._sequences.slots
            width = 0
            for i in range(n):
                width = max(width, self._kernel_blocks_of(&records[slot_ids[i]], &kernel, per_block))
            shape[0] = n
            shape[1] = width
            table = cnp.PyArray_EMPTY(2, shape, cnp.NPY_INT32, 0)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: the widths hold.
            out = <block_id_t*>cnp.PyArray_DATA(table)
            for i in range(n):
                record = &records[slot_ids[i]]
                count = self._kernel_blocks_of(record, &kernel, per_block)
                expand_to_kernel_blocks(self._table.row_blocks(record.row), count, per_block, out)
                for j in range(count, width):
                    out[j] = PAD
                out += width
            return table
        raise RuntimeError(_READ_KEPT_CHANGING)

    cdef object _kernel_flashinfer_layout(self, ids, int64_t per_block):
        """``flashinfer_layout`` in kernel blocks, ``per_block`` to a block."""
        cdef BlockGeometry kernel = block_geometry(self._block_size // per_block)
        cdef Py_ssize_t i, n
        cdef const int32_t* slot_ids
        cdef const SequenceSlot* records
        cdef const SequenceSlot* record
        cdef int64_t nnz, count, at, epoch
        cdef int32_t* indptr_data
        cdef block_id_t* indices_data
        cdef int32_t* last_data
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            records = self._sequences.slots
            nnz = 0
            for i in range(n):
                nnz += self._kernel_blocks_of(&records[slot_ids[i]], &kernel, per_block)
            if nnz > INT32_MAX:
                # Only a batch repeating ids can list this many pages.
                raise OverflowError(f"the batch lists {nnz} kernel blocks, more than int32 indptr can address")
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
                record = &records[slot_ids[i]]
                count = self._kernel_blocks_of(record, &kernel, per_block)
                expand_to_kernel_blocks(self._table.row_blocks(record.row), count, per_block,
                                        indices_data + at)
                at += count
                indptr_data[i + 1] = <int32_t>at
                last_data[i] = (<int32_t>(block_offset(&kernel, record.tokens - 1) + 1)
                                if record.tokens else 0)
            return indptr, indices, last_page_len
        raise RuntimeError(_READ_KEPT_CHANGING)

    def slot_mapping(self, seq_ids, num_tokens=1, *, dcp_world_size=1, dcp_rank=0, interleave=1,
                     kernel_block_size=None):
        """Slots of each sequence's last ``num_tokens`` tokens, for one rank of decode context parallel.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Existing sequence ids (repeats allowed).
        num_tokens : int or 1-D array-like of int, default 1
            Tokens per sequence, one count for all or one per sequence, each
            ``0 .. `` its length: the sequence's last positions ``c - num_tokens ..
            c - 1``.
        dcp_world_size : int, default 1
            Ranks ``W`` the KV cache is spread over; each block of ``B`` tokens is a
            virtual block of ``B / W`` tokens on every rank.
        dcp_rank : int, default 0
            The rank whose slots to return, ``0 .. W - 1``.
        interleave : int, default 1
            Consecutive positions a rank holds before the next rank's turn: position
            ``p`` is on rank ``(p // interleave) % W``.  ``W * interleave`` must
            divide :attr:`block_size`.
        kernel_block_size : int, optional
            The rank's kernel block size, a positive divisor of ``B / W``.  Checked
            only: the slot of a kernel-block table is the same (manager block ``m``
            is the rank's kernel blocks ``m*k .. m*k + k - 1``, ``k = B / W / b``).

        Returns
        -------
        numpy.ndarray of int64
            Sequence by sequence in input order.  For the rank's tokens, with
            ``o = p % B`` and ``m`` the block of ``p``:
            ``m * (B / W) + (o // (W * interleave)) * interleave + o % interleave``;
            ``PAD_SLOT_ID`` for other ranks' tokens and for tokens in a padded
            (released) block.  With ``W == 1`` these are the slots
            :meth:`append_tokens` returned for the tokens.

        Raises
        ------
        KeyError
            An unknown sequence id.
        TypeError, ValueError
            An argument out of range (named in the message).
        """
        cdef int64_t world = self._positive(dcp_world_size, "dcp_world_size")
        rank_value = as_index(dcp_rank, "dcp_rank")
        if not 0 <= rank_value < world:
            raise ValueError(f"dcp_rank must be in 0..{world - 1} (dcp_world_size {world}), got {rank_value}")
        cdef int64_t rank = rank_value
        cdef int64_t run = self._positive(interleave, "interleave")
        if self._block_size % (world * run):
            raise ValueError(
                f"dcp_world_size * interleave must divide the block size ({self._block_size}), "
                f"got {world} * {run}")
        cdef int64_t local_size = self._block_size // world
        if kernel_block_size is not None:
            kernel_blocks_per_block(kernel_block_size, local_size,
                                    of="block_size / dcp_world_size")
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef int64_t scalar = 0
        counts = self._last_counts(num_tokens, cnp.PyArray_DIM(ids, 0), &scalar)
        cdef const int64_t* count_data = &scalar
        cdef Py_ssize_t stride = 0
        if counts is not None:
            count_data = <const int64_t*>cnp.PyArray_DATA(counts)
            stride = 1
        cdef Py_ssize_t i, n
        cdef const int32_t* slot_ids
        cdef const SequenceSlot* record
        cdef const block_id_t* blocks
        cdef int64_t total, count, tokens, position, offset, epoch, bad
        cdef int64_t span = world * run
        cdef block_id_t block
        cdef slot_t* out_data
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            epoch = self._read_begin()
            slots = self._slots(ids, False)
            n = cnp.PyArray_DIM(slots, 0)
            slot_ids = <const int32_t*>cnp.PyArray_DATA(slots)
            total = 0
            bad = -1
            for i in range(n):
                count = count_data[i * stride]
                if count > self._sequences.slots[slot_ids[i]].tokens:
                    bad = i
                    break
                total += count
            out = empty(total if bad < 0 else 0, cnp.NPY_INT64)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run: lengths and rows hold.
            if bad >= 0:
                raise ValueError(
                    f"num_tokens[{bad if stride else 0}] = {count_data[bad * stride]} is more "
                    f"than sequence {(<const int64_t*>cnp.PyArray_DATA(ids))[bad]}'s "
                    f"{self._sequences.slots[slot_ids[bad]].tokens} tokens")
            out_data = <slot_t*>cnp.PyArray_DATA(out)
            for i in range(n):
                record = &self._sequences.slots[slot_ids[i]]
                blocks = self._table.row_blocks(record.row)
                tokens = record.tokens
                for position in range(tokens - count_data[i * stride], tokens):
                    block = blocks[block_index(&self._geometry, position)]
                    offset = self._block_offset(position)
                    if block == PAD or (offset // run) % world != rank:
                        out_data[0] = PAD
                    elif world == 1:
                        out_data[0] = <slot_t>block * self._block_size + offset
                    else:
                        out_data[0] = (<slot_t>block * local_size
                                       + (offset // span) * run + offset % run)
                    out_data += 1
            return out
        raise RuntimeError(_READ_KEPT_CHANGING)

    cdef int64_t _positive(self, value, str name) except -1:
        """A positive integer argument, or raise naming ``name``."""
        value = as_index(value, name)
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
        if value > INT32_MAX:
            raise ValueError(f"{name} must be at most {INT32_MAX}, got {value}")
        return value

    cdef object _last_counts(self, num_tokens, Py_ssize_t n, int64_t* scalar):
        """``slot_mapping``'s ``num_tokens``: an int64 array of ``n``, or None for a scalar.

        The upper bound, each sequence's length, is checked in the read itself.
        """
        if isinstance(num_tokens, np.ndarray) and num_tokens.ndim == 0:
            num_tokens = num_tokens.item()     # a 0-d array is a scalar count
        if isinstance(num_tokens, (list, tuple, np.ndarray)):
            counts = _int64_vector(num_tokens, "num_tokens")
            if counts is num_tokens:
                # Read twice (checked, then used to fill), and making the output in
                # between may let another thread run: it must not change them.
                counts = counts.copy()
            if counts.shape[0] != n:
                raise ValueError(
                    f"num_tokens must have one entry per sequence ({n}), got {counts.shape[0]}")
            if n and counts.min() < 0:
                bad = int(np.argmax(counts < 0))
                raise ValueError(f"num_tokens[{bad}] = {counts[bad]} is negative")
            return counts
        count = as_index(num_tokens, "num_tokens")
        if count < 0:
            raise ValueError(f"num_tokens = {count} is negative")
        if count > INT32_MAX and n:
            raise ValueError(f"num_tokens = {count} is more than any sequence holds")
        scalar[0] = min(count, INT32_MAX)
        return None

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
            capture = None if self._cache is None else _CacheCapture(self)
            if not self._read_current(epoch):
                continue
            # From here on nothing can let another thread run.
            token_data = <int64_t*>cnp.PyArray_DATA(tokens)
            id_data = <const int64_t*>cnp.PyArray_DATA(seq_ids)
            for i in range(count):
                slot = self._sequences.find(id_data[i])
                token_data[i] = self._sequences.slots[slot].tokens if slot >= 0 else -1
            num_free = self._allocator.capture(refcount, free_stack)
            if capture is not None:
                (<_CacheCapture>capture).take(self)
            # The capture is complete: what follows may let other threads run.
            state = _state.header("KVCacheManager")
            state["block_size"] = np.array(self._block_size, dtype=np.int64)
            state["seq_ids"] = seq_ids
            state["lengths"] = lengths
            state["blocks"] = blocks
            state["num_blocks"] = np.array(num_blocks, dtype=np.int64)
            state["refcount"] = refcount
            state["free_stack"] = free_stack[:num_free]
            state["tokens"] = tokens
            if capture is not None:
                (<_CacheCapture>capture).fill(self, state, free_stack[:num_free])
            return state
        raise RuntimeError(_READ_KEPT_CHANGING)

    @staticmethod
    def _from_state(state):
        """A manager built from a state dict; ``CorruptStateError`` if it is not valid."""
        _state.check_kind(state, "KVCacheManager")
        (block_size, num_blocks, seq_ids, lengths, blocks, tokens, refcount,
         free_stack) = _state.manager_state(state)
        cache_state = _state.prefix_state(state, num_blocks, block_size, free_stack.shape[0])
        lru = None
        if cache_state is not None:
            lru = free_stack[:cache_state["lru_count"]]
            free_stack = free_stack[cache_state["lru_count"]:]
        table_state = _state.header("PageTable")
        table_state.update(block_size=state["block_size"], seq_ids=seq_ids, lengths=lengths,
                           blocks=blocks)
        cdef PageTable table = PageTable._from_state(table_state)
        cdef BlockAllocator allocator = allocator_from_arrays(num_blocks, refcount, free_stack)
        cdef KVCacheManager manager
        if cache_state is None:
            manager = KVCacheManager(num_blocks, block_size)
        else:
            manager = KVCacheManager(
                num_blocks, block_size, enable_prefix_caching=True,
                hash_algorithm=cache_state["algorithm"], hash_seed=cache_state["seed"],
                enable_kv_cache_events=cache_state["events"],
                event_hash_format="int" if cache_state["int_hashes"] else "bytes",
                medium=cache_state["medium"], data_parallel_rank=cache_state["dp_rank"])
        cdef int64_t i, count = seq_ids.shape[0]
        table.mark_owned(True)
        allocator.mark_owned(True)
        manager._table = table
        manager._allocator = allocator
        manager._sequences.reserve(count)
        for i in range(count):
            manager._sequences.add(seq_ids[i], table.find_row(seq_ids[i]), <int32_t>tokens[i])
        if cache_state is not None:
            manager._restore_cache(cache_state, lru)
            try:
                manager.check()
            except AssertionError as error:
                raise _state.CorruptStateError(f"the prefix cache is inconsistent: {error}") from None
        return manager

    cdef _restore_cache(self, dict saved, lru):
        """Rebuild the prefix cache on the (new) allocator from validated saved arrays."""
        cdef PrefixCache cache = new_prefix_cache(
            self._allocator, self._block_size, saved["algorithm"], saved["seed"],
            saved["events"], "int" if saved["int_hashes"] else "bytes", saved["medium"])
        self._cache = cache
        cache._hash_arr[:] = saved["hashes"]
        cache._parent_arr[:] = saved["parents"]
        cache._known_arr[:] = saved["known"]
        cache._tokens_arr[:] = saved["tokens"]
        restore_lru(self._allocator, saved["cached"], lru)
        cdef int32_t block
        for block in np.flatnonzero(saved["cached"]):
            self._allocator.set_cached(block, False)
            if not cache._register(block):
                raise _state.CorruptStateError(f"cached block {block} shares its hash with another")
        cache.requests, cache.queries, cache.hits, cache.evictions = saved["stats"]
        if saved["block_extra"]:
            cache._extra = [None] * self._allocator.block_count()
            cache._extra_used = True
            for block, keys in saved["block_extra"].items():
                cache._extra[block] = keys
        cdef int32_t slot
        for seq, keys in saved["sequence_extra"].items():
            slot = self._sequences.find(seq)
            if slot < 0:
                raise _state.CorruptStateError(f"extra keys saved for sequence {seq}, which is not held")
            self._keys[slot] = keys

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
        - every block id in the table is inside the pool;
        - with prefix caching: free, used and cached-free blocks partition the pool
          (cached-free ones each once on the eviction list), every cached block is
          found under its hash and its hash matches its parent, tokens and extra
          keys, and every sequence's full blocks are hashed and chained.
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
        cdef PrefixCache cache = self._cache
        if cache is None:
            lost = np.flatnonzero((on_stack == 0) & (references == 0))
            if lost.size:
                raise AssertionError(f"block {int(lost[0])} is neither free nor in use (leaked)")
            return
        self._check_cache(seq_ids, lengths, all_blocks, references, on_stack)

    cdef _check_cache(self, seq_ids, lengths, all_blocks, references, on_stack):
        """The prefix cache's invariants (see ``check``)."""
        cdef PrefixCache cache = self._cache
        cdef int64_t num_blocks = self._allocator.block_count()
        cdef int64_t D = cache.digest_size, B = self._block_size
        cached = self._allocator.cached_flags().astype(bool)
        lru = empty(num_blocks, cnp.NPY_INT32)
        lru = lru[:self._allocator.capture_lru(lru)]
        if lru.size != self._allocator.lru_count():
            raise AssertionError(
                f"the cached-free list holds {lru.size} blocks but counts {self._allocator.lru_count()}")
        on_lru = np.bincount(lru, minlength=num_blocks) if lru.size else np.zeros(num_blocks, np.int64)
        if (on_lru > 1).any():
            raise AssertionError(f"block {int(np.argmax(on_lru > 1))} is on the cached-free list twice")
        # The three states partition the pool.
        free = (references == 0) & ~cached
        cached_free = (references == 0) & cached
        for name, where, expected in (("free", free, on_stack == 1), ("cached-free", cached_free, on_lru == 1)):
            wrong = np.flatnonzero(where != expected)
            if wrong.size:
                b = int(wrong[0])
                raise AssertionError(
                    f"block {b} (refcount {references[b]}, cached {bool(cached[b])}) is "
                    f"{'not ' if where[b] else ''}{name} but is {'' if expected[b] else 'not '}on its list")
        hashes, parents, known, tokens = cache._arrays()
        hashes = hashes.reshape(num_blocks, D)
        parents = parents.reshape(num_blocks, D)
        if cached.sum() != cache.registered:
            raise AssertionError(
                f"{int(cached.sum())} blocks are marked cached but the cache counts {cache.registered}")
        for b in np.flatnonzero(cached):
            b = int(b)
            digest = hashes[b].tobytes()
            if not known[b]:
                raise AssertionError(f"cached block {b} has no recorded hash")
            if cache._lookup(digest) != b:
                raise AssertionError(f"cached block {b}'s hash leads to block {cache._lookup(digest)}")
            if cache.recompute(b) != digest:
                raise AssertionError(
                    f"cached block {b}'s hash does not match its parent, tokens and extra keys")
        # Each sequence's full blocks: recorded, chained, and matching their tokens.
        cdef int64_t first = 0, length, full, k
        cdef int32_t slot
        for i in range(seq_ids.shape[0]):
            length = lengths[i]
            blocks = all_blocks[first:first + length]
            first += length
            slot = self._sequences.find(int(seq_ids[i]))
            full = self._sequences.slots[slot].tokens // B
            for k in range(full):
                b = int(blocks[k])
                if not known[b]:
                    raise AssertionError(f"sequence {int(seq_ids[i])}'s full block {k} ({b}) has no hash")
                expected_parent = cache.none_hash if k == 0 else hashes[int(blocks[k - 1])].tobytes()
                if parents[b].tobytes() != expected_parent:
                    raise AssertionError(
                        f"sequence {int(seq_ids[i])}'s block {k} ({b}) is not chained to its block {k - 1}")
                if cache.recompute(b) != hashes[b].tobytes():
                    raise AssertionError(
                        f"sequence {int(seq_ids[i])}'s block {k} ({b}) does not match its hash")
            for k in range(full, length):
                b = int(blocks[k])
                if cached[b]:
                    raise AssertionError(f"sequence {int(seq_ids[i])}'s partial block {b} is cached")


_state.register("KVCacheManager", KVCacheManager._from_state)
