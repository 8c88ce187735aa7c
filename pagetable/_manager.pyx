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
from libc.math cimport ceil

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._accept cimport block_arg, int_vector, seq_arg
from pagetable._allocator cimport BlockAllocator, allocator_from_arrays, restore_lru
from pagetable._blocks cimport BlockGeometry, block_geometry, block_index, block_offset, blocks_for
from pagetable._table_kernels cimport expand_to_kernel_blocks
from pagetable._buffers cimport empty, zeroed
from pagetable._persist cimport Persistent
from pagetable._prefix_cache cimport PrefixCache, new_prefix_cache
from pagetable._registry cimport SequenceRegistry, SequenceSlot
from pagetable._results cimport AdmissionResult, AppendResult, new_result
from cpython.dict cimport PyDict_Next
from cpython.ref cimport PyObject
from pagetable._table cimport PageTable, wait_while_set, _table_from_rows

import json
import operator
import time

import numpy as np

from pagetable import _state
from pagetable._convert import as_index, check_range, kernel_blocks_per_block
from pagetable import prefix as _prefix
from pagetable.events import _event_batch
from pagetable._results import OutOfBlocksError
from pagetable._admission import Admission

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


cdef enum:
    ATTENTION_FULL = 0
    ATTENTION_WINDOW = 1     # sliding window of _span tokens
    ATTENTION_CHUNK = 2      # chunked local attention, chunks of _span tokens


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
    int64_t lookahead            # draft positions reserved past each new length
    int64_t need                 # fresh blocks the step takes
    int64_t freed                # blocks its window releases free (count reaches 0)
    int64_t shared_tails         # growing sequences whose partial block may carry a hash
    Py_ssize_t too_long          # 1 + the first sequence that would pass 2**31 - 1 tokens, or 0
    int64_t num_copies           # copy-on-write copies it makes
    int64_t num_slots            # slots it returns


@cython.final
cdef class _AppendPlan:
    """A checked, planned ``append_tokens`` call (see KVCacheManager._append_plan)."""
    cdef _StepPlan step
    cdef object inputs          # the arrays ``step`` points into
    cdef object ids             # int32 token ids, or None
    cdef object ids64           # the checked int64 sequence ids
    cdef object manager
    cdef int64_t epoch

    @property
    def need(self):
        return self.step.need

    @property
    def available(self):
        return self.manager.num_free_blocks + self.step.freed


@cython.final
cdef class _AdmissionPlan:
    """A checked, planned ``add_sequences`` call (see KVCacheManager._admission_plan)."""
    cdef object manager
    cdef int64_t epoch
    cdef list seqs, lengths, arrays, keys     # per prompt: id, tokens, int32 ids, ExtraKeys
    cdef list digests, found                  # per prompt: uint8 digests, int32 found blocks
    cdef list hits, lows                      # per prompt: hit blocks H, first held block lo(H)
    cdef int64_t need_, available_

    @property
    def need(self):
        return self.need_

    @property
    def available(self):
        return self.available_

    @property
    def hit_blocks(self):
        return list(self.hits)


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
        int _attention            # ATTENTION_FULL / _WINDOW / _CHUNK
        int64_t _span             # the window or chunk, in tokens (0 for full)
        int32_t _group_idx        # the KV-cache group this manager is (events name it)
        dict _chains              # registry slot -> chain tail digest (see HYBRID.md)

    def __init__(self, num_blocks, block_size=16, *, enable_prefix_caching=False,
                 hash_algorithm="sha256", hash_seed=None, enable_kv_cache_events=False,
                 event_hash_format="int", medium="GPU", data_parallel_rank=None,
                 sliding_window=None, attention_chunk=None, group_idx=0):
        pass

    def __cinit__(self, num_blocks, block_size=16, *args, enable_prefix_caching=False,
                  hash_algorithm="sha256", hash_seed=None, enable_kv_cache_events=False,
                  event_hash_format="int", medium="GPU", data_parallel_rank=None,
                  sliding_window=None, attention_chunk=None, group_idx=0, **kwargs):
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
        self._chains = {}
        self._attention = ATTENTION_FULL
        self._span = 0
        if sliding_window is not None and attention_chunk is not None:
            raise ValueError("give sliding_window or attention_chunk, not both")
        if sliding_window is not None:
            if isinstance(sliding_window, (bool, np.bool_)):
                raise TypeError("sliding_window must be an int, got a bool")
            self._span = check_range(as_index(sliding_window, "sliding_window"), 1, INT32_MAX, "sliding_window")
            self._attention = ATTENTION_WINDOW
        if attention_chunk is not None:
            if isinstance(attention_chunk, (bool, np.bool_)):
                raise TypeError("attention_chunk must be an int, got a bool")
            self._span = check_range(as_index(attention_chunk, "attention_chunk"), 1, INT32_MAX, "attention_chunk")
            self._attention = ATTENTION_CHUNK
        if isinstance(group_idx, (bool, np.bool_)):
            raise TypeError("group_idx must be an int, got a bool")
        self._group_idx = check_range(as_index(group_idx, "group_idx"), 0, INT32_MAX, "group_idx")
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
        self._cache.group_idx = self._group_idx

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

    cdef inline void _fill_slots(self, const block_id_t* data, int64_t begin, int64_t end,
                                 slot_t* out) noexcept nogil:
        """``out[p - begin] = _slot(data, p)`` for ``begin <= p < end``, a block at a time
        (within a block the slots are consecutive, a loop the compiler vectorises)."""
        cdef int64_t p = begin, k, stop, base, B = self._block_size, j
        while p < end:
            k = block_index(&self._geometry, p)
            stop = min(end, (k + 1) * B)
            base = <slot_t>data[k] * B + (p - k * B) - (p - begin)
            for j in range(p - begin, stop - begin):
                out[j] = base + j
            p = stop

    cdef inline int64_t _first_needed(self, int64_t position) noexcept nogil:
        """The first position the token at ``position`` attends to."""
        if self._attention == ATTENTION_WINDOW:
            return position - self._span + 1 if position >= self._span else 0
        if self._attention == ATTENTION_CHUNK:
            return (position // self._span) * self._span
        return 0

    cdef inline int64_t _released_to(self, int64_t length) noexcept nogil:
        """Blocks a sequence of ``length`` tokens no longer needs (they are released)."""
        return block_index(&self._geometry, self._first_needed(length))

    cdef inline const uint8_t* _chain(self, int32_t slot):
        """The chain tail kept for a sequence with released blocks, or NULL."""
        tail = self._chains.get(slot) if self._chains else None
        return NULL if tail is None else <const uint8_t*><char*>tail

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

    cdef object _counts(self, values, Py_ssize_t n, int64_t* scalar, str name="num_new_tokens"):
        """Validate per-sequence counts (``name``): an int64 array of length ``n``, or
        None for a scalar.

        A scalar count is stored in ``scalar`` and read with stride 0, so a decode step
        allocates no count array.
        """
        if isinstance(values, np.ndarray) and values.ndim == 0:
            values = values.item()     # a 0-d array is a scalar count
        if isinstance(values, (list, tuple, np.ndarray)):
            counts = _int64_vector(values, name)
            if counts is values:
                # The plan and the step both read the counts, and reserving room in
                # between may let another thread run: it must not change them.
                counts = counts.copy()
            if counts.shape[0] != n:
                raise ValueError(
                    f"{name} must have one entry per sequence ({n}), got {counts.shape[0]}")
            if n and counts.min() < 0:
                bad = int(np.argmax(counts < 0))
                raise ValueError(f"{name}[{bad}] = {counts[bad]} is negative")
            return counts
        count = as_index(values, name)
        if count < 0:
            raise ValueError(f"{name}[0] = {count} is negative")
        if count > INT64_MAX:
            raise OverflowError(f"{name} = {count} does not fit in 64 bits")
        scalar[0] = count
        return None

    cdef object _slots_like(self, ids, slots):
        """The slots of ``ids`` given another manager's slots for them (``None``: none).

        A coordinator keeps its groups' registries in lockstep (the same calls in the
        same order), so one group's slots serve every group; each is confirmed against
        this registry's record (a load, not a hash lookup), and any mismatch falls back
        to the lookup.  ``ids`` were checked distinct by the manager that gave ``slots``.
        """
        if slots is None:
            return self._slots(ids, True)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(ids, 0)
        cdef const int64_t* id_data = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef const int32_t* slot_data = <const int32_t*>cnp.PyArray_DATA(slots)
        cdef int32_t used = self._sequences.slots_used()
        if cnp.PyArray_DIM(slots, 0) != n:
            return self._slots(ids, True)
        for i in range(n):
            if not 0 <= slot_data[i] < used or self._sequences.slots[slot_data[i]].seq_id != id_data[i]:
                return self._slots(ids, True)
        return slots

    cdef object _plan_step(self, seq_ids, num_new_tokens, _StepPlan* plan, num_lookahead=0,
                           like_ids=None, like_slots=None):
        """Check the arguments of a step and plan it into ``plan`` (nothing changes).

        Returns the arrays ``plan`` points into; the caller keeps them while it uses
        the plan.  A scalar count lives in ``plan.scalar`` and is read with stride 0.
        ``like_ids`` / ``like_slots``: another group's checked ids and slots for the
        same call (see ``_slots_like``).
        """
        ids = _int64_vector(seq_ids, "seq_ids") if like_ids is None else like_ids
        slots = self._slots(ids, True) if like_ids is None else self._slots_like(like_ids, like_slots)
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
        if isinstance(num_lookahead, (bool, np.bool_)):
            raise TypeError("num_lookahead must be an int, got a bool")
        plan.lookahead = check_range(as_index(num_lookahead, "num_lookahead"), 0, INT32_MAX, "num_lookahead")
        plan.num_copies = 0
        plan.num_slots = 0
        plan.freed = 0
        plan.shared_tails = 0
        plan.too_long = 0
        plan.need = self._plan(plan)
        if plan.too_long:
            raise OverflowError(
                f"sequence {self._sequences.slots[plan.slots[plan.too_long - 1]].seq_id} would hold "
                f"more than 2**31 - 1 tokens")
        return slots, counts, ids

    cdef int64_t _plan(self, _StepPlan* plan) noexcept:
        """Blocks a growth call needs (new blocks plus copy-on-write copies).

        Mirrors the execution exactly: the window releases of every sequence first
        (``plan.freed`` counts the blocks whose count they bring to 0), then the
        sequences in input order, where a shared partial block stops needing a copy
        once the earlier sharers in the call have moved off it or released it
        (counted in ``_pending``, scratch by block id, reset before returning).
        Runs with the GIL held because of that shared scratch.
        """
        cdef Py_ssize_t i, n = plan.n
        cdef const int32_t* slots = plan.slots
        cdef const int64_t* counts = plan.counts
        cdef Py_ssize_t count_stride = plan.stride
        cdef int64_t lookahead = plan.lookahead
        cdef int64_t need = 0, copies = 0, slot_count = 0, freed = 0, tokens, count, k, end, add
        cdef int64_t limit = <int64_t>self._allocator.block_count() * self._block_size
        cdef int32_t length
        cdef row_t row
        cdef block_id_t last
        cdef const block_id_t* data
        cdef const int32_t* refcount = self._allocator.refcounts()
        cdef int32_t* pending = &self._pending[0]
        cdef const SequenceSlot* records = self._sequences.slots
        cdef bint windowed = self._attention != ATTENTION_FULL
        cdef bint releasing = False
        cdef bint any_shared = self._allocator.shared_count() > 0
        if windowed and not any_shared:
            # Every held block is held once: each release frees its block, and no
            # copy-on-write count needs the scratch.  One pass over the records.
            for i in range(n):
                if counts[i * count_stride] == 0 and lookahead == 0:
                    continue
                end = self._released_to(records[slots[i]].tokens)
                if end > records[slots[i]].live:
                    freed += end - records[slots[i]].live
        elif windowed:
            for i in range(n):
                if counts[i * count_stride] == 0 and lookahead == 0:
                    continue
                end = self._released_to(records[slots[i]].tokens)
                if end <= records[slots[i]].live:
                    continue        # most steps: nothing left the window (the row is not read)
                releasing = True
                data = self._table.row_blocks(records[slots[i]].row)
                for k in range(records[slots[i]].live, end):
                    if refcount[data[k]] - pending[data[k]] == 1:
                        freed += 1
                    pending[data[k]] += 1
        cdef int64_t shared_tails = 0
        for i in range(n):
            count = counts[i * count_stride]
            if count == 0 and lookahead == 0:
                continue
            row = records[slots[i]].row
            tokens = records[slots[i]].tokens
            length = self._table.row_length(row)
            slot_count = _saturating_add(slot_count, count)
            shared_tails += records[slots[i]].shared_tail
            k = block_index(&self._geometry, tokens)
            # Drafts are written too: a reserving call copies a shared partial block.
            # Without any shared block (no fork, no prefix hit) nothing is copied.
            if any_shared and self._block_offset(tokens) and k < length:   # k < length holds; a tampered table may break it
                last = self._table.row_blocks(row)[k]
                if refcount[last] - pending[last] > 1:
                    need += 1
                    copies += 1
                    pending[last] += 1
            if count > limit or lookahead > limit:
                # Can never fit; the exact need all the same (as the reference reports
                # it), computed so that no sum can overflow: ceil((tokens + count) / B)
                # is count // B + ceil((tokens + count % B) / B).
                add = count // self._block_size + lookahead // self._block_size - length
                add += self._blocks_needed(tokens + count % self._block_size + lookahead % self._block_size)
            else:
                add = self._blocks_needed(tokens + count + lookahead) - length
            if add > 0:
                need = _saturating_add(need, add)
            if windowed and tokens + count + lookahead > INT32_MAX and plan.too_long == 0:
                # A window's pool does not bound its sequences' lengths; int32 does.
                plan.too_long = i + 1
        if copies or releasing:
            for i in range(n):
                if counts[i * count_stride] == 0 and lookahead == 0:
                    continue
                row = records[slots[i]].row
                if releasing:
                    end = self._released_to(records[slots[i]].tokens)
                    if end > records[slots[i]].live:
                        data = self._table.row_blocks(row)
                        for k in range(records[slots[i]].live, end):
                            pending[data[k]] = 0
                if copies:
                    k = block_index(&self._geometry, records[slots[i]].tokens)
                    if k < self._table.row_length(row):
                        pending[self._table.row_blocks(row)[k]] = 0
        plan.num_copies = copies
        plan.num_slots = slot_count
        plan.freed = freed
        plan.shared_tails = shared_tails
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
            seq = seq_arg(seq_id, "seq_id")
            num_tokens, ids = self._prompt(num_tokens, token_ids, extra_keys)
            if self._sequences.find(seq) >= 0:
                raise ValueError(f"seq_id = {seq} already exists")
            if (self._cache is None
                    and num_tokens > <int64_t>self._allocator.block_count() * self._block_size):
                # Can never fit (and is not worth sizing).  With prefix caching the
                # prompt's ids are already here, and the plan reports the need after hits.
                raise OutOfBlocksError(-(-num_tokens // self._block_size), self._allocator.free_count())
            if self._cache is None and num_tokens <= INT32_MAX:
                return self._admit_one(seq, num_tokens)
            return self._admit_plan(self._plan_prompts([seq], [num_tokens], [ids], [extra_keys], None))[0]
        finally:
            self._end_write()

    def add_sequences(self, seq_ids, num_tokens=None, token_ids=None, extra_keys=None):
        """Admit several prompts at once, all or nothing.

        Parameters
        ----------
        seq_ids : 1-D array-like of int
            Distinct new sequence ids.
        num_tokens : 1-D array-like of int, optional
            Each prompt's length; defaults to the lengths of ``token_ids``.
        token_ids : sequence of 1-D array-likes of int, optional
            Each prompt's token ids (one entry per id); required with prefix caching.
        extra_keys : sequence of ExtraKeys or None, optional
            One entry per prompt (None for a prompt without), or None for all.

        Returns
        -------
        AdmissionResult
            Every prompt's slots in one array (``slots``, ``num_cached_tokens``,
            ``query_start_loc``); ``result[i]`` is prompt ``i``'s AppendResult, as
            ``add_sequence`` returns it.  A later prompt may hit blocks an earlier
            prompt of the same call registers.

        Raises
        ------
        OutOfBlocksError
            The pool cannot hold every prompt; nothing changes.
        ValueError, KeyError, TypeError
            A bad argument anywhere in the call; checked before anything changes.
        """
        self._begin_write()
        try:
            if self._cache is None and token_ids is None and extra_keys is None and num_tokens is not None:
                result = self._admit_counts(seq_ids, num_tokens)
                if result is not None:
                    return result
            seqs, lengths, arrays, keys = self._prompts(seq_ids, num_tokens, token_ids, extra_keys)
            return self._admit_plan(self._plan_prompts(seqs, lengths, arrays, keys, None))
        finally:
            self._end_write()

    cdef AppendResult _admit_one(self, int64_t seq, int64_t N):
        """``add_sequence`` without prefix caching (``seq`` checked new, ``N`` checked)."""
        cdef int64_t need = self._blocks_needed(N), p
        if need > self._allocator.free_count():
            raise OutOfBlocksError(need, self._allocator.free_count())
        self._sequences.reserve(1)
        cdef AppendResult result = new_result()
        result.slots = empty(N, cnp.NPY_INT64)
        blocks = empty(need, cnp.NPY_INT32)
        cdef row_t row = self._table.create_row(seq)
        try:
            self._table.reserve_row(row, _with_room_to_grow(need))
        except BaseException:
            self._table.drop_row(row)
            raise
        cdef block_id_t* fresh = <block_id_t*>cnp.PyArray_DATA(blocks)
        if need:
            self._allocator.take(need, fresh)
            self._table.append_to_row(row, fresh, need)    # room reserved above
        self._sequences.add(seq, row, <int32_t>N)
        cdef const block_id_t* data = self._table.row_blocks(row)
        self._fill_slots(data, 0, N, <slot_t*>cnp.PyArray_DATA(result.slots))
        return result

    cdef object _admit_counts(self, seq_ids, num_tokens):
        """``add_sequences`` without prefix caching, in one pass with no object per prompt.

        Returns None, having changed nothing, for anything but a batch it can admit:
        the general path then raises the error it names (or admits it).
        """
        ids = _int64_vector(seq_ids, "seq_ids")
        counts = _int64_vector(num_tokens, "num_tokens")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(ids, 0)
        if cnp.PyArray_DIM(counts, 0) != n:
            return None
        cdef const int64_t* seqs = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef const int64_t* lengths = <const int64_t*>cnp.PyArray_DATA(counts)
        cdef int64_t total_slots = 0, total_blocks = 0, need, p, N
        cdef bint increasing = True
        for i in range(n):
            if seqs[i] < 0 or not 0 <= lengths[i] <= INT32_MAX or self._sequences.find(seqs[i]) >= 0:
                return None
            if i and seqs[i] <= seqs[i - 1]:
                increasing = False
            total_slots += lengths[i]
            total_blocks += self._blocks_needed(lengths[i])
        if not increasing and len(set(ids.tolist())) != n:
            return None
        if total_blocks > self._allocator.free_count():
            raise OutOfBlocksError(total_blocks, self._allocator.free_count())
        # Everything that can fail comes before the first change.
        self._sequences.reserve(n)
        slots = empty(total_slots, cnp.NPY_INT64)
        query_start = empty(n + 1, cnp.NPY_INT64)
        blocks = empty(total_blocks, cnp.NPY_INT32)
        cdef int64_t* loc = <int64_t*>cnp.PyArray_DATA(query_start)
        cdef slot_t* out = <slot_t*>cnp.PyArray_DATA(slots)
        cdef block_id_t* fresh = <block_id_t*>cnp.PyArray_DATA(blocks)
        result = AdmissionResult.__new__(AdmissionResult)
        (<AdmissionResult>result).slots = slots
        (<AdmissionResult>result).num_cached_tokens = zeroed(n, cnp.NPY_INT64)
        (<AdmissionResult>result).query_start_loc = query_start
        rows = empty(n, cnp.NPY_INT32)
        cdef int32_t* row_data = <int32_t*>cnp.PyArray_DATA(rows)
        cdef Py_ssize_t made = 0
        try:
            self._table.reserve_sequences(n)
            for i in range(n):
                row_data[i] = self._table.create_row(seqs[i])
                made += 1
                self._table.reserve_row(row_data[i], _with_room_to_grow(self._blocks_needed(lengths[i])))
        except BaseException:
            for i in range(made):
                self._table.drop_row(row_data[i])
            raise
        self._allocator.take(total_blocks, fresh)
        loc[0] = 0
        cdef const block_id_t* data
        cdef int32_t slot
        for i in range(n):
            N = lengths[i]
            need = self._blocks_needed(N)
            if need:
                self._table.append_to_row(row_data[i], fresh, need)   # room reserved above
            fresh += need
            slot = self._sequences.add(seqs[i], row_data[i], <int32_t>N)
            data = self._table.row_blocks(row_data[i])
            self._fill_slots(data, 0, N, out)
            out += N
            loc[i + 1] = loc[i] + N
        return result

    def _admission_plan(self, seq_ids, num_tokens=None, token_ids=None, extra_keys=None,
                        hit_blocks=None):
        """Check and plan an ``add_sequences`` call; change nothing (a coordinator hook).

        ``hit_blocks``: None for the manager's own hits, else one hit (in blocks) per
        prompt, each one ``_hit_mask`` accepts.  The plan (``need``, ``available``) is
        valid until the manager next changes.
        """
        seqs, lengths, arrays, keys = self._prompts(seq_ids, num_tokens, token_ids, extra_keys)
        if hit_blocks is not None:
            hit_blocks = [int(h) for h in _int64_vector(hit_blocks, "hit_blocks")]
            if len(hit_blocks) != len(seqs):
                raise ValueError(f"hit_blocks has {len(hit_blocks)} entries for {len(seqs)} prompts")
        self._read_begin()
        return self._plan_prompts(seqs, lengths, arrays, keys, hit_blocks)

    def _admit(self, _AdmissionPlan plan):
        """Carry out a plan of ``_admission_plan`` made since the last change."""
        if plan.manager is not self or plan.epoch != self._epoch:
            raise RuntimeError("the plan is stale: the manager changed since it was made")
        self._begin_write()
        try:
            return self._admit_plan(plan)
        finally:
            self._end_write()

    cdef tuple _prompts(self, seq_ids, num_tokens, token_ids, extra_keys):
        """Check a batch of prompts; ``(ids, counts, token id arrays, keys)`` as lists."""
        ids = _int64_vector(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(ids, 0)
        if token_ids is not None:
            if not isinstance(token_ids, (list, tuple)):
                raise TypeError(
                    f"token_ids must be a list of arrays, one per sequence, got {type(token_ids).__name__}")
            if len(token_ids) != n:
                raise ValueError(f"token_ids has {len(token_ids)} prompts for {n} seq_ids")
        elif self._cache is not None:
            raise ValueError("token_ids is required when prefix caching is on")
        if num_tokens is not None:
            counts = _int64_vector(num_tokens, "num_tokens")
            if cnp.PyArray_DIM(counts, 0) != n:
                raise ValueError(f"num_tokens has {cnp.PyArray_DIM(counts, 0)} entries for {n} seq_ids")
        elif token_ids is None:
            raise TypeError("add_sequences needs num_tokens or token_ids")
        if extra_keys is None:
            extra_keys = [None] * n
        elif not isinstance(extra_keys, (list, tuple)) or len(extra_keys) != n:
            raise ValueError(f"extra_keys must be None or a list of {n} entries (one per prompt)")
        seqs, lengths, arrays, keys = [], [], [], []
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
                count, array = self._prompt(None if num_tokens is None else int(counts[i]),
                                            None if token_ids is None else token_ids[i],
                                            extra_keys[i])
            except (TypeError, ValueError, OverflowError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
            seqs.append(seq)
            lengths.append(count)
            arrays.append(array)
            keys.append(extra_keys[i])
        return seqs, lengths, arrays, keys

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

    cdef object _found(self, const uint8_t* digests, int64_t limit, dict pending):
        """Per block ``k < limit`` of a prompt: the cached block under its hash (>= 0),
        ``-2 - j`` for block ``k`` of prompt ``j`` of the call (``pending``), or -1."""
        found = empty(limit, cnp.NPY_INT32)
        cdef int32_t* data = <int32_t*>cnp.PyArray_DATA(found)
        cdef int64_t k, D = self._cache.digest_size
        for k in range(limit):
            data[k] = self._cache.find(digests + k * D)
            if data[k] < 0 and pending:
                j = pending.get(digests[k * D:(k + 1) * D])
                if j is not None:
                    data[k] = -2 - <int32_t>j
        return found

    cdef object _servable(self, found):
        """Entry ``H`` (0 .. limit): whether blocks ``lo(H) .. H - 1`` are all found."""
        cdef int64_t limit = cnp.PyArray_DIM(found, 0), H, last_miss = -1
        cdef const int32_t* data = <const int32_t*>cnp.PyArray_DATA(found)
        mask = np.zeros(limit + 1, dtype=bool)
        cdef uint8_t* out = <uint8_t*>cnp.PyArray_DATA(mask)
        for H in range(limit + 1):
            if H and data[H - 1] == -1:
                last_miss = H - 1
            out[H] = last_miss < self._released_to(H * self._block_size)
        return mask

    cdef int64_t _hit_limit(self, int64_t n) noexcept:
        """The most blocks a prompt of ``n`` tokens may hit (the last token is computed)."""
        cdef int64_t limit = (n - 1) // self._block_size if n > 0 else 0
        return min(limit, n // self._block_size)

    def _hit_mask(self, token_ids, extra_keys=None):
        """Entry ``H``: whether this manager could serve a hit of ``H`` blocks of the
        prompt now (a coordinator hook; changes nothing)."""
        num_tokens, ids = self._prompt(None, token_ids, extra_keys)
        cdef int64_t n = num_tokens
        if self._cache is None:
            return np.ones(1, dtype=bool)
        cdef int64_t num_full = n // self._block_size
        hashes = np.empty(num_full * self._cache.digest_size, dtype=np.uint8)
        self._cache.prompt_hashes(<const int32_t*>cnp.PyArray_DATA(ids), num_full, extra_keys,
                                  <uint8_t*>cnp.PyArray_DATA(hashes))
        cdef int64_t epoch
        cdef int attempt
        for attempt in range(READ_ATTEMPTS):
            # The lookups read only the map and fixed-size arrays; a change that ran
            # meanwhile (an allocation may let another thread run) means read again.
            epoch = self._read_begin()
            mask = self._servable(self._found(<uint8_t*>cnp.PyArray_DATA(hashes), self._hit_limit(n), None))
            if self._read_current(epoch):
                return mask
        raise RuntimeError(_READ_KEPT_CHANGING)

    cdef _AdmissionPlan _plan_prompts(self, list seqs, list lengths, list arrays, list keys,
                                      list forced):
        """Steps 1-3 of ``add_sequences`` (docs/HYBRID.md); changes nothing."""
        cdef _AdmissionPlan plan = _AdmissionPlan.__new__(_AdmissionPlan)
        cdef PrefixCache cache = self._cache
        cdef Py_ssize_t i, n = len(seqs)
        cdef int64_t N, F, H, lo, k, limit, need = 0, D = cache.digest_size if cache is not None else 0
        cdef const int32_t* refcount = self._allocator.refcounts()
        cdef const int32_t* found_data
        cdef uint8_t* digest_data
        plan.manager = self
        plan.epoch = self._epoch
        plan.seqs, plan.lengths, plan.arrays, plan.keys = seqs, lengths, arrays, keys
        plan.digests, plan.found, plan.hits, plan.lows = [], [], [], []
        revived = set()
        pending = {} if forced is None else None
        for i in range(n):
            N = lengths[i]
            H = lo = 0
            found = None
            hashes = None
            if cache is not None:
                F = N // self._block_size
                hashes = np.empty(F * D, dtype=np.uint8)
                digest_data = <uint8_t*>cnp.PyArray_DATA(hashes)
                cache.prompt_hashes(<const int32_t*>cnp.PyArray_DATA(arrays[i]), F, keys[i], digest_data)
                limit = self._hit_limit(N)
                found = self._found(digest_data, limit, pending)
                mask = self._servable(found)
                if forced is None:
                    H = int(np.flatnonzero(mask).max())
                else:
                    H = forced[i]
                    if not 0 <= H <= limit or not mask[H]:
                        raise ValueError(f"hit_blocks[{i}] = {H} is not a hit this manager can serve now")
                lo = self._released_to(H * self._block_size)
                found_data = <const int32_t*>cnp.PyArray_DATA(found)
                for k in range(lo, H):
                    if found_data[k] >= 0 and refcount[found_data[k]] == 0:
                        revived.add(found_data[k])
                if pending is not None:
                    for k in range(lo, F):
                        pending.setdefault(hashes[k * D:(k + 1) * D].tobytes(), i)
            plan.digests.append(hashes)
            plan.found.append(found)
            plan.hits.append(H)
            plan.lows.append(lo)
            need = _saturating_add(need, self._blocks_needed(N) - H)
        plan.need_ = need
        plan.available_ = self._allocator.free_count() - len(revived)
        return plan

    cdef AdmissionResult _admit_plan(self, _AdmissionPlan plan):
        """Step 4 of ``add_sequences``: the plan, made under this change, carried out."""
        if plan.need_ > plan.available_:
            raise OutOfBlocksError(plan.need_, plan.available_)
        cdef PrefixCache cache = self._cache
        cdef Py_ssize_t i, n = len(plan.seqs)
        cdef int64_t N, F, H, lo, k, fresh, p, B = self._block_size
        cdef int64_t D = cache.digest_size if cache is not None else 0
        cdef int64_t total_slots = 0, total_fresh = 0
        cdef int32_t* found_data
        cdef int32_t block, slot
        cdef row_t row
        cdef const block_id_t* data
        cdef slot_t* slot_data
        cdef int64_t* loc
        cdef int64_t* cached
        cdef int64_t* fresh_at
        cdef block_id_t* fresh_blocks
        for i in range(n):
            total_slots += <int64_t>plan.lengths[i] - <int64_t>plan.hits[i] * B
            total_fresh += self._blocks_needed(plan.lengths[i]) - <int64_t>plan.hits[i]
        # Everything that can fail comes before the first change: the rows, their
        # room, the registry's room and every output array.
        self._sequences.reserve(n)
        slots = empty(total_slots, cnp.NPY_INT64)
        query_start = empty(n + 1, cnp.NPY_INT64)
        num_cached = empty(n, cnp.NPY_INT64)
        blocks = empty(total_fresh, cnp.NPY_INT32)
        fresh_offsets = empty(n + 1, cnp.NPY_INT64)
        loc = <int64_t*>cnp.PyArray_DATA(query_start)
        cached = <int64_t*>cnp.PyArray_DATA(num_cached)
        fresh_at = <int64_t*>cnp.PyArray_DATA(fresh_offsets)
        fresh_blocks = <block_id_t*>cnp.PyArray_DATA(blocks)
        loc[0] = fresh_at[0] = 0
        for i in range(n):
            cached[i] = <int64_t>plan.hits[i] * B
            loc[i + 1] = loc[i] + <int64_t>plan.lengths[i] - cached[i]
            fresh_at[i + 1] = fresh_at[i] + self._blocks_needed(plan.lengths[i]) - <int64_t>plan.hits[i]
        result = AdmissionResult.__new__(AdmissionResult)
        (<AdmissionResult>result).slots = slots
        (<AdmissionResult>result).num_cached_tokens = num_cached
        (<AdmissionResult>result).query_start_loc = query_start
        rows = []
        try:
            for i in range(n):
                row = self._table.create_row(plan.seqs[i])
                rows.append(row)
                self._table.reserve_row(row, _with_room_to_grow(self._blocks_needed(plan.lengths[i])))
        except BaseException:
            for row in rows:
                self._table.drop_row(row)
            raise
        # Every cached hit first, so that the call's own takes cannot evict one.
        for i in range(n):
            if plan.found[i] is not None:
                found_data = <int32_t*>cnp.PyArray_DATA(plan.found[i])
                for k in range(plan.lows[i], plan.hits[i]):
                    if found_data[k] >= 0:
                        self._allocator.retain(&found_data[k], 1)
        for i in range(n):
            N = plan.lengths[i]
            H = plan.hits[i]
            lo = plan.lows[i]
            row = rows[i]
            block = PAD
            for k in range(lo):
                self._table.append_to_row(row, &block, 1)   # room reserved above
            if H > lo:
                found_data = <int32_t*>cnp.PyArray_DATA(plan.found[i])
                for k in range(lo, H):
                    block = found_data[k]
                    if block < 0:
                        # Block k of an earlier prompt of this call: it holds it now.
                        block = self._table.row_blocks(rows[-2 - found_data[k]])[k]
                        self._allocator.retain(&block, 1)
                    self._table.append_to_row(row, &block, 1)
            fresh = fresh_at[i + 1] - fresh_at[i]
            if fresh:
                self._allocator.take(fresh, fresh_blocks + fresh_at[i])
                self._table.append_to_row(row, fresh_blocks + fresh_at[i], fresh)
            slot = self._sequences.add(plan.seqs[i], row, <int32_t>N)
            self._sequences.slots[slot].live = <int32_t>lo
            data = self._table.row_blocks(row)
            slot_data = <slot_t*>cnp.PyArray_DATA(slots) + loc[i]
            # The GIL stays held: another thread's call may grow the table, and must
            # not do so while this loop reads it.
            self._fill_slots(data, H * B, N, slot_data)
            if cache is not None:
                cache.taken(fresh_blocks + fresh_at[i], fresh)
                for p in range(H * B, N):
                    cache.tokens[slot_data[p - H * B]] = (<const int32_t*>cnp.PyArray_DATA(plan.arrays[i]))[p]
                if lo:
                    self._chains[slot] = plan.digests[i][(lo - 1) * D:lo * D].tobytes()
                F = N // B
                cache.filled(data, H, F, plan.keys[i],
                             <uint8_t*>cnp.PyArray_DATA(plan.digests[i]) + H * D, self._chain(slot))
                cache.requests += 1
                cache.queries += N
                cache.hits += H * B
                if plan.keys[i] is not None:
                    self._keys[slot] = plan.keys[i]
        return result

    def count_cached_tokens(self, token_ids, extra_keys=None):
        """Tokens of a prompt that ``add_sequence`` would find in the prefix cache now.

        Changes nothing (no statistics, no eviction order, no events).  0 without
        prefix caching.
        """
        mask = self._hit_mask(token_ids, extra_keys)
        return int(np.flatnonzero(mask).max()) * self._block_size

    def can_admit(self, num_tokens=None, token_ids=None, extra_keys=None, watermark=0.0):
        """Whether a new prompt fits now, and whether it could ever fit.

        Parameters
        ----------
        num_tokens : int, optional
            The prompt's length (defaults to ``len(token_ids)``).
        token_ids, extra_keys
            As for ``add_sequence``; with prefix caching the prompt's hits count.
        watermark : float, default 0.0
            Fraction of the pool to keep free, in ``[0, 1)``.

        Returns
        -------
        Admission
            ``(fits_now, could_ever_fit, need)``: ``need`` is the fresh blocks after
            the prompt's hits now.  Changes nothing.
        """
        if isinstance(watermark, (bool, np.bool_)) or not isinstance(watermark, (int, float, np.floating, np.integer)):
            raise TypeError(f"watermark must be a float, got {type(watermark).__name__}")
        watermark = float(watermark)
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        cdef int64_t n, reserve, need, available, epoch
        cdef int attempt
        reserve = <int64_t>ceil(watermark * self._allocator.block_count())
        if token_ids is None and self._cache is not None:
            # Without the ids there are no hits to count: the prompt's every block.
            if extra_keys is not None and type(extra_keys) is not _prefix.ExtraKeys:
                raise TypeError(f"extra_keys must be a pagetable.prefix.ExtraKeys or None, "
                                f"got {type(extra_keys).__name__}")
            if num_tokens is None:
                raise TypeError("can_admit needs num_tokens or token_ids")
            n = as_index(num_tokens, "num_tokens")
            if n < 0:
                raise ValueError(f"num_tokens must be >= 0, got {n}")
            self._read_begin()
            need = self._blocks_needed(n)
            available = self._allocator.free_count()
        else:
            count, ids = self._prompt(num_tokens, token_ids, extra_keys)
            n = count
            for attempt in range(READ_ATTEMPTS):
                epoch = self._read_begin()
                plan = self._plan_prompts([-1], [n], [ids], [extra_keys], None)
                if self._read_current(epoch):
                    break
            else:
                raise RuntimeError(_READ_KEPT_CHANGING)
            need, available = plan.need_, plan.available_
        return Admission(need <= available - reserve,
                         self._blocks_needed(n) <= self._allocator.block_count() - reserve,
                         int(need))

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

    def append_tokens(self, seq_ids, num_new_tokens=1, token_ids=None, num_lookahead=0):
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
        num_lookahead : int, default 0
            Positions to reserve past each sequence's new length for draft tokens
            (speculative decoding); their slots are ``lookahead_slots``.  Reserved
            blocks stay the sequence's; a later append commits into them.

        Returns
        -------
        AppendResult
            ``slots`` (int64) of every new token, sequence by sequence in input order;
            ``copy_src`` / ``copy_dst`` (int32), the copy-on-write copies to perform
            before writing; ``lookahead_slots`` (int64), ``num_lookahead`` per
            sequence.

        Raises
        ------
        OutOfBlocksError
            The pool cannot cover the whole call; nothing changes.
        KeyError
            An unknown sequence id.

        Notes
        -----
        A sliding-window or chunked-local manager first releases the blocks each
        growing sequence no longer needs (docs/HYBRID.md); those can serve the call.
        """
        self._begin_write()
        try:
            return self._append_step(self._append_plan_of(seq_ids, num_new_tokens, token_ids, num_lookahead))
        finally:
            self._end_write()

    def _append_plan(self, seq_ids, num_new_tokens=1, token_ids=None, num_lookahead=0, like=None):
        """Check and plan an ``append_tokens`` call; change nothing (a coordinator hook).

        The plan (``need``, ``available``) is valid until the manager next changes.
        ``like``: the plan another group made for the same arguments, whose checked ids
        and registry slots this one reuses (confirmed, see ``_slots_like``).
        """
        if like is not None and not isinstance(like, _AppendPlan):
            raise TypeError("like must be a plan of _append_plan")
        return self._append_plan_of(seq_ids, num_new_tokens, token_ids, num_lookahead, like)

    def _append(self, _AppendPlan plan):
        """Carry out a plan of ``_append_plan`` made since the last change."""
        if plan.manager is not self or plan.epoch != self._epoch:
            raise RuntimeError("the plan is stale: the manager changed since it was made")
        self._begin_write()
        try:
            return self._append_step(plan)
        finally:
            self._end_write()

    cdef _AppendPlan _append_plan_of(self, seq_ids, num_new_tokens, token_ids, num_lookahead,
                                     _AppendPlan like=None):
        cdef _AppendPlan plan = _AppendPlan.__new__(_AppendPlan)
        if like is None:
            plan.inputs = self._plan_step(seq_ids, num_new_tokens, &plan.step, num_lookahead)
        else:
            plan.inputs = self._plan_step(seq_ids, num_new_tokens, &plan.step, num_lookahead,
                                          like.ids64, like.inputs[0])
        plan.ids64 = plan.inputs[2]
        cdef Py_ssize_t i, n = plan.step.n
        cdef int64_t added = 0
        plan.manager = self
        plan.epoch = self._epoch
        plan.ids = None
        if token_ids is not None:
            ids = int_vector(token_ids, "token_ids", cnp.NPY_INT32)
            if ids is token_ids:
                ids = ids.copy()      # hashing may let another thread run: keep them still
            # Every count, also one too large to ever fit (which the plan leaves out of
            # num_slots): such a call is out of blocks, not short of token ids.
            for i in range(n):
                added = _saturating_add(added, plan.step.counts[i * plan.step.stride])
            if cnp.PyArray_DIM(ids, 0) != added:
                raise ValueError(
                    f"token_ids has {cnp.PyArray_DIM(ids, 0)} entries but the call adds "
                    f"{added} tokens")
            _check_token_ids(ids)
            plan.ids = ids
        elif self._cache is not None:
            raise ValueError("token_ids is required when prefix caching is on")
        return plan

    cdef object _append_step(self, _AppendPlan plan):
        cdef _StepPlan* step = &plan.step
        cdef Py_ssize_t i, n = step.n
        cdef const int32_t* slot_ids = step.slots
        cdef const int64_t* counts = step.counts
        cdef Py_ssize_t stride = step.stride
        cdef int64_t K = step.lookahead
        cdef int64_t need = step.need, num_copies = step.num_copies, num_slots = step.num_slots
        cdef PrefixCache cache = self._cache
        cdef const int32_t* id_data = NULL
        if plan.ids is not None:
            id_data = <const int32_t*>cnp.PyArray_DATA(plan.ids)
        cdef int64_t available = self._allocator.free_count() + step.freed
        if need > available:
            raise OutOfBlocksError(need, available)
        # Nothing in this call adds to the registry, so its records stay where they are.
        cdef SequenceSlot* records = self._sequences.slots
        cdef row_t row
        cdef int64_t add, count, k, end
        cdef bint windowed = self._attention != ATTENTION_FULL
        # Reserve every row's room first, so a MemoryError here leaves nothing changed
        # and the appends below cannot fail.
        for i in range(n):
            count = counts[i * stride]
            if count or K:
                row = records[slot_ids[i]].row
                add = self._blocks_needed(records[slot_ids[i]].tokens + count + K) - self._table.row_length(row)
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
        ahead = empty(n * K, cnp.NPY_INT64) if K else None
        cdef AppendResult result = new_result()
        result.slots = slots
        result.copy_src = copy_src
        result.copy_dst = copy_dst
        if ahead is not None:
            result.lookahead_slots = ahead
        cdef block_id_t* fresh_data = <block_id_t*>cnp.PyArray_DATA(fresh)
        cdef slot_t* slot_data = <slot_t*>cnp.PyArray_DATA(slots)
        cdef slot_t* ahead_data = <slot_t*>cnp.PyArray_DATA(ahead) if ahead is not None else NULL
        cdef block_id_t* src_data = <block_id_t*>cnp.PyArray_DATA(copy_src)
        cdef block_id_t* dst_data = <block_id_t*>cnp.PyArray_DATA(copy_dst)
        cdef const int32_t* refcount = self._allocator.refcounts()
        cdef int64_t taken = 0, copied = 0, written = 0, tokens, p
        cdef int32_t length
        cdef block_id_t* data
        cdef block_id_t last
        if windowed:
            # Releases first, so that the blocks they free can serve this call.
            for i in range(n):
                if ((counts[i * stride] or K)
                        and self._released_to(records[slot_ids[i]].tokens) > records[slot_ids[i]].live):
                    self._release_window(slot_ids[i])
        if step.shared_tails:
            self._drop_shared_tails(step)
        # After the releases: a block they left held once needs no copy.
        cdef bint any_shared = self._allocator.shared_count() > 0
        self._allocator.take(need, fresh_data)
        if cache is not None:
            cache.taken(fresh_data, need)
        for i in range(n):
            count = counts[i * stride]
            if count == 0 and K == 0:
                continue
            row = records[slot_ids[i]].row
            tokens = records[slot_ids[i]].tokens
            length = self._table.row_length(row)
            k = block_index(&self._geometry, tokens)
            if any_shared and self._block_offset(tokens) and k < length:   # k < length holds; a tampered table may break it
                data = self._table.row_blocks(row)
                last = data[k]
                if refcount[last] > 1:
                    src_data[copied] = last
                    dst_data[copied] = fresh_data[taken]
                    copied += 1
                    # The sequence lets go of its shared block (its count stays >= 1,
                    # so the block is never freed here).
                    self._allocator.release(&last, 1)
                    # Through the table, so that device mirrors see the new block.
                    self._table.set_block_at(row, k, fresh_data[taken])
                    if cache is not None:
                        # The copy holds what the shared block holds.
                        memcpy(cache.tokens + <int64_t>fresh_data[taken] * self._block_size,
                               cache.tokens + <int64_t>last * self._block_size,
                               <size_t>self._block_size * sizeof(int32_t))
                    taken += 1
            add = self._blocks_needed(tokens + count + K) - length
            if add > 0:
                self._table.append_to_row(row, fresh_data + taken, add)   # room reserved above
                taken += add
            data = self._table.row_blocks(row)
            if count == 1:
                slot_data[written] = self._slot(data, tokens)
            else:
                self._fill_slots(data, tokens, tokens + count, slot_data + written)
            written += count
            for p in range(K):
                ahead_data[i * K + p] = self._slot(data, tokens + count + p)
            records[slot_ids[i]].tokens = <int32_t>(tokens + count)
            records[slot_ids[i]].lookahead = <int32_t>K
            if cache is not None and count:
                for p in range(written - count, written):
                    cache.tokens[slot_data[p]] = id_data[p]
                if block_index(&self._geometry, tokens + count) > block_index(&self._geometry, tokens):
                    fill_data[3 * num_filling] = i
                    fill_data[3 * num_filling + 1] = block_index(&self._geometry, tokens)
                    fill_data[3 * num_filling + 2] = block_index(&self._geometry, tokens + count)
                    cache.record(data, fill_data[3 * num_filling + 1], fill_data[3 * num_filling + 2],
                                 self._keys.get(slot_ids[i]) if self._keys else None, NULL,
                                 self._chain(slot_ids[i]))
                    num_filling += 1
        # Registered in the same order as recorded: sequence by sequence, block by block.
        for p in range(num_filling):
            i = <Py_ssize_t>fill_data[3 * p]
            cache.register(self._table.row_blocks(records[slot_ids[i]].row), fill_data[3 * p + 1],
                           fill_data[3 * p + 2], self._keys.get(slot_ids[i]) if self._keys else None,
                           self._chain(slot_ids[i]))
        return result

    cdef int _drop_shared_tails(self, _StepPlan* step) except -1:
        """Before a growth call takes: a partial block that still carries a hash (a
        truncate cut into it while it was shared) and that this sequence now holds
        alone loses the hash, since the call writes into it; one held with others is
        copied instead.  In input order, the earlier sharers of the call moving off
        it first (``_pending``).  See docs/HYBRID.md."""
        cdef Py_ssize_t i
        cdef SequenceSlot* record
        cdef int64_t k
        cdef block_id_t block
        cdef int32_t* pending = &self._pending[0]
        cdef const int32_t* refcount = self._allocator.refcounts()
        for pass_ in range(2):
            for i in range(step.n):
                record = &self._sequences.slots[step.slots[i]]
                if not record.shared_tail or (step.counts[i * step.stride] == 0 and step.lookahead == 0):
                    continue
                k = block_index(&self._geometry, record.tokens)
                if k >= self._table.row_length(record.row):
                    continue
                block = self._table.row_blocks(record.row)[k]
                if pass_ == 1:
                    pending[block] = 0
                    record.shared_tail = 0
                elif refcount[block] - pending[block] > 1:
                    pending[block] += 1          # it copies the block
                elif self._cache is not None and self._cache.is_known(block):
                    self._cache.forget(block)
        return 0

    cdef int _release_window(self, int32_t slot) except -1:
        """Release the blocks a windowed sequence no longer needs (docs/HYBRID.md)."""
        cdef SequenceSlot* record = &self._sequences.slots[slot]
        cdef int64_t k, end = self._released_to(record.tokens)
        if end <= record.live:
            return 0
        cdef block_id_t* data = self._table.row_blocks(record.row)
        cdef block_id_t block
        if self._cache is not None:
            # Block end - 1's hash is the parent of block end: keep it as the chain
            # tail before the entry goes (its content is final: it is full).
            self._chains[slot] = (<char*>self._cache.hash_of(data[end - 1]))[:self._cache.digest_size]
        for k in range(record.live, end):
            block = data[k]
            self._table.set_block_at(record.row, k, PAD)
            self._allocator.release(&block, 1)
        record.live = <int32_t>end
        return 0

    def can_append(self, seq_ids, num_new_tokens=1, num_lookahead=0):
        """Whether ``append_tokens(seq_ids, num_new_tokens, num_lookahead=...)`` would
        find enough blocks.

        Checks the arguments exactly as ``append_tokens`` does and changes nothing.
        """
        cdef _StepPlan plan
        self._plan_step(seq_ids, num_new_tokens, &plan, num_lookahead)
        return plan.need <= self._allocator.free_count() + plan.freed

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
        # Only the blocks that hold the parent's tokens: reserved lookahead blocks
        # stay the parent's alone (both would write drafts into them).
        cdef int32_t length = <int32_t>self._blocks_needed(self._sequences.slots[parent_slot].tokens)
        cdef int32_t live = self._sequences.slots[parent_slot].live
        try:
            self._table.reserve_row(child_row, _with_room_to_grow(length))
        except BaseException:
            self._table.drop_row(child_row)
            raise
        # Nothing moves once the child's room is reserved, so the parent's row can be
        # copied straight from the pool.
        cdef const block_id_t* blocks = self._table.row_blocks(parent_row)
        self._table.append_to_row(child_row, blocks, length)
        if length > live:
            self._allocator.retain(blocks + live, length - live)   # released entries hold none
        cdef int32_t child_slot = self._sequences.add(
            child, child_row, self._sequences.slots[parent_slot].tokens)
        self._sequences.slots[child_slot].live = live
        self._sequences.slots[child_slot].shared_tail = self._sequences.slots[parent_slot].shared_tail
        if self._keys and parent_slot in self._keys:
            self._keys[child_slot] = self._keys[parent_slot]
        if self._chains and parent_slot in self._chains:
            self._chains[child_slot] = self._chains[parent_slot]

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
        cdef int32_t live
        for i in range(cnp.PyArray_DIM(slots, 0)):
            row = self._sequences.slots[slot_ids[i]].row
            live = self._sequences.slots[slot_ids[i]].live     # entries before it are released
            if self._cache is None:
                self._allocator.release(self._table.row_blocks(row) + live, self._table.row_length(row) - live)
            else:
                # Tail first: of a sequence's cached blocks, the head is the likeliest
                # to be shared, so it is the last to be evicted.
                self._allocator.release_reversed(self._table.row_blocks(row) + live,
                                                 self._table.row_length(row) - live)
                if self._keys:
                    self._keys.pop(slot_ids[i], None)
                if self._chains:
                    self._chains.pop(slot_ids[i], None)
            self._sequences.remove(slot_ids[i])
            self._table.drop_row(row)

    def truncate(self, seq_ids, num_tokens):
        """Cut sequences back to ``num_tokens`` tokens each (all or nothing).

        Blocks past the new end (reserved lookahead blocks too) return to the pool,
        last first; a block the cut leaves partly filled loses its prefix-cache hash
        if this sequence is its only holder (its content is no longer final; a
        ``BlockRemoved`` event).  See docs/HYBRID.md for the exact rules.

        Parameters
        ----------
        seq_ids : int or 1-D array-like of int
            Distinct existing sequence ids.
        num_tokens : int or 1-D array-like of int
            The new length, one for all or one per sequence, ``0 .. length``.

        Raises
        ------
        ValueError
            A length out of range, or one whose window would need a block already
            released (sliding-window and chunked-local managers); nothing changes.
        """
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        self._begin_write()
        try:
            slots, lengths = self._truncation(seq_ids, num_tokens, False)
            self._truncate(slots, lengths)
        finally:
            self._end_write()

    def rollback(self, seq_ids, num_rejected):
        """Drop each sequence's last ``num_rejected`` tokens: ``truncate(seq_ids, length - num_rejected)``.

        For speculative decoding: the draft tokens the target model rejected.
        ``num_rejected`` is one count for all or one per sequence, ``0 .. length``.
        """
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        self._begin_write()
        try:
            slots, lengths = self._truncation(seq_ids, num_rejected, True)
            self._truncate(slots, lengths)
        finally:
            self._end_write()

    def _truncate_check(self, seq_ids, num_tokens):
        """Raise what ``truncate(seq_ids, num_tokens)`` would raise; change nothing."""
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        self._read_begin()
        self._truncation(seq_ids, num_tokens, False)

    cdef tuple _truncation(self, seq_ids, counts, bint rejected):
        """Checked ``(slots, new lengths)`` of a truncate (or, ``rejected``, a rollback)."""
        slots = self._slots(seq_ids, True)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(slots, 0), stride = 1
        cdef int64_t scalar = 0
        name = "num_rejected" if rejected else "num_tokens"
        values = self._counts(counts, n, &scalar, name)
        cdef const int64_t* value_data = &scalar
        if values is None:
            stride = 0
        else:
            value_data = <const int64_t*>cnp.PyArray_DATA(values)
        lengths = empty(n, cnp.NPY_INT64)
        cdef int64_t* length_data = <int64_t*>cnp.PyArray_DATA(lengths)
        cdef const int32_t* slot_data = <const int32_t*>cnp.PyArray_DATA(slots)
        cdef const SequenceSlot* record
        cdef int64_t c, L, value
        for i in range(n):
            record = &self._sequences.slots[slot_data[i]]
            c = record.tokens
            value = value_data[i * stride]
            if value > c:
                raise ValueError(
                    f"{name}[{i if stride else 0}] = {value} is more than the {c} tokens sequence "
                    f"{record.seq_id} holds")
            L = c - value if rejected else value
            if L > 0 and self._released_to(L) < record.live:
                raise ValueError(
                    f"sequence {record.seq_id} cannot go back to {L} tokens: its window would "
                    f"need blocks it has already released")
            length_data[i] = L
        return slots, lengths

    cdef int _truncate(self, slots, lengths) except -1:
        cdef const int32_t* slot_data = <const int32_t*>cnp.PyArray_DATA(slots)
        cdef const int64_t* length_data = <const int64_t*>cnp.PyArray_DATA(lengths)
        cdef Py_ssize_t i
        cdef SequenceSlot* record
        cdef int64_t L, keep, first
        cdef int32_t length
        cdef block_id_t* data
        cdef block_id_t block
        cdef PrefixCache cache = self._cache
        for i in range(cnp.PyArray_DIM(slots, 0)):
            record = &self._sequences.slots[slot_data[i]]
            L = length_data[i]
            keep = self._blocks_needed(L)
            length = self._table.row_length(record.row)
            data = self._table.row_blocks(record.row)
            first = keep if keep > record.live else record.live     # released entries hold none
            if length > first:
                self._allocator.release_reversed(data + first, length - first)
            self._table.truncate_row(record.row, <int32_t>keep)
            record.tokens = <int32_t>L
            record.lookahead = 0
            if L == 0:
                record.live = 0
                if self._chains:
                    self._chains.pop(slot_data[i], None)
            record.shared_tail = 0
            if L and cache is not None and self._block_offset(L):
                block = data[keep - 1]
                if self._allocator.refcounts()[block] == 1:
                    cache.forget(block)
                elif cache.is_known(block):
                    # Its other holders keep its hash; this sequence's next write
                    # copies it, or drops the hash if they have let go by then.
                    record.shared_tail = 1
        return 0

    def reset(self):
        """Free every sequence (in insertion order) and, with prefix caching, forget
        every cached block (one ``AllBlocksCleared``).  The statistics are kept."""
        seq_ids = self._table.snapshot(False)[0]      # insertion order
        self._begin_write()
        try:
            if cnp.PyArray_DIM(seq_ids, 0) != self._sequences.count():
                raise RuntimeError(_CONCURRENT_WRITE)
            if cnp.PyArray_DIM(seq_ids, 0):
                self._free_sequence(seq_ids)     # raises (changing nothing) if one went
            if self._cache is not None:
                self._cache.reset()
        finally:
            self._end_write()

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
        # A manager's own pages are the split into one kernel block per block.
        return self._kernel_flashinfer_layout(
            ids, 1 if kernel_block_size is None else kernel_blocks_per_block(kernel_block_size, self._block_size))

    # Kernel blocks (see block_table).  The pool holds fewer than 2**31 tokens, so
    # every kernel block id m*k + j < num_blocks * B fits in int32.
    cdef inline int64_t _kernel_blocks_of(self, const SequenceSlot* record,
                                          const BlockGeometry* kernel, int64_t per_block,
                                          bint reserved=True) noexcept nogil:
        """Kernel blocks a sequence lists: ``ceil((tokens + lookahead) / b)`` (``reserved``,
        the dense table's), or ``ceil(tokens / b)`` (FlashInfer's), within its row."""
        return min(blocks_for(kernel, record.tokens + (record.lookahead if reserved else 0)),
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
        """``flashinfer_layout`` in kernel blocks, ``per_block`` to a block (1: the
        manager's own blocks).  Pages hold the committed tokens only: FlashInfer reads
        a sequence's length from its page count and last page length, so reserved
        lookahead blocks are left out."""
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
                nnz += self._kernel_blocks_of(&records[slot_ids[i]], &kernel, per_block, False)
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
                count = self._kernel_blocks_of(record, &kernel, per_block, False)
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

        The upper bound, each sequence's length, is checked in the read itself; a
        scalar past int32 is more than any sequence holds (and is kept from the sums).
        """
        counts = self._counts(num_tokens, n, scalar, "num_tokens")
        if counts is None and scalar[0] > INT32_MAX and n:
            raise ValueError(f"num_tokens = {scalar[0]} is more than any sequence holds")
        if counts is None:
            scalar[0] = min(scalar[0], INT32_MAX)
        return counts

    # -- state ---------------------------------------------------------------------------
    def _state(self):
        """The manager's state dict: its table, its pool and each sequence's tokens."""
        cdef int64_t epoch, i, count
        cdef int attempt
        cdef int64_t* token_data
        cdef int64_t* lookahead_data
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
            lookahead = empty(count, cnp.NPY_INT64)
            refcount = empty(num_blocks, cnp.NPY_INT32)
            free_stack = empty(num_blocks, cnp.NPY_INT32)
            capture = None if self._cache is None else _CacheCapture(self)
            # Chain tails by sequence id (bytes are immutable: taken by reference).
            chains = {int(self._sequences.slots[slot].seq_id): tail
                      for slot, tail in self._chains.items()} if self._chains else None
            if not self._read_current(epoch):
                continue
            if chains:
                chains = {seq: tail.hex() for seq, tail in chains.items()}
            # From here on nothing can let another thread run.
            token_data = <int64_t*>cnp.PyArray_DATA(tokens)
            lookahead_data = <int64_t*>cnp.PyArray_DATA(lookahead)
            id_data = <const int64_t*>cnp.PyArray_DATA(seq_ids)
            for i in range(count):
                slot = self._sequences.find(id_data[i])
                token_data[i] = self._sequences.slots[slot].tokens if slot >= 0 else -1
                lookahead_data[i] = self._sequences.slots[slot].lookahead if slot >= 0 else 0
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
            state["attention"] = np.array([self._attention, self._span, self._group_idx], dtype=np.int64)
            state["lookahead"] = lookahead
            if capture is not None:
                (<_CacheCapture>capture).fill(self, state, free_stack[:num_free])
                if chains:
                    state["prefix_chains"] = np.array(json.dumps(chains))
            return state
        raise RuntimeError(_READ_KEPT_CHANGING)

    @staticmethod
    def _from_state(state):
        """A manager built from a state dict; ``CorruptStateError`` if it is not valid."""
        _state.check_kind(state, "KVCacheManager")
        attention, span, group_idx = _state.attention_state(state)
        (block_size, num_blocks, seq_ids, lengths, blocks, tokens, refcount,
         free_stack) = _state.manager_state(state, attention != ATTENTION_FULL)
        lookahead = _state.lookahead_state(state, tokens, lengths, block_size)
        cache_state = _state.prefix_state(state, num_blocks, block_size, free_stack.shape[0])
        lru = None
        if cache_state is not None:
            lru = free_stack[:cache_state["lru_count"]]
            free_stack = free_stack[cache_state["lru_count"]:]
        cdef PageTable table = _table_from_rows(block_size, seq_ids, lengths, blocks)
        cdef BlockAllocator allocator = allocator_from_arrays(num_blocks, refcount, free_stack)
        cdef KVCacheManager manager
        kinds = {"sliding_window": span} if attention == ATTENTION_WINDOW else (
            {"attention_chunk": span} if attention == ATTENTION_CHUNK else {})
        if cache_state is None:
            manager = KVCacheManager(num_blocks, block_size, group_idx=group_idx, **kinds)
        else:
            manager = KVCacheManager(
                num_blocks, block_size, enable_prefix_caching=True,
                hash_algorithm=cache_state["algorithm"], hash_seed=cache_state["seed"],
                enable_kv_cache_events=cache_state["events"],
                event_hash_format="int" if cache_state["int_hashes"] else "bytes",
                medium=cache_state["medium"], data_parallel_rank=cache_state["dp_rank"],
                group_idx=group_idx, **kinds)
        cdef int64_t i, k, count = seq_ids.shape[0], first = 0
        cdef int32_t slot
        table.mark_owned(True)
        allocator.mark_owned(True)
        manager._table = table
        manager._allocator = allocator
        manager._sequences.reserve(count)
        for i in range(count):
            slot = manager._sequences.add(seq_ids[i], table.find_row(seq_ids[i]), <int32_t>tokens[i])
            # A windowed row's released entries lead it; they are where ``live`` starts.
            k = 0
            while k < lengths[i] and blocks[first + k] == PAD:
                k += 1
            manager._sequences.slots[slot].live = <int32_t>k
            manager._sequences.slots[slot].lookahead = <int32_t>lookahead[i]
            first += lengths[i]
        if cache_state is not None:
            manager._restore_cache(cache_state, lru)
            for i in range(count):
                # A partial block that carries a hash: a truncate cut into it while shared.
                slot = manager._sequences.find(seq_ids[i])
                k = tokens[i] // block_size
                if tokens[i] % block_size and k < lengths[i]:
                    manager._sequences.slots[slot].shared_tail = manager._cache.is_known(
                        table.row_blocks(table.find_row(seq_ids[i]))[k])
        if cache_state is not None:
            for seq, tail in _state.chains_state(state, manager._cache.digest_size).items():
                slot = manager._sequences.find(seq)
                if slot < 0:
                    raise _state.CorruptStateError(f"a chain tail is saved for sequence {seq}, which is not held")
                manager._chains[slot] = tail
        elif "prefix_chains" in state:
            raise _state.CorruptStateError("chain tails are saved without a prefix cache")
        if cache_state is not None or attention != ATTENTION_FULL:
            try:
                manager.check()
            except AssertionError as error:
                raise _state.CorruptStateError(f"the saved manager is inconsistent: {error}") from None
        return manager

    cdef _restore_cache(self, dict saved, lru):
        """Rebuild the prefix cache on the (new) allocator from validated saved arrays."""
        cdef PrefixCache cache = new_prefix_cache(
            self._allocator, self._block_size, saved["algorithm"], saved["seed"],
            saved["events"], "int" if saved["int_hashes"] else "bytes", saved["medium"])
        self._cache = cache
        cache.group_idx = self._group_idx
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
        cdef int32_t slot, live
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
            live = self._sequences.slots[slot].live
            if length < self._blocks_needed(tokens):
                raise AssertionError(
                    f"sequence {seq} holds {tokens} tokens in {length} blocks "
                    f"(block_size {self._block_size} needs {self._blocks_needed(tokens)})")
            if tokens + self._sequences.slots[slot].lookahead > length * self._block_size:
                raise AssertionError(f"sequence {seq} reserves draft positions past the blocks it holds")
            if live > self._released_to(tokens) or live > length:
                raise AssertionError(f"sequence {seq} released {live} blocks, more than its window allows")
            if live and (blocks[:live] != PAD).any():
                raise AssertionError(f"sequence {seq}'s released entries are not all PAD_SLOT_ID")
            held = blocks[live:]
            if held.size:
                if held.min() < 0 or held.max() >= num_blocks:
                    raise AssertionError(f"sequence {seq} maps a block outside the pool: {held}")
                np.add.at(references, held, 1)
        refcount = empty(num_blocks, cnp.NPY_INT32)
        free_stack = empty(num_blocks, cnp.NPY_INT32)
        free = free_stack[:self._allocator.capture(refcount, free_stack)]
        wrong = np.flatnonzero(refcount != references)
        if wrong.size:
            b = int(wrong[0])
            raise AssertionError(
                f"block {b} has refcount {refcount[b]} but {references[b]} table entries name it")
        if self._allocator.shared_count() != int((refcount >= 2).sum()):
            raise AssertionError(
                f"the pool counts {self._allocator.shared_count()} shared blocks, but "
                f"{int((refcount >= 2).sum())} have a reference count of 2 or more")
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
        cdef int32_t slot, live
        for i in range(seq_ids.shape[0]):
            length = lengths[i]
            blocks = all_blocks[first:first + length]
            first += length
            slot = self._sequences.find(int(seq_ids[i]))
            full = self._sequences.slots[slot].tokens // B
            live = self._sequences.slots[slot].live
            if live and self._chains.get(slot) is None:
                raise AssertionError(f"sequence {int(seq_ids[i])} released blocks but keeps no chain tail")
            for k in range(live, full):
                b = int(blocks[k])
                if not known[b]:
                    raise AssertionError(f"sequence {int(seq_ids[i])}'s full block {k} ({b}) has no hash")
                if k == 0:
                    expected_parent = cache.none_hash
                elif k == live:
                    expected_parent = self._chains[slot]
                else:
                    expected_parent = hashes[int(blocks[k - 1])].tobytes()
                if parents[b].tobytes() != expected_parent:
                    raise AssertionError(
                        f"sequence {int(seq_ids[i])}'s block {k} ({b}) is not chained to its block {k - 1}")
                if cache.recompute(b) != hashes[b].tobytes():
                    raise AssertionError(
                        f"sequence {int(seq_ids[i])}'s block {k} ({b}) does not match its hash")
            tokens_held = self._sequences.slots[slot].tokens
            if tokens_held % B and full < length and known[int(blocks[full])] \
                    and not self._sequences.slots[slot].shared_tail:
                raise AssertionError(
                    f"sequence {int(seq_ids[i])}'s partial block {int(blocks[full])} carries a hash "
                    f"it does not know of (a write would change a hashed block)")
            for k in range(max(full, live), length):
                b = int(blocks[k])
                # A truncate may leave a hashed partial block (others held it); the
                # sequence knows (shared_tail) and drops the hash before writing.
                if cached[b] and not (k == full and tokens_held % B and self._sequences.slots[slot].shared_tail):
                    raise AssertionError(f"sequence {int(seq_ids[i])}'s partial block {b} is cached")


_state.register("KVCacheManager", KVCacheManager._from_state)
