# cython: freethreading_compatible = False, auto_pickle = False
"""The PageTable: sequence id -> ordered physical block ids, in contiguous numpy arrays.

Layout
------
* A block **pool**: one int32 array holding every sequence's block ids, each sequence
  in one contiguous **row** ``pool[start : start + length]`` with some reserved room
  after it (``capacity``).  A row that outgrows its room moves to the end of the pool;
  the room it leaves is garbage that a compaction reclaims once it is a sizeable part
  of the pool.  Memory therefore follows the blocks actually mapped.
* Per-row metadata arrays (start, length, capacity, sequence id, insertion stamp).
* An open-addressing hash index (linear probing, Fibonacci hashing) from sequence id
  to row, in two arrays.  Removal uses backward-shift deletion, so there are no
  tombstones and lookups never degrade.

Batched kernels resolve a sequence id once per run of equal ids, which makes the
usual grouped batches (all tokens of a sequence together) cost one hash probe per
sequence; interleaved batches stay correct and pay one probe per token.
"""

cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memmove, memcmp, memset
from libc.stdlib cimport qsort

import mmap as _mmap
import sys
from time import monotonic as _monotonic, sleep as _sleep

import numpy as np
cimport numpy as cnp

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._accept cimport (
    check_output_vector, int_vector, is_kernel_vector, shares_memory)
from libc.stdint cimport INT32_MAX as C_INT32_MAX, INT64_MAX as C_INT64_MAX
from pagetable._convert import (
    INT32_MAX,
    INT64_MAX,
    as_index,
    check_output,
    check_range,
)
from pagetable import _state

cnp.import_array()

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define PAGETABLE_MAX_THREADS() omp_get_max_threads()
    #else
    #define PAGETABLE_MAX_THREADS() 1
    #endif
    #define PAGETABLE_FIBONACCI 0x9E3779B97F4A7C15ULL
    """
    int PAGETABLE_MAX_THREADS() noexcept nogil
    uint64_t PAGETABLE_FIBONACCI

# Input scans of append_blocks.  With GCC on x86-64 Linux each is compiled twice, for
# AVX2 and for the baseline, and the loader picks one (an ifunc): the baseline has no
# 64-bit vector compare, and these scans were a tenth of a round-robin append.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define PAGETABLE_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define PAGETABLE_CLONES
    #endif
    /* Smallest of n >= 1 values; *runs gets the number of runs of equal values. */
    static PAGETABLE_CLONES int64_t pagetable_min_and_runs(const int64_t* v, int64_t n, int64_t* runs) {
        int64_t low = v[0], count = 1;
        for (int64_t i = 1; i < n; i++) {
            low = v[i] < low ? v[i] : low;
            count += v[i] != v[i - 1];
        }
        *runs = count;
        return low;
    }
    static PAGETABLE_CLONES int64_t pagetable_min_i64(const int64_t* v, int64_t n) {
        int64_t low = v[0];
        for (int64_t i = 1; i < n; i++) low = v[i] < low ? v[i] : low;
        return low;
    }
    static PAGETABLE_CLONES int64_t pagetable_max_i64(const int64_t* v, int64_t n) {
        int64_t high = v[0];
        for (int64_t i = 1; i < n; i++) high = v[i] > high ? v[i] : high;
        return high;
    }
    static PAGETABLE_CLONES int32_t pagetable_min_i32(const int32_t* v, int64_t n) {
        int32_t low = v[0];
        for (int64_t i = 1; i < n; i++) low = v[i] < low ? v[i] : low;
        return low;
    }
    """
    int64_t _min_and_runs "pagetable_min_and_runs" (const int64_t* values, int64_t n, int64_t* runs) noexcept nogil
    int64_t _min_i64 "pagetable_min_i64" (const int64_t* values, int64_t n) noexcept nogil
    int64_t _max_i64 "pagetable_max_i64" (const int64_t* values, int64_t n) noexcept nogil
    int32_t _min_i32 "pagetable_min_i32" (const int32_t* values, int64_t n) noexcept nogil

# Loads of row metadata in kernels that run without the GIL.  Another thread may
# change a row meanwhile; each field is read exactly once (the compiler may not read
# it again later and see a different value), and the kernel checks what it read
# before indexing the pool with it.  On x86-64 and ARM64 these are plain loads.
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    static inline int64_t pagetable_load_i64(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int32_t pagetable_load_i32(const int32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    #else
    static inline int64_t pagetable_load_i64(const int64_t* p) { return *(const volatile int64_t*)p; }
    static inline int32_t pagetable_load_i32(const int32_t* p) { return *(const volatile int32_t*)p; }
    #endif
    """
    int64_t _load_i64 "pagetable_load_i64" (const int64_t* p) noexcept nogil
    int32_t _load_i32 "pagetable_load_i32" (const int32_t* p) noexcept nogil

PAD_SLOT_ID = PAD

_CONCURRENT_WRITE = (
    "another thread is changing this PageTable right now; changes from several "
    "threads must take turns (hold a lock around them)")
_READ_DURING_CHANGE = (
    "a change to this PageTable has been in progress for over half a second (is the "
    "read running inside it?); a read cannot see a change half-done")
_READ_KEPT_CHANGING = (
    "this PageTable kept changing in another thread while it was being read; "
    "hold a lock around changes and reads")
_READS_IN_FLIGHT = (
    "batched reads of this PageTable in another thread have run for over half a "
    "second; a change that must move its storage cannot wait for them any longer")
_OWNED = (
    "this PageTable belongs to a KVCacheManager: change it through the manager "
    "(or work on a copy)")

#: Largest block size accepted: block_id * block_size + offset must stay exact in
#: int64 slot arithmetic and block_size itself must fit the int32 kernels take.
MAX_BLOCK_SIZE = INT32_MAX

cdef enum:
    EMPTY_KEY = -1
    # Batches at least this long are split over OpenMP threads; below it a thread
    # team costs more than it saves, and on a busy machine a descheduled thread
    # holds the whole call up.  Chunks are handed out dynamically for that reason.
    PARALLEL_THRESHOLD = 131072
    PARALLEL_CHUNK = 8192
    MIN_INDEX_CAPACITY = 16
    SMALL_INDEX = 4096
    # Row metadata grows fourfold: each growth copies nine arrays, and a batch that
    # creates a thousand sequences should not pay that seven times.  Arrays of 64 KiB
    # and more are mappings of their own whose untouched pages cost no memory, and
    # rows past the used ones are never touched.
    ROWS_GROWTH = 4
    # The index grows past INDEX_LOAD_NUM / INDEX_LOAD_DEN full.  Sparse on purpose:
    # a lookup's branch bets that the id sits in its home slot, and a lost bet costs
    # a pipeline flush.  At 0.7 about a quarter of the bets were lost and an
    # interleaved slot mapping of 8,192 tokens ran 1.6x slower than at this load;
    # the memory it costs is 12 bytes a slot, about 0.2 bytes per mapped block.
    INDEX_LOAD_NUM = 3
    INDEX_LOAD_DEN = 8
    MIN_POOL_CAPACITY = 256
    # Linux's madvise advice that maps a range writable now (see PageTable._populate),
    # used once a batch's fresh stretch of the pool is at least this many bytes.
    MADV_POPULATE_WRITE = 23
    POPULATE_MIN_BYTES = 65536
    # A batched read that overlapped a change from another thread is run again, up
    # to this many times in all, before it gives up with RuntimeError.
    READ_ATTEMPTS = 4

cdef extern from *:
    """
    #define PAGETABLE_EXACT_DOUBLE_LIMIT (1LL << 52)
    """
    int64_t DEF_EXACT_DOUBLE_LIMIT "PAGETABLE_EXACT_DOUBLE_LIMIT"

cdef extern from *:
    """
    #ifndef PAGETABLE_DEBUG_BUILD
    #define PAGETABLE_DEBUG_BUILD 0
    #endif
    """
    int PAGETABLE_DEBUG_BUILD

#: Whether this build has bounds and initialisation checks on (``PAGETABLE_DEBUG=1``).
DEBUG_BUILD = bool(PAGETABLE_DEBUG_BUILD)

cdef bint _LINUX = sys.platform.startswith("linux")


cdef int _wait_while_set(int32_t* flag, str message) except -1:
    """Wait, letting other threads run, until another thread clears ``flag``.

    Readers wait for a change in progress (it lets other threads run only while the
    OS maps or unmaps memory for it), and a change that must move storage waits for
    the reads in flight; both are short.  Past half a second (a wait that cannot
    end, as when a finaliser reads inside a change) ``RuntimeError`` is raised.
    """
    deadline = _monotonic() + 0.5
    while flag[0]:
        if _monotonic() > deadline:
            raise RuntimeError(message)
        _sleep(1e-5)
    return 0
_INT32 = np.dtype(np.int32)
_INT64 = np.dtype(np.int64)


cdef inline uint64_t _hash_slot(seq_id_t key, int32_t shift) noexcept nogil:
    return (<uint64_t>key * PAGETABLE_FIBONACCI) >> shift


cdef inline int32_t _shift_for(int64_t capacity) noexcept nogil:
    cdef int32_t bits = 0
    while (<int64_t>1 << bits) < capacity:
        bits += 1
    return 64 - bits


def _new_pool_map(int64_t capacity):
    """An anonymous memory map for ``capacity`` int32 entries (pages cost nothing until written)."""
    # Private, not the default shared mapping: a shared anonymous mapping is a fixed
    # size memory object, and touching pages past it after an mremap faults.
    flags = getattr(_mmap, "MAP_PRIVATE", 0) | getattr(_mmap, "MAP_ANONYMOUS", 0)
    try:
        if flags:
            return _mmap.mmap(-1, <Py_ssize_t>capacity * sizeof(int32_t), flags=flags)
        return _mmap.mmap(-1, <Py_ssize_t>capacity * sizeof(int32_t))
    except OSError as error:
        # The OS refusing memory is running out of memory, whatever errno says
        # (ENOMEM, or EAGAIN past a locked-memory limit): callers catch MemoryError.
        raise MemoryError(f"cannot map {capacity * 4} bytes for a PageTable: {error}") from None


cdef object _zeros(Py_ssize_t count, int typenum):
    """A zeroed 1-D array of ``typenum``; a large one in its own anonymous mapping.

    Metadata arrays are replaced (not resized) as a table grows.  From the heap, the
    arrays left behind fragment it and stay resident; a mapping of its own goes back to
    the OS the moment it is dropped, and its untouched pages never count at all.
    Small ones come straight from numpy's C API: a table grows its arrays a dozen
    times on its way to a thousand sequences, and each growth should cost little.
    """
    cdef cnp.npy_intp size = count
    cdef Py_ssize_t nbytes = count * (8 if typenum == cnp.NPY_INT64 else 4)
    if nbytes < 65536:
        return cnp.PyArray_ZEROS(1, &size, typenum, 0)
    return np.frombuffer(_new_pool_map((nbytes + 3) // 4),
                         dtype=_INT64 if typenum == cnp.NPY_INT64 else _INT32, count=count)


cdef inline void _copy_prefix(object target, object source, Py_ssize_t count) noexcept:
    """Copy the first ``count`` entries of one 1-D array into another of the same type."""
    if count > 0:
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>target), cnp.PyArray_DATA(<cnp.ndarray>source),
               <size_t>count * <size_t>cnp.PyArray_ITEMSIZE(<cnp.ndarray>source))


def _check_block_size(block_size):
    """Validate a block size: a positive integer no larger than ``MAX_BLOCK_SIZE``."""
    value = as_index(block_size, "block_size")
    if value <= 0:
        raise ValueError(f"block_size must be a positive integer, got {value}")
    if value > MAX_BLOCK_SIZE:
        raise OverflowError(f"block_size must be at most {MAX_BLOCK_SIZE}, got {value}")
    return value


cdef inline int64_t _int_arg(object value, str name, int64_t high) except? -2:
    """An integer argument in ``0 .. high``; raises naming ``name`` otherwise.

    All comparisons are on C values: boxing a bound here cost every call.
    """
    cdef int overflow = 0
    cdef long long result
    if type(value) is not int:
        value = as_index(value, name)
    result = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow != 0 or result < 0 or result > high:
        check_range(value, 0, high, name)
    return result


cdef inline seq_id_t _seq_arg(object value) except? -2:
    return _int_arg(value, "sequence_id", C_INT64_MAX)


cdef inline block_id_t _block_arg(object value) except? -2:
    return <block_id_t>_int_arg(value, "block_id", C_INT32_MAX)


cdef inline object _int64_ids(object values, str name):
    """``values`` as the int64 vector kernels read (see ``_accept.pxd``)."""
    return int_vector(values, name, cnp.NPY_INT64)


cdef inline object _empty(Py_ssize_t n, int typenum):
    cdef cnp.npy_intp size = n
    return cnp.PyArray_EMPTY(1, &size, typenum, 0)


cdef inline int64_t* _i64(object array) noexcept:
    return <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline int32_t* _i32(object array) noexcept:
    return <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>array)


def _pair(seq_ids, positions):
    seq_array = _int64_ids(seq_ids, "seq_ids")
    pos_array = _int64_ids(positions, "positions")
    if cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0) != cnp.PyArray_DIM(<cnp.ndarray>pos_array, 0):
        raise ValueError(
            f"seq_ids and positions must have the same length, "
            f"got {seq_array.shape[0]} and {pos_array.shape[0]}")
    return seq_array, pos_array


cdef object _row_hints(object rows, int64_t n):
    """Validate optional per-pair row hints: None, or ``n`` integers that fit int32."""
    if rows is None:
        return None
    rows = int_vector(rows, "rows", cnp.NPY_INT32)
    if cnp.PyArray_DIM(<cnp.ndarray>rows, 0) != n:
        raise ValueError(f"rows must hold one hint per pair ({n}), got {rows.shape[0]}")
    return rows


# --------------------------------------------------------------------------- kernels
# Pure loops over raw table pointers.  Each returns the index of the first entry it
# could not handle (a negative sequence id), or -1; the caller raises with the GIL.

cdef inline row_t _view_find(const TableView* view, seq_id_t seq_id) noexcept nogil:
    """Row of ``seq_id``, or -1.

    A plain probe loop: the branch that finds an id in its home slot is predicted,
    so the row load issues before the key compare resolves.  The index is kept
    sparse (see ``INDEX_LOAD_*``) to make that prediction right nearly every time.
    """
    cdef uint64_t mask = <uint64_t>view.index_mask
    cdef uint64_t slot = _hash_slot(seq_id, view.index_shift)
    cdef int64_t key
    while True:
        key = view.index_keys[slot]
        if key == seq_id:
            return view.index_rows[slot]
        if key == EMPTY_KEY:
            return -1
        slot = (slot + 1) & mask


cdef inline row_t _hinted_find(const TableView* view, const int32_t* hints, int64_t k,
                               seq_id_t seq_id) noexcept nogil:
    """Row of ``seq_id`` (>= 0), trying the caller's row hint ``hints[k]`` first.

    A hint is used only if that row holds ``seq_id`` now, so a stale or wrong hint
    costs a probe and nothing else.  ``hints`` may be NULL.
    """
    cdef row_t row
    if hints != NULL:
        row = hints[k]
        if <uint64_t><int64_t>row < <uint64_t>view.rows_used and view.row_seq[row] == seq_id:
            return row
    return _view_find(view, seq_id)


# Exact quotient by a block size that is not a power of two, for 0 <= pos < 2**52:
# a double-precision reciprocal is off by at most one there, and one correction step
# fixes it.  Hardware 64-bit division would cost tens of cycles per token.

cdef inline int64_t _quotient(int64_t pos, int64_t block_size, double reciprocal) noexcept nogil:
    cdef int64_t quotient = <int64_t>(<double>pos * reciprocal)
    cdef int64_t remainder = pos - quotient * block_size
    if remainder < 0:
        quotient -= 1
    elif remainder >= block_size:
        quotient += 1
    return quotient


cdef inline int64_t _block_of(int64_t pos, const TableView* view, int64_t limit,
                              double reciprocal) noexcept nogil:
    """Logical block index of a mapped position ``0 <= pos < limit``."""
    if view.block_shift >= 0:
        return pos >> view.block_shift
    if limit <= DEF_EXACT_DOUBLE_LIMIT:
        return _quotient(pos, view.block_size, reciprocal)
    return pos // view.block_size


cdef inline int64_t _run_end(const int64_t* seq_ids, int64_t begin, int64_t end) noexcept nogil:
    """End of the run of equal ids starting at ``begin``."""
    cdef seq_id_t seq_id = seq_ids[begin]
    cdef int64_t i = begin + 1
    while i < end and seq_ids[i] == seq_id:
        i += 1
    return i


cdef inline void _run_slots(const TableView* view, row_t row, const int64_t* positions,
                            int64_t* out, int64_t count) noexcept nogil:
    """Slots of ``count`` positions of one sequence (``row``, or -1 if unknown)."""
    cdef int64_t k, pos, block_index
    cdef int64_t start = _load_i64(view.row_start + row) if row >= 0 else 0
    cdef int64_t length = _load_i32(view.row_len + row) if row >= 0 else 0
    cdef const int32_t* data
    cdef int64_t block_size = view.block_size
    cdef int32_t shift = view.block_shift
    cdef int64_t mask = view.block_mask
    cdef int64_t limit
    cdef double reciprocal
    if start < 0 or start + length > view.pool_capacity:
        length = 0      # torn by a change in another thread: the caller reads again
    limit = length * block_size      # positions 0 .. limit - 1 are mapped
    if length <= 0:
        for k in range(count):
            out[k] = PAD
        return
    data = view.pool + start
    if shift >= 0:
        for k in range(count):
            pos = positions[k]
            # One unsigned compare rejects negative and past-the-end positions alike.
            if <uint64_t>pos < <uint64_t>limit:
                out[k] = (<int64_t>data[pos >> shift] << shift) | (pos & mask)
            else:
                out[k] = PAD
    elif limit <= DEF_EXACT_DOUBLE_LIMIT:
        reciprocal = 1.0 / <double>block_size
        for k in range(count):
            pos = positions[k]
            if <uint64_t>pos < <uint64_t>limit:
                block_index = _quotient(pos, block_size, reciprocal)
                out[k] = <int64_t>data[block_index] * block_size + (pos - block_index * block_size)
            else:
                out[k] = PAD
    else:
        for k in range(count):
            pos = positions[k]
            if <uint64_t>pos < <uint64_t>limit:
                block_index = pos // block_size
                out[k] = <int64_t>data[block_index] * block_size + (pos - block_index * block_size)
            else:
                out[k] = PAD


cdef inline void _run_lookup(const TableView* view, row_t row, const int64_t* positions,
                             int32_t* blocks_out, int32_t* offsets_out, int64_t count) noexcept nogil:
    """Block ids and offsets of ``count`` positions of one sequence."""
    cdef int64_t k, pos, block_index
    cdef int64_t start = _load_i64(view.row_start + row) if row >= 0 else 0
    cdef int64_t length = _load_i32(view.row_len + row) if row >= 0 else 0
    cdef const int32_t* data
    cdef int64_t block_size = view.block_size
    cdef int64_t limit
    cdef double reciprocal = 1.0 / <double>block_size
    if start < 0 or start + length > view.pool_capacity:
        length = 0      # torn by a change in another thread: the caller reads again
    limit = length * block_size
    if length <= 0:
        for k in range(count):
            blocks_out[k] = PAD
            offsets_out[k] = PAD
        return
    data = view.pool + start
    for k in range(count):
        pos = positions[k]
        if <uint64_t>pos < <uint64_t>limit:
            block_index = _block_of(pos, view, limit, reciprocal)
            blocks_out[k] = data[block_index]
            offsets_out[k] = <int32_t>(pos - block_index * block_size)
        else:
            blocks_out[k] = PAD
            offsets_out[k] = PAD


cdef enum:
    # Tokens outside long runs are mapped one by one, in stretches this long; after
    # each stretch the scan looks for a long run again.
    INTERLEAVED_BATCH = 64


cdef inline int64_t _interleaved_slots(const TableView* view, const int64_t* seq_ids,
                                       const int32_t* hints, const int64_t* positions,
                                       int64_t* out, int64_t count) noexcept nogil:
    """Slots of ``count`` tokens of mixed ids, one probe (or row hint) each.

    Returns the index of the first negative id, or -1.
    """
    cdef int64_t k, pos, block_index, limit, entry
    cdef int64_t block_size = view.block_size
    cdef int32_t shift = view.block_shift
    cdef int64_t mask = view.block_mask
    cdef uint64_t capacity = <uint64_t>view.pool_capacity
    cdef double reciprocal = 1.0 / <double>block_size
    cdef seq_id_t seq_id
    cdef row_t row
    for k in range(count):
        seq_id = seq_ids[k]
        if seq_id < 0:
            return k
        row = _hinted_find(view, hints, k, seq_id)
        pos = positions[k]
        limit = (_load_i32(view.row_len + row) if row >= 0 else 0) * block_size
        if <uint64_t>pos >= <uint64_t>limit:
            out[k] = PAD
            continue
        block_index = pos >> shift if shift >= 0 else _block_of(pos, view, limit, reciprocal)
        entry = _load_i64(view.row_start + row) + block_index
        # A row torn by a change in another thread must not send the read outside
        # the pool; the caller reads again in that case.
        if <uint64_t>entry >= capacity:
            out[k] = PAD
        elif shift >= 0:
            out[k] = (<int64_t>view.pool[entry] << shift) | (pos & mask)
        else:
            out[k] = <int64_t>view.pool[entry] * block_size + (pos - block_index * block_size)
    return -1


cdef int64_t _slot_mapping_range(const TableView* view, const int64_t* seq_ids,
                                 const int32_t* hints, const int64_t* positions,
                                 int64_t* out, int64_t begin, int64_t end) noexcept nogil:
    """Slots for entries ``begin .. end - 1``, one hash probe per run of equal ids.

    ``hints`` (NULL, or one row hint per entry) replaces probes whose hint is right.
    Returns the index of the first negative sequence id, or -1.
    """
    cdef int64_t i = begin, run_end, batch_end, bad
    while i < end:
        if seq_ids[i] < 0:
            return i
        run_end = _run_end(seq_ids, i, end)
        if run_end - i >= 4:
            _run_slots(view, _hinted_find(view, hints, i, seq_ids[i]), positions + i,
                       out + i, run_end - i)
            i = run_end
            continue
        # Short runs: the batch is interleaved here.
        batch_end = min(i + INTERLEAVED_BATCH, end)
        bad = _interleaved_slots(view, seq_ids + i, hints + i if hints != NULL else NULL,
                                 positions + i, out + i, batch_end - i)
        if bad >= 0:
            return i + bad
        i = batch_end
    return -1


cdef int64_t _lookup_range(const TableView* view, const int64_t* seq_ids,
                           const int32_t* hints, const int64_t* positions,
                           int32_t* blocks_out, int32_t* offsets_out,
                           int64_t begin, int64_t end) noexcept nogil:
    """Block ids and offsets for entries ``begin .. end - 1``; see ``_slot_mapping_range``."""
    cdef int64_t i = begin, run_end
    while i < end:
        if seq_ids[i] < 0:
            return i
        run_end = _run_end(seq_ids, i, end)
        _run_lookup(view, _hinted_find(view, hints, i, seq_ids[i]), positions + i,
                    blocks_out + i, offsets_out + i, run_end - i)
        i = run_end
    return -1


cdef int64_t _resolve_rows(const TableView* view, const int64_t* seq_ids, int32_t* rows,
                           int64_t count) noexcept nogil:
    """Fill ``rows`` with each id's row; return the first negative or unknown index, else -1."""
    cdef int64_t i
    cdef seq_id_t seq_id, current = -1
    cdef row_t row = -1
    for i in range(count):
        seq_id = seq_ids[i]
        # Checked for every entry: -1, the "no id yet" of ``current``, would pass
        # as a repeat of it otherwise.
        if seq_id < 0:
            return i
        if seq_id != current:
            current = seq_id
            row = _view_find(view, seq_id)
            if row < 0:
                return i
        rows[i] = row
    return -1


cdef int _compare_first(const void* a, const void* b) noexcept nogil:
    """qsort order of (key, value) int64 pairs by key."""
    cdef int64_t x = (<const int64_t*>a)[0], y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


cdef void _copy_padded(const int32_t* pool, const int64_t* starts, const int32_t* lengths,
                       int64_t count, int32_t* target, int64_t width) noexcept nogil:
    """Rows ``pool[starts[b] : starts[b] + lengths[b]]`` into a ``count x width`` table, padded."""
    cdef int64_t b, j
    cdef int32_t* dest
    for b in range(count):
        dest = target + b * width
        memcpy(dest, pool + starts[b], <size_t>lengths[b] * sizeof(int32_t))
        for j in range(lengths[b], width):
            dest[j] = PAD


cdef void _copy_packed(const int32_t* pool, const int64_t* starts, const int32_t* lengths,
                       int64_t count, int32_t* target) noexcept nogil:
    """Rows ``pool[starts[b] : starts[b] + lengths[b]]`` one after another into ``target``."""
    cdef int64_t b, write = 0
    for b in range(count):
        memcpy(target + write, pool + starts[b], <size_t>lengths[b] * sizeof(int32_t))
        write += lengths[b]


# --------------------------------------------------------------------------- scratch
# Batched appends need one int32 per run of their input.  A fresh array for each call
# would come from a fresh mapping once it is large, and faulting its pages in costs
# more than the appending itself, so one buffer is kept and reused.  Writers hold the
# GIL, but growing a table may release it (mmap, munmap), so a second writer that
# finds the buffer taken allocates its own.

cdef enum:
    # The largest scratch buffer kept between calls, in int32 entries (1 MiB).
    SCRATCH_KEEP = 1 << 18

cdef object _scratch = None
cdef bint _scratch_taken = False


cdef object _take_scratch(Py_ssize_t count):
    """An int32 buffer of at least ``count`` entries; hand it back with ``_give_scratch``."""
    global _scratch, _scratch_taken
    if _scratch_taken or count > SCRATCH_KEEP:
        return _empty(count, cnp.NPY_INT32)
    if _scratch is None or cnp.PyArray_DIM(<cnp.ndarray>_scratch, 0) < count:
        _scratch = None
        _scratch = _empty(max(count, 4096), cnp.NPY_INT32)
    _scratch_taken = True
    return _scratch


cdef void _give_scratch(object buffer):
    global _scratch_taken
    if buffer is _scratch:
        _scratch_taken = False


cdef PageTable _table_from_rows(int64_t block_size, object seq_ids, object lengths, object blocks):
    """A new table holding validated rows in this (insertion) order.

    The arguments come from ``_state.table_state``: ids distinct and non-negative,
    lengths that add up to the blocks, block ids in range.
    """
    cdef PageTable table = PageTable(block_size)
    cdef int64_t i, count = cnp.PyArray_DIM(<cnp.ndarray>seq_ids, 0)
    cdef int64_t total = cnp.PyArray_DIM(<cnp.ndarray>blocks, 0), at = 0, length
    cdef const int64_t* ids = _i64(seq_ids)
    cdef const int64_t* sizes = _i64(lengths)
    cdef const int32_t* data = _i32(blocks)
    cdef row_t row
    table._reserve_sequences(count)
    table._ensure_pool_space(total)
    for i in range(count):
        length = sizes[i]
        row = table._create_row(ids[i])
        if length:
            table._reserve_row(row, length)      # a fresh row at the tail: grows in place
            table._append_to_row(row, data + at, length)
            at += length
    return table


def _restore(state):
    """Rebuild a table from its state dict (pickle support; see ``pagetable._state``)."""
    return PageTable._from_state(state)


# --------------------------------------------------------------------------- the class

cdef class PageTable:
    """Map each sequence's logical token positions to (physical block, offset).

    Parameters
    ----------
    block_size : int, default 16
        Tokens per physical block; a positive integer up to ``2**31 - 1``.

    Notes
    -----
    Sequence ids are integers in ``0 .. 2**63 - 1``; block ids are integers in
    ``0 .. 2**31 - 1`` (int32, what attention kernels take).  ``PAD_SLOT_ID`` (-1)
    marks every unmapped entry in batched outputs.

    Every method validates all of its arguments before changing anything: a call
    that raises leaves the table exactly as it was.

    Examples
    --------
    >>> pt = PageTable()
    >>> pt.append_block(1, 0)
    >>> pt.append_block(1, 1)
    >>> pt.get_block_for_position(1, 0)
    (0, 0)
    >>> pt.get_block_for_position(1, 16)
    (1, 0)
    >>> pt.get_sequence_blocks(1)
    array([0, 1], dtype=int32)
    >>> pt.slot_mapping([1, 1, 1], [0, 15, 17])
    array([ 0, 15, 17])
    """

    def __init__(self, block_size=16):
        # All set-up happens in __cinit__, which runs even when __init__ is skipped,
        # so that no instance ever has dangling storage pointers.
        pass

    def __cinit__(self, block_size=16, *args, **kwargs):
        cdef int64_t size = _check_block_size(block_size)
        self._block_size = <int32_t>size
        if size & (size - 1) == 0:
            self._block_shift = 0
            while (1 << self._block_shift) < size:
                self._block_shift += 1
            self._block_mask = <int32_t>(size - 1)
        else:
            self._block_shift = -1
            self._block_mask = 0
        self._num_free_rows = 0
        self._busy = 0
        self._writing = 0
        self._owned = 0
        self._next_order = 0
        self._next_version = 0
        self._num_sequences = 0
        self._rows_used = 0
        self._rows_capacity = 0
        self._total_blocks = 0
        self._pool_tail = 0
        self._pool_garbage = 0
        self._rebuild_index(MIN_INDEX_CAPACITY)
        self._grow_rows(16)
        self._pool_map = None
        self._set_pool(_new_pool_map(MIN_POOL_CAPACITY), MIN_POOL_CAPACITY)

    @classmethod
    def with_block_size(cls, block_size):
        """Create an empty table whose blocks hold ``block_size`` tokens.

        Parameters
        ----------
        block_size : int
            Tokens per block, a positive integer up to ``2**31 - 1``.

        Returns
        -------
        PageTable
        """
        return cls(block_size)

    # ------------------------------------------------------------------ storage

    cdef int _set_pool(self, object pool_map, int64_t capacity) except -1:
        self._pool_map = pool_map
        self._pool_arr = np.frombuffer(pool_map, dtype=np.int32, count=capacity)
        self._pool = <int32_t*>cnp.PyArray_DATA(self._pool_arr)
        self._pool_capacity = capacity
        return 0

    cdef int _wait_for_readers(self) except -1:
        """Before moving storage, wait for batched reads in flight in other threads.

        No read starts while a change is in progress (``_read_begin`` waits), so
        only reads that began before this change are waited for.
        """
        if self._busy:
            _wait_while_set(&self._busy, _READS_IN_FLIGHT)
        return 0

    cdef int _begin_write(self) except -1:
        """Refuse a change while another thread's change is in progress; else start one.

        Changes hold the GIL, but allocating or freeing mapped memory lets other
        threads run in the middle of one, and a second change interleaved there
        would break the first.  The caller resets ``_writing`` when it is done.
        A table that a KVCacheManager owns refuses every change from outside it.
        """
        if self._writing or self._owned:
            self._refuse_write()
        self._writing = 1
        return 0

    cdef int _refuse_write(self) except -1:
        if self._owned:
            raise RuntimeError(_OWNED)
        raise RuntimeError(_CONCURRENT_WRITE)

    cdef int64_t _read_begin(self) except -1:
        """Start a batched read: refuse one while a change is half-done; return the stamp.

        The caller runs its read, then ``_read_end``, and keeps the result only if
        ``_read_end`` says nothing changed meanwhile (see ``_read_end``).  In between,
        storage cannot move (``_busy``), so every pointer the read took stays valid.
        """
        if self._writing:
            _wait_while_set(&self._writing, _READ_DURING_CHANGE)
        self._busy += 1
        return self._next_version

    cdef bint _read_end(self, int64_t stamp) noexcept:
        """End a batched read; whether no change overlapped it.

        Every change bumps ``_next_version`` while holding the GIL, or marks the table
        ``_writing`` while it lets other threads run; a read that saw neither saw one
        state of the table.  A read that did gets run again.
        """
        self._busy -= 1
        return self._next_version == stamp and not self._writing

    cdef int _resize_pool(self, int64_t capacity) except -1:
        """Give the pool ``capacity`` entries, keeping its first ``_pool_tail``.

        On Linux the anonymous mapping is resized with ``mremap``: no copy, no
        transient second pool, and pages past the tail cost nothing until written.
        Elsewhere (or if the resize is refused) a fresh mapping is filled by a copy.
        """
        pool_map = self._pool_map
        cdef int64_t old_capacity = self._pool_capacity
        self._wait_for_readers()
        # From here to the end of the resize nothing releases the GIL or runs Python
        # code, so no other thread can see the pool without its buffer.
        self._pool_arr = None           # drop the buffer export so the map may move
        try:
            pool_map.resize(<Py_ssize_t>capacity * sizeof(int32_t))
        except (BufferError, OSError, SystemError, ValueError, TypeError):
            self._set_pool(pool_map, old_capacity)    # the map is as it was
            fresh = _new_pool_map(capacity)            # may let another thread run
            np.frombuffer(fresh, dtype=np.int32, count=self._pool_tail)[:] = \
                self._pool_arr[:self._pool_tail]
            self._wait_for_readers()
            pool_map = fresh
        except BaseException:
            self._set_pool(pool_map, old_capacity)
            raise
        self._set_pool(pool_map, capacity)
        return 0

    cdef object _allocate_index(self, int64_t capacity):
        """Install an empty index of ``capacity`` slots; return the old arrays.

        The caller reinserts the rows, then drops what this returns.
        """
        keys = _zeros(capacity, cnp.NPY_INT64)
        # Every byte 0xFF: each key reads as EMPTY_KEY (-1).
        memset(cnp.PyArray_DATA(<cnp.ndarray>keys), 0xFF, <size_t>capacity * sizeof(int64_t))
        rows = _zeros(capacity, cnp.NPY_INT32)
        # Allocation above may let another thread run; the swap below may not.  The
        # old arrays stay referenced until every pointer is switched: freeing a mapped
        # array releases the GIL (munmap), and no thread may see a stale pointer then.
        self._wait_for_readers()
        retired = (self._index_keys_arr, self._index_rows_arr)
        self._index_keys_arr = keys
        self._index_rows_arr = rows
        self._index_keys = <int64_t*>cnp.PyArray_DATA(self._index_keys_arr)
        self._index_rows = <int32_t*>cnp.PyArray_DATA(self._index_rows_arr)
        self._index_mask = capacity - 1
        self._index_shift = _shift_for(capacity)
        return retired

    cdef void _index_insert(self, seq_id_t seq_id, row_t row) noexcept nogil:
        cdef uint64_t slot = _hash_slot(seq_id, self._index_shift)
        while self._index_keys[slot] != EMPTY_KEY:
            slot = (slot + 1) & <uint64_t>self._index_mask
        self._index_keys[slot] = seq_id
        self._index_rows[slot] = row

    cdef void _index_remove(self, seq_id_t seq_id) noexcept nogil:
        # Backward-shift deletion: pull later members of the probe chain into the hole
        # so that no tombstone is needed and every chain stays unbroken.
        cdef uint64_t mask = <uint64_t>self._index_mask
        cdef uint64_t hole = _hash_slot(seq_id, self._index_shift)
        cdef uint64_t probe, home
        while self._index_keys[hole] != seq_id:
            if self._index_keys[hole] == EMPTY_KEY:
                return
            hole = (hole + 1) & mask
        probe = hole
        while True:
            probe = (probe + 1) & mask
            if self._index_keys[probe] == EMPTY_KEY:
                break
            home = _hash_slot(self._index_keys[probe], self._index_shift)
            # The entry at ``probe`` may move into ``hole`` only if its home slot is
            # not cyclically within (hole, probe].
            if hole <= probe:
                if hole < home and home <= probe:
                    continue
            else:
                if hole < home or home <= probe:
                    continue
            self._index_keys[hole] = self._index_keys[probe]
            self._index_rows[hole] = self._index_rows[probe]
            hole = probe
        self._index_keys[hole] = EMPTY_KEY
        self._index_rows[hole] = -1

    cdef int _grow_index(self) except -1:
        # Small indexes grow fourfold: a batch creating a thousand sequences would
        # otherwise rebuild one eight times.  From SMALL_INDEX slots on, every slot
        # is resident memory (keys are filled with EMPTY_KEY), so growth halves.
        cdef int64_t capacity = self._index_mask + 1
        return self._rebuild_index(capacity * (4 if capacity < SMALL_INDEX else 2))

    cdef int _reserve_sequences(self, int64_t extra) except -1:
        """Grow the index and the row arrays once for up to ``extra`` more sequences."""
        cdef int64_t capacity = self._index_mask + 1
        cdef int64_t needed = self._num_sequences + extra
        cdef int64_t new_rows = extra - self._num_free_rows
        while needed * INDEX_LOAD_DEN > capacity * INDEX_LOAD_NUM:
            capacity *= 2
        if capacity != self._index_mask + 1:
            self._rebuild_index(capacity)
        if new_rows > 0 and self._rows_used + new_rows > self._rows_capacity:
            if self._rows_used + new_rows >= C_INT32_MAX // 2:
                raise OverflowError("a PageTable holds at most 2**30 sequences")
            self._grow_rows(<int32_t>max(ROWS_GROWTH * <int64_t>self._rows_capacity,
                                         self._rows_used + new_rows))
        return 0

    cdef int _rebuild_index(self, int64_t capacity) except -1:
        cdef row_t row
        retired = self._allocate_index(capacity)
        for row in range(self._rows_used):
            if self._row_seq[row] >= 0:
                self._index_insert(self._row_seq[row], row)
        del retired     # only now may freeing the old index let another thread run
        return 0

    cdef int _grow_rows(self, int32_t capacity) except -1:
        cdef int64_t used = self._rows_used
        # Rows past _rows_used are never read, so zeros (untouched pages) will do.
        start = _zeros(capacity, cnp.NPY_INT64)
        length = _zeros(capacity, cnp.NPY_INT32)
        cap = _zeros(capacity, cnp.NPY_INT32)
        seq = _zeros(capacity, cnp.NPY_INT64)
        order = _zeros(capacity, cnp.NPY_INT64)
        pending = _zeros(capacity, cnp.NPY_INT32)
        version = _zeros(capacity, cnp.NPY_INT64)
        rewrite = _zeros(capacity, cnp.NPY_INT64)
        free_stack = _zeros(capacity, cnp.NPY_INT32)
        if used:
            _copy_prefix(start, self._row_start_arr, used)
            _copy_prefix(length, self._row_len_arr, used)
            _copy_prefix(cap, self._row_cap_arr, used)
            _copy_prefix(seq, self._row_seq_arr, used)
            _copy_prefix(order, self._row_order_arr, used)
            _copy_prefix(pending, self._row_pending_arr, used)
            _copy_prefix(version, self._row_version_arr, used)
            _copy_prefix(rewrite, self._row_rewrite_arr, used)
            _copy_prefix(free_stack, self._free_stack_arr, self._num_free_rows)
        # Allocation above may let another thread run; the swap below may not.  The
        # old arrays stay referenced until every pointer is switched: freeing a mapped
        # array releases the GIL (munmap), and no thread may see a stale pointer then.
        self._wait_for_readers()
        retired = (self._row_start_arr, self._row_len_arr, self._row_cap_arr, self._row_seq_arr,
                   self._row_order_arr, self._row_pending_arr, self._row_version_arr,
                   self._row_rewrite_arr, self._free_stack_arr)
        self._row_start_arr = start
        self._row_len_arr = length
        self._row_cap_arr = cap
        self._row_seq_arr = seq
        self._row_order_arr = order
        self._row_start = <int64_t*>cnp.PyArray_DATA(start)
        self._row_len = <int32_t*>cnp.PyArray_DATA(length)
        self._row_cap = <int32_t*>cnp.PyArray_DATA(cap)
        self._row_seq = <int64_t*>cnp.PyArray_DATA(seq)
        self._row_order = <int64_t*>cnp.PyArray_DATA(order)
        self._row_pending_arr = pending
        self._row_pending = <int32_t*>cnp.PyArray_DATA(pending)
        self._row_version_arr = version
        self._row_version = <int64_t*>cnp.PyArray_DATA(version)
        self._row_rewrite_arr = rewrite
        self._row_rewrite = <int64_t*>cnp.PyArray_DATA(rewrite)
        self._free_stack_arr = free_stack
        self._free_stack = <int32_t*>cnp.PyArray_DATA(free_stack)
        self._rows_capacity = capacity
        return 0

    cdef row_t _find_row(self, seq_id_t seq_id) noexcept nogil:
        cdef uint64_t slot
        cdef int64_t key
        if seq_id < 0:
            return -1
        slot = _hash_slot(seq_id, self._index_shift)
        while True:
            key = self._index_keys[slot]
            if key == seq_id:
                return self._index_rows[slot]
            if key == EMPTY_KEY:
                return -1
            slot = (slot + 1) & <uint64_t>self._index_mask

    cdef row_t _get_or_create_row(self, seq_id_t seq_id) except -1:
        cdef row_t row = self._find_row(seq_id)
        if row >= 0:
            return row
        return self._create_row(seq_id)

    cdef row_t _create_row(self, seq_id_t seq_id) except -1:
        """Add a sequence known to be absent; return its (empty) row."""
        cdef row_t row
        if seq_id < 0:
            # A negative key would read as an empty index slot (-1) or corrupt a probe
            # chain; every entry point checks ids, and this is the last line.
            raise ValueError(f"sequence ids must be in 0..{INT64_MAX}, got {seq_id}")
        # Reserve everything first, so a MemoryError leaves no half-made row.
        if (self._num_sequences + 1) * INDEX_LOAD_DEN > (self._index_mask + 1) * INDEX_LOAD_NUM:
            self._grow_index()
        if self._num_free_rows:
            self._num_free_rows -= 1
            row = self._free_stack[self._num_free_rows]
        else:
            if self._rows_used == self._rows_capacity:
                if self._rows_capacity >= C_INT32_MAX // 2:
                    raise OverflowError("a PageTable holds at most 2**30 sequences")
                self._grow_rows(<int32_t>min(ROWS_GROWTH * <int64_t>self._rows_capacity,
                                             C_INT32_MAX // 2))
            row = self._rows_used
            self._rows_used += 1
        self._row_start[row] = self._pool_tail
        self._row_len[row] = 0
        self._row_cap[row] = 0
        self._row_seq[row] = seq_id
        self._row_order[row] = self._next_order
        self._next_version += 1
        self._row_version[row] = self._next_version
        self._row_rewrite[row] = self._next_version
        self._next_order += 1
        self._index_insert(seq_id, row)
        self._num_sequences += 1
        return row

    cdef TableView _view(self) noexcept nogil:
        cdef TableView view
        view.index_keys = self._index_keys
        view.index_rows = self._index_rows
        view.index_mask = self._index_mask
        view.index_shift = self._index_shift
        view.row_start = self._row_start
        view.row_len = self._row_len
        view.row_seq = self._row_seq
        view.rows_used = self._rows_used
        view.pool = self._pool
        view.pool_capacity = self._pool_capacity
        view.block_size = self._block_size
        view.block_shift = self._block_shift
        view.block_mask = self._block_mask
        return view

    cdef int _compact_into(self, object target_arr) except -1:
        """Copy every live row, in pool order, to the front of ``target_arr``.

        ``target_arr`` may be the pool itself (in-place compaction: rows only move
        towards the front, in start order, so ``memmove`` never overwrites data that
        is still to be read) or a larger fresh array (growth).
        """
        cdef int32_t* target = <int32_t*>cnp.PyArray_DATA(target_arr)
        cdef int64_t write = 0
        cdef int64_t i, n
        cdef row_t row
        starts = self._row_start_arr[:self._rows_used]
        live = np.flatnonzero(self._row_seq_arr[:self._rows_used] >= 0).astype(np.int32)
        cdef int32_t[::1] order = live[np.argsort(starts[live], kind="stable")]
        n = order.shape[0]
        # numpy above may have let another thread start a read; check just before moving.
        self._wait_for_readers()
        # Rows move: the GIL stays held so that no other thread reads or writes meanwhile.
        for i in range(n):
            row = order[i]
            if self._row_len[row]:
                memmove(target + write, self._pool + self._row_start[row],
                        <size_t>self._row_len[row] * sizeof(int32_t))
            self._row_start[row] = write
            write += self._row_cap[row]
        # Free rows point at the tail so that they look empty and harmless.
        for i in range(self._rows_used):
            if self._row_seq[i] < 0:
                self._row_start[i] = write
        self._pool_tail = write
        self._pool_garbage = 0
        return 0

    cdef int _ensure_pool_space(self, int64_t needed) except -1:
        """Make room for ``needed`` more entries at the pool's tail."""
        cdef int64_t live
        if self._pool_tail + needed <= self._pool_capacity:
            return 0
        live = self._pool_tail - self._pool_garbage
        # Compacting in place costs no memory; do it when it reclaims a fair share.
        if self._pool_garbage and self._pool_garbage * 4 >= live:
            self._compact_into(self._pool_arr)
            if self._pool_tail + needed <= self._pool_capacity:
                return 0
        self._resize_pool(max(live + needed + ((live + needed) >> 1), <int64_t>MIN_POOL_CAPACITY))
        return 0

    cdef int _maybe_shrink(self) except -1:
        """After removals, compact and hand memory back once most of the pool is garbage.

        Optional maintenance: it never raises.  Each step either completes or leaves
        the storage as it was (a read that started in another thread, or memory that
        cannot be had, just skips it until a later removal).
        """
        cdef int64_t live = self._pool_tail - self._pool_garbage
        if self._pool_garbage <= live or self._pool_capacity <= 65536 or self._busy:
            return 0
        try:
            self._compact_into(self._pool_arr)
            if self._pool_capacity > 2 * (self._pool_tail + MIN_POOL_CAPACITY):
                self._resize_pool(self._pool_tail + (self._pool_tail >> 1) + MIN_POOL_CAPACITY)
            self._release_tail_pages()
        except Exception:
            pass
        return 0

    cdef int _reserve_row(self, row_t row, int64_t min_capacity) except -1:
        cdef int64_t capacity = self._row_cap[row]
        cdef int64_t new_capacity, old_start
        if min_capacity <= capacity:
            return 0
        if min_capacity > C_INT32_MAX:
            raise OverflowError("a sequence holds at most 2**31 - 1 blocks")
        # A row that ends at the pool's tail grows in place.
        if self._row_start[row] + capacity == self._pool_tail:
            if self._pool_tail + (min_capacity - capacity) <= self._pool_capacity:
                self._pool_tail += min_capacity - capacity
                self._row_cap[row] = <int32_t>min_capacity
                return 0
        if capacity == 0:
            new_capacity = min_capacity
        else:
            new_capacity = max(min_capacity, capacity + (capacity >> 2) + 4)
            new_capacity = min(new_capacity, <int64_t>C_INT32_MAX)
        self._ensure_pool_space(new_capacity)   # may move every row
        old_start = self._row_start[row]
        if self._row_len[row]:
            memcpy(self._pool + self._pool_tail, self._pool + old_start,
                   <size_t>self._row_len[row] * sizeof(int32_t))
        if old_start + self._row_cap[row] == self._pool_tail:
            self._pool_tail = old_start    # never happens after a move, kept for safety
        else:
            self._pool_garbage += self._row_cap[row]
        self._row_start[row] = self._pool_tail
        self._row_cap[row] = <int32_t>new_capacity
        self._pool_tail += new_capacity
        # Abandoned room stays resident until reclaimed: compact once it is a quarter
        # of the live data, so resident memory tracks the mapped blocks.
        if (self._pool_garbage > 4096 and self._busy == 0
                and self._pool_garbage * 4 > self._pool_tail - self._pool_garbage):
            # Optional maintenance: the row has moved, so this call may not fail now.
            try:
                self._compact_into(self._pool_arr)
                self._release_tail_pages()
            except Exception:
                pass
        return 0

    cdef int _populate(self, int64_t begin) except -1:
        """Fault in the pool's pages from entry ``begin`` to the tail in one call.

        A batch about to write a large fresh stretch of the pool would otherwise take
        one page fault per 4 KiB as it goes; ``MADV_POPULATE_WRITE`` (Linux 5.14+)
        maps them all at once.  Where the kernel lacks it, the faults happen as before.
        """
        cdef Py_ssize_t page = _mmap.PAGESIZE
        cdef Py_ssize_t first = (<Py_ssize_t>begin * sizeof(int32_t) // page) * page
        cdef Py_ssize_t last = <Py_ssize_t>self._pool_tail * sizeof(int32_t)
        if last - first < POPULATE_MIN_BYTES or not _LINUX:    # the advice is Linux's own
            return 0
        try:
            self._pool_map.madvise(MADV_POPULATE_WRITE, first, last - first)
        except (OSError, ValueError, AttributeError):
            pass
        return 0

    cdef int _release_tail_pages(self) except -1:
        """Return the pages past the tail to the OS (they read back as zeros)."""
        cdef Py_ssize_t page = _mmap.PAGESIZE
        cdef Py_ssize_t begin = ((<Py_ssize_t>self._pool_tail * sizeof(int32_t) + page - 1) // page) * page
        cdef Py_ssize_t end = (<Py_ssize_t>self._pool_capacity * sizeof(int32_t) // page) * page
        advice = getattr(_mmap, "MADV_DONTNEED", None)
        if advice is None or end <= begin:
            return 0
        try:
            self._pool_map.madvise(advice, begin, end - begin)
        except (OSError, ValueError, AttributeError):
            pass
        return 0

    cdef int _append_to_row(self, row_t row, const block_id_t* blocks, int64_t count) except -1:
        cdef int64_t length = self._row_len[row]
        if count <= 0:
            return 0
        self._reserve_row(row, length + count)
        memcpy(self._pool + self._row_start[row] + length, blocks, <size_t>count * sizeof(int32_t))
        self._row_len[row] = <int32_t>(length + count)
        self._next_version += 1
        self._row_version[row] = self._next_version
        self._total_blocks += count
        return 0

    cdef int _drop_row(self, row_t row) except -1:
        cdef int64_t start = self._row_start[row]
        cdef int64_t capacity = self._row_cap[row]
        self._index_remove(self._row_seq[row])
        if start + capacity == self._pool_tail:
            self._pool_tail = start
        else:
            self._pool_garbage += capacity
        self._total_blocks -= self._row_len[row]
        self._row_len[row] = 0
        self._row_cap[row] = 0
        self._row_seq[row] = -1
        self._row_start[row] = self._pool_tail
        self._num_sequences -= 1
        self._next_version += 1      # readers in flight see that something changed
        self._free_stack[self._num_free_rows] = row
        self._num_free_rows += 1
        if self._num_sequences == 0:
            # An empty table gives its whole pool back to reuse from the front.
            self._pool_tail = 0
            self._pool_garbage = 0
        self._maybe_shrink()
        return 0

    cdef row_t _row_or_raise(self, seq_id_t seq_id, str name) except -1:
        cdef row_t row = self._find_row(seq_id)
        if row < 0:
            raise KeyError(f"{name} {seq_id} is not in the table")
        return row

    cdef object _row_array(self, row_t row):
        """A copy of a row's blocks, or None if the row's sequence went meanwhile.

        Allocating may run another thread, which may change the row: the copy is
        taken only once the row's length is the one the array was sized for, with
        nothing in between that could let another thread run.
        """
        cdef seq_id_t seq_id = self._row_seq[row]
        cdef int32_t length = -1
        result = None
        while seq_id >= 0 and self._row_seq[row] == seq_id:
            if self._row_len[row] == length:
                if length:
                    memcpy(cnp.PyArray_DATA(result), self._row_data(row),
                           <size_t>length * sizeof(int32_t))
                return result
            length = self._row_len[row]
            result = _empty(length, cnp.NPY_INT32)
        return None

    cdef int _capture(self, object rows_array, int64_t* starts, int32_t* lengths) except -1:
        """Each row's start and length, all from one moment.

        A plain C loop holding the GIL: no other thread runs in it.  ``starts`` may
        be NULL.  What it captured stays inside the pool until ``_read_end``, since
        the pool does not shrink or move while a read is in flight.
        """
        cdef int64_t b, count = cnp.PyArray_DIM(<cnp.ndarray>rows_array, 0)
        cdef const int32_t* rows = _i32(rows_array)
        cdef row_t row
        for b in range(count):
            row = rows[b]
            if starts != NULL:
                starts[b] = self._row_start[row]
            lengths[b] = self._row_len[row]
        return 0

    cdef object _snapshot(self, bint with_blocks, bint hold_gil=False):
        """``(seq_ids int64, lengths int32, blocks int32)`` of one state, in insertion order.

        ``blocks`` is None unless ``with_blocks``.  Copies, pickles, saved files and
        ``sequence_ids()`` all come from here.  Rows are found and ordered in C with
        the GIL held (numpy's sort would let other threads run); only the copy of the
        blocks runs without the GIL, on the first attempt, unless ``hold_gil``.
        """
        cdef int64_t stamp, count, total, b, k
        cdef int attempt
        cdef bint consistent, complete
        cdef int64_t* pairs
        cdef int64_t* id_data
        cdef int64_t* start_data
        cdef int32_t* length_data
        cdef int32_t* target
        cdef row_t row
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                count = self._num_sequences
                order = _empty(2 * count, cnp.NPY_INT64)     # (insertion stamp, row) pairs
                seq_ids = _empty(count, cnp.NPY_INT64)
                lengths = _empty(count, cnp.NPY_INT32)
                starts = _empty(count, cnp.NPY_INT64)
                pairs = _i64(order)
                id_data = _i64(seq_ids)
                start_data = _i64(starts)
                length_data = _i32(lengths)
                blocks = None
                # One C section: which rows are live, in what order, where and how long.
                k = 0
                for row in range(self._rows_used):
                    if self._row_seq[row] >= 0 and k < count:
                        pairs[2 * k] = self._row_order[row]
                        pairs[2 * k + 1] = row
                        k += 1
                complete = k == count and count == self._num_sequences
                if complete:
                    if count > 1:
                        qsort(pairs, <size_t>count, 2 * sizeof(int64_t), _compare_first)
                    total = 0
                    for b in range(count):
                        row = <row_t>pairs[2 * b + 1]
                        id_data[b] = self._row_seq[row]
                        start_data[b] = self._row_start[row]
                        length_data[b] = self._row_len[row]
                        total += length_data[b]
                    if with_blocks:
                        blocks = _empty(total, cnp.NPY_INT32)
                        target = _i32(blocks)
                        if attempt == 0 and not hold_gil:
                            with nogil:
                                _copy_packed(self._pool, start_data, length_data, count, target)
                        else:
                            # Read again with the GIL held: no change can run meanwhile.
                            _copy_packed(self._pool, start_data, length_data, count, target)
            finally:
                consistent = self._read_end(stamp)
            if consistent and complete:
                return seq_ids, lengths, blocks
        raise RuntimeError(_READ_KEPT_CHANGING)

    # ------------------------------------------------------------------ seed API

    @property
    def block_size(self):
        """Tokens per block (read-only)."""
        return self._block_size

    @property
    def total_blocks(self):
        """Number of block entries mapped across all sequences."""
        return self._total_blocks

    cpdef append_block(self, sequence_id, block_id):
        """Append one physical block to a sequence, creating the sequence on first use.

        Parameters
        ----------
        sequence_id : int
            Sequence id in ``0 .. 2**63 - 1``.
        block_id : int
            Physical block id in ``0 .. 2**31 - 1``.
        """
        cdef seq_id_t seq_id = _seq_arg(sequence_id)
        cdef block_id_t block = _block_arg(block_id)
        if self._writing or self._owned:
            self._refuse_write()
        cdef row_t row = self._find_row(seq_id)
        cdef int32_t length = self._row_len[row] if row >= 0 else 0
        cdef bint created = False
        if row < 0 or length >= self._row_cap[row]:
            # The slow path may allocate, and so let other threads run.
            self._writing = 1
            try:
                if row < 0:
                    row = self._create_row(seq_id)
                    created = True
                # A sequence grown one block at a time starts with room for four.
                self._reserve_row(row, <int64_t>length + 1 if length else 4)
            except BaseException:
                if created:
                    self._drop_row(row)     # a failed call leaves no empty sequence
                raise
            finally:
                self._writing = 0
        self._pool[self._row_start[row] + length] = block
        self._row_len[row] = length + 1
        self._next_version += 1
        self._row_version[row] = self._next_version
        self._total_blocks += 1

    cpdef get_block_for_position(self, sequence_id, token_pos):
        """Return ``(block_id, offset)`` for a token position, or ``None``.

        Parameters
        ----------
        sequence_id : int
            Sequence id in ``0 .. 2**63 - 1``.
        token_pos : int
            Logical token position, ``>= 0``.

        Returns
        -------
        tuple of (int, int) or None
            ``None`` when the sequence is unknown or the position lies past its
            mapped blocks.

        Raises
        ------
        TypeError
            If either argument is not an integer.
        ValueError
            If ``token_pos`` is negative or ``sequence_id`` out of range.
        """
        cdef seq_id_t seq_id = _seq_arg(sequence_id)
        cdef int overflow = 0
        cdef long long pos
        cdef int64_t block_index
        cdef row_t row
        if type(token_pos) is not int:
            token_pos = as_index(token_pos, "token_pos")
        pos = PyLong_AsLongLongAndOverflow(token_pos, &overflow)
        if overflow > 0:
            return None
        if overflow < 0 or pos < 0:
            raise ValueError(f"token_pos must be non-negative, got {token_pos}")
        row = self._find_row(seq_id)
        if row < 0:
            return None
        if self._block_shift >= 0:
            block_index = pos >> self._block_shift
        else:
            block_index = pos // self._block_size
        if block_index >= self._row_len[row]:
            return None
        return (self._pool[self._row_start[row] + block_index],
                pos - block_index * self._block_size)

    def get_sequence_blocks(self, sequence_id):
        """Return a sequence's block ids in logical order, or ``None`` if it is unknown.

        Parameters
        ----------
        sequence_id : int

        Returns
        -------
        numpy.ndarray of int32 or None
            A fresh copy: index ``i`` holds the block of tokens
            ``i * block_size .. (i + 1) * block_size - 1``.  Changing it does not
            change the table, and later changes to the table do not show in it.
        """
        cdef seq_id_t seq_id = _seq_arg(sequence_id)
        cdef row_t row
        if self._writing:
            _wait_while_set(&self._writing, _READ_DURING_CHANGE)
        row = self._find_row(seq_id)
        if row < 0:
            return None
        return self._row_array(row)

    def remove_sequence(self, sequence_id):
        """Remove a sequence and return its block ids so the caller can free them.

        Parameters
        ----------
        sequence_id : int

        Returns
        -------
        numpy.ndarray of int32 or None
            The removed blocks in logical order; ``None`` if the id was absent.
        """
        cdef seq_id_t seq_id = _seq_arg(sequence_id)
        cdef row_t row
        self._begin_write()
        try:
            row = self._find_row(seq_id)
            if row < 0:
                return None
            blocks = self._row_array(row)
            self._drop_row(row)
            return blocks
        finally:
            self._writing = 0

    cpdef Py_ssize_t num_sequences(self):
        """Return the number of sequences in the table."""
        return self._num_sequences

    def __len__(self):
        return self._num_sequences

    def __contains__(self, sequence_id):
        cdef int overflow = 0
        cdef long long value
        if type(sequence_id) is not int:
            if isinstance(sequence_id, (bool, np.bool_)):
                return False
            try:
                sequence_id = as_index(sequence_id, "sequence_id")
            except TypeError:
                return False
        value = PyLong_AsLongLongAndOverflow(sequence_id, &overflow)
        if overflow != 0 or value < 0:
            return False
        return self._find_row(value) >= 0

    def __iter__(self):
        """Iterate over sequence ids in insertion order."""
        return iter(self.sequence_ids().tolist())

    def sequence_ids(self):
        """Return every sequence id, in insertion order, as an int64 array."""
        return self._snapshot(False)[0]

    def __repr__(self):
        shown = []
        limit = 8
        seq_ids, lengths, blocks = self._snapshot(True)
        ends = np.cumsum(lengths, dtype=np.int64)
        for i in range(min(limit, seq_ids.shape[0])):
            length = int(lengths[i])
            first = int(ends[i]) - length
            text = ", ".join(map(str, blocks[first:first + min(length, limit)].tolist()))
            if length > limit:
                text += f", ... ({length} blocks)"
            shown.append(f"{int(seq_ids[i])}: [{text}]")
        if seq_ids.shape[0] > limit:
            shown.append(f"... ({seq_ids.shape[0]} sequences)")
        return (f"PageTable(block_size={self._block_size}, num_sequences={seq_ids.shape[0]}, "
                f"total_blocks={blocks.shape[0]}, sequences={{{', '.join(shown)}}})")

    def __eq__(self, other):
        cdef PageTable that
        cdef row_t row, other_row
        if not isinstance(other, PageTable):
            return NotImplemented
        that = <PageTable>other
        if (self._block_size != that._block_size
                or self._num_sequences != that._num_sequences
                or self._total_blocks != that._total_blocks):
            return False
        for row in range(self._rows_used):
            if self._row_seq[row] < 0:
                continue
            other_row = that._find_row(self._row_seq[row])
            if other_row < 0 or that._row_len[other_row] != self._row_len[row]:
                return False
            if self._row_len[row] and memcmp(self._row_data(row), that._row_data(other_row),
                                             <size_t>self._row_len[row] * sizeof(int32_t)) != 0:
                return False
        return True

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    __hash__ = None

    # ------------------------------------------------------------------ copying

    def _state(self):
        """The table's state dict: plain arrays, validated when loaded (``pagetable._state``)."""
        seq_ids, lengths, blocks = self._snapshot(True)
        state = _state.header("PageTable")
        state["block_size"] = np.array(self._block_size, dtype=np.int64)
        state["seq_ids"] = seq_ids
        state["lengths"] = lengths
        state["blocks"] = blocks
        return state

    @staticmethod
    def _from_state(state):
        """A table built from a state dict; ``CorruptStateError`` if it is not valid."""
        _state.check_kind(state, "PageTable")
        block_size, seq_ids, lengths, blocks = _state.table_state(state)
        return _table_from_rows(block_size, seq_ids, lengths, blocks)

    def save(self, path):
        """Save the table to ``path`` (a file name or a binary file object).

        The file is an uncompressed ``.npz`` of plain integer arrays in pagetable's
        versioned format (see ``pagetable._state``); load it with
        :meth:`PageTable.load` or :func:`pagetable.load`.  Change stamps are not
        saved: a loaded table starts new ones.
        """
        _state.write(path, self._state())

    @classmethod
    def load(cls, path):
        """Load a table saved by :meth:`save`.

        Raises
        ------
        CorruptStateError
            The file is truncated, tampered with, of another version, holds another
            kind of object, or holds an inconsistent table.  Nothing is built.
        """
        return PageTable._from_state(_state.read(path))

    def copy(self):
        """Return an independent copy of the table (the seed's Clone)."""
        return PageTable._from_state(self._state())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_restore, (self._state(),))

    # ------------------------------------------------------------------ batched API

    def append_blocks(self, seq_ids, block_ids):
        """Append many blocks at once, in order; all or nothing.

        Parameters
        ----------
        seq_ids : array_like of int, shape (n,)
            Sequence of each block; ids in ``0 .. 2**63 - 1``.
        block_ids : array_like of int, shape (n,)
            Physical block ids in ``0 .. 2**31 - 1``.

        Notes
        -----
        Equivalent to ``append_block(s, b)`` for each pair in order, but validated in
        full before the first block is appended.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        if is_kernel_vector(block_ids, cnp.NPY_INT32):
            block_array = block_ids       # already what the pool holds
        else:
            block_array = int_vector(block_ids, "block_ids", cnp.NPY_INT64)
        if seq_array.shape[0] != block_array.shape[0]:
            raise ValueError(
                f"seq_ids and block_ids must have the same length, "
                f"got {seq_array.shape[0]} and {block_array.shape[0]}")
        cdef int64_t n = seq_array.shape[0]
        if n == 0:
            return
        cdef int64_t low, high
        cdef bint narrow = cnp.PyArray_TYPE(<cnp.ndarray>block_array) == cnp.NPY_INT32
        cdef const int64_t* seqs = _i64(seq_array)
        cdef const int64_t* blocks64 = _i64(block_array)
        cdef const int32_t* blocks32 = _i32(block_array)
        cdef int64_t num_runs
        with nogil:    # C loops: numpy's reductions cost more than the scan on small batches
            low = _min_and_runs(seqs, n, &num_runs)
        if low < 0:
            raise ValueError(f"seq_ids must be in 0..{INT64_MAX}, got {low}")
        with nogil:
            if narrow:
                low = _min_i32(blocks32, n)
                high = 0
            else:
                low = _min_i64(blocks64, n)
                high = _max_i64(blocks64, n)
        if low < 0:
            raise ValueError(f"block_ids must be in 0..{INT32_MAX}, got {low}")
        if high > INT32_MAX:
            raise OverflowError(f"block_ids must be in 0..{INT32_MAX}, got {high}")
        self._begin_write()
        try:
            self._append_many(seq_array, block_array, num_runs)
        finally:
            self._writing = 0

    cdef int _append_many(self, object seq_array, object block_array, int64_t num_runs) except -1:
        """Append validated blocks: grow each touched row once, then copy run by run.

        ``num_runs`` is the number of runs of equal ids in ``seq_array`` (counted
        while validating it).  ``block_array`` is int32 or int64 (values already checked to fit int32); an
        int64 one is narrowed while copying, so no converted copy of the input is made.
        Temporary memory is a row and an end per run of equal ids and one entry per
        touched row, from the module's reused scratch buffer, so a bulk load of
        grouped blocks needs almost none and interleaved input faults in no fresh
        pages.  ``_row_pending`` is all zeros between calls; it counts each row's new
        blocks so that interleaved input grows (and moves) a row once per call
        instead of once per block.

        The input arrays may be the caller's own, and growing the table may let
        another thread run and change them.  So the ids are read in one pass that
        records each run's row and end, checked against ``num_runs`` as it goes, and
        the copy follows that record: whatever happens to the input, every write
        lands in room reserved for it.
        """
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        cdef const int64_t* seqs = _i64(seq_array)
        cdef bint narrow = cnp.PyArray_TYPE(<cnp.ndarray>block_array) == cnp.NPY_INT32
        cdef const int32_t* blocks32 = _i32(block_array)
        cdef const int64_t* blocks64 = _i64(block_array)
        cdef int64_t i, k, r, end, num_touched = 0, first_new_order = self._next_order
        cdef int64_t count, slot, missing = 0, old_tail = self._pool_tail, runs_seen = 0
        cdef seq_id_t seq_id
        cdef row_t row
        cdef TableView view
        cdef int32_t* pending
        cdef int32_t* pool
        cdef int32_t* row_len
        cdef int64_t* row_start
        cdef int32_t length
        cdef bint interleaved = num_runs == n
        # Per run: its row (int32), then per touched row (int32), then per run its
        # end (int64, 8-byte aligned: it starts 8 * num_runs bytes in).
        scratch = _take_scratch(4 * num_runs)
        cdef int32_t* run_rows = _i32(scratch)
        cdef int32_t* touched = run_rows + num_runs
        cdef int64_t* run_ends = <int64_t*>(run_rows + 2 * num_runs)
        try:
            # One pool reservation covers every new row (each gets its exact room at
            # the tail).  When runs are long (grouped input, where runs are
            # sequences), count the new ids first and size the index and row arrays
            # once; interleaved input would pay a second probe per block for that, so
            # there they grow by doubling.
            self._ensure_pool_space(n)
            if num_runs * 4 <= n:
                i = 0
                while i < n:
                    if self._find_row(seqs[i]) < 0:
                        missing += 1
                    i = _run_end(seqs, i, n)
                if missing:
                    self._reserve_sequences(missing)
            i = 0
            r = 0
            # Local copies of the table's pointers: the compiler would reload them
            # after every store otherwise.  Creating a row may move the arrays, so
            # they are refreshed after each creation.
            view = self._view()
            pending = self._row_pending
            while i < n:
                # When every run is one block (interleaved input), skip the run scan.
                end = i + 1 if interleaved else _run_end(seqs, i, n)
                seq_id = seqs[i]
                if r >= num_runs or seq_id < 0:
                    self._undo_pending(touched, num_touched, first_new_order)
                    raise ValueError(
                        "seq_ids changed while append_blocks read it (another thread "
                        "wrote to the array); nothing was appended")
                row = _view_find(&view, seq_id)
                if row < 0:
                    try:
                        row = self._create_row(seq_id)
                    except BaseException:
                        self._undo_pending(touched, num_touched, first_new_order)
                        raise
                    view = self._view()
                    pending = self._row_pending
                run_rows[r] = row
                run_ends[r] = end
                r += 1
                if pending[row] == 0:
                    touched[num_touched] = row
                    num_touched += 1
                pending[row] += <int32_t>(end - i)
                i = end
            runs_seen = r
            try:
                for k in range(num_touched):
                    row = touched[k]
                    count = <int64_t>self._row_len[row] + self._row_pending[row]
                    if (self._row_cap[row] == 0 and self._pool_tail + count <= self._pool_capacity
                            and count <= C_INT32_MAX):
                        # A new row (no room yet, nothing to move): its exact room at
                        # the tail, which the reservation above has made.
                        self._row_start[row] = self._pool_tail
                        self._row_cap[row] = <int32_t>count
                        self._pool_tail += count
                    else:
                        self._reserve_row(row, count)
            except BaseException:
                self._undo_pending(touched, num_touched, first_new_order)
                raise
            self._populate(old_tail)
            # Writing the table: nothing below lets another thread run, and nothing
            # below reads the ids again.
            pool = self._pool
            row_start = self._row_start
            row_len = self._row_len
            if interleaved and narrow:
                # Every run is one block (interleaved input): a plain scatter.
                for i in range(n):
                    row = run_rows[i]
                    length = row_len[row]
                    pool[row_start[row] + length] = blocks32[i]
                    row_len[row] = length + 1
            else:
                i = 0
                for r in range(runs_seen):
                    row = run_rows[r]
                    end = run_ends[r]
                    slot = row_start[row] + row_len[row]
                    count = end - i
                    if count == 1:
                        pool[slot] = blocks32[i] if narrow else <int32_t>blocks64[i]
                    elif narrow:
                        memcpy(pool + slot, blocks32 + i, <size_t>count * sizeof(int32_t))
                    else:
                        for k in range(count):
                            pool[slot + k] = <int32_t>blocks64[i + k]
                    row_len[row] += <int32_t>count
                    i = end
            for k in range(num_touched):
                self._row_pending[touched[k]] = 0
                self._next_version += 1
                self._row_version[touched[k]] = self._next_version
            self._total_blocks += n
        finally:
            _give_scratch(scratch)
        return 0

    cdef int _undo_pending(self, int32_t* touched, int64_t num_touched, int64_t first_new_order) except -1:
        """Roll back a failed ``_append_many``: clear counts, drop the rows it created."""
        cdef int64_t i
        cdef row_t row
        for i in range(num_touched):
            row = touched[i]
            self._row_pending[row] = 0
            if self._row_order[row] >= first_new_order and self._row_seq[row] >= 0:
                self._drop_row(row)
        return 0

    # Batched reads follow one protocol (``_read_begin`` / ``_read_end``): storage
    # stays put while they run, anything they read from a row is captured once and
    # checked before use, and a read that overlapped a change from another thread
    # runs again, so that what it returns comes from one state of the table.

    cdef int64_t _resolve(self, object seq_array, object rows_array, bint release) except -2:
        """Fill ``rows_array`` with each id's row, without the GIL if ``release``.

        Returns the index of the first negative or unknown id, or -1.  Run between
        ``_read_begin`` and ``_read_end``.
        """
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0), bad
        cdef const int64_t* seqs = _i64(seq_array)
        cdef int32_t* rows = _i32(rows_array)
        cdef TableView view = self._view()
        if count == 0:
            return -1
        if release:
            with nogil:
                bad = _resolve_rows(&view, seqs, rows, count)
        else:
            bad = _resolve_rows(&view, seqs, rows, count)
        return bad

    cdef int _raise_unresolved(self, object seq_array, int64_t bad) except -1:
        cdef int64_t value
        if bad >= 0:
            value = _i64(seq_array)[bad]
            if value < 0:
                raise ValueError(f"seq_ids must be in 0..{INT64_MAX}, got {value} at index {bad}")
            raise KeyError(f"sequence id {value} (seq_ids[{bad}]) is not in the table")
        return 0

    def num_blocks(self, seq_ids):
        """Return the number of blocks mapped for each sequence.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)

        Returns
        -------
        numpy.ndarray of int32, shape (B,)

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0), stamp, bad = -1
        rows = _empty(count, cnp.NPY_INT32)
        lengths = _empty(count, cnp.NPY_INT32)
        cdef int attempt
        cdef bint consistent
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                if bad < 0:
                    self._capture(rows, NULL, _i32(lengths))
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                return lengths
        raise RuntimeError(_READ_KEPT_CHANGING)

    def rows(self, seq_ids):
        """Return each sequence's row in this table, as hints for batched reads.

        A row is the sequence's slot in the table's metadata: it stays the same
        while the sequence is in the table, however its blocks move.  Hand them
        back as ``rows=`` to :meth:`slot_mapping` or :meth:`lookup`, one per token,
        to skip the hash probe that maps each token's sequence id to its row.
        Hints are checked before use, so keeping them across removals is safe.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)

        Returns
        -------
        numpy.ndarray of int32, shape (B,)

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0), stamp, bad = -1
        rows = _empty(count, cnp.NPY_INT32)
        cdef int attempt
        cdef bint consistent
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                return rows
        raise RuntimeError(_READ_KEPT_CHANGING)

    def lookup(self, seq_ids, positions, strict=False, rows=None):
        """Map (sequence, position) pairs to (block id, offset within the block).

        Parameters
        ----------
        seq_ids, positions : array_like of int, shape (n,)
        strict : bool, default False
            If true, an unmapped pair raises ``IndexError`` instead of padding.
        rows : array_like of int, shape (n,), optional
            Row hints from :meth:`rows`, one per pair; see :meth:`slot_mapping`.

        Returns
        -------
        block_ids, offsets : numpy.ndarray of int32, shape (n,)
            ``PAD_SLOT_ID`` in both where the sequence is unknown, the position is
            negative, or it lies past the sequence's mapped blocks.
        """
        seq_array, pos_array = _pair(seq_ids, positions)
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        hint_array = _row_hints(rows, n)
        blocks = _empty(n, cnp.NPY_INT32)
        offsets = _empty(n, cnp.NPY_INT32)
        if n == 0:
            return blocks, offsets
        cdef const int64_t* seqs = _i64(seq_array)
        cdef const int32_t* hints = _i32(hint_array) if hint_array is not None else NULL
        cdef const int64_t* pos = _i64(pos_array)
        cdef int32_t* block_out = _i32(blocks)
        cdef int32_t* offset_out = _i32(offsets)
        cdef TableView view
        cdef int64_t bad = -1, stamp
        cdef int attempt
        cdef bint consistent = False
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                view = self._view()
                if attempt == 0:
                    with nogil:
                        bad = _lookup_range(&view, seqs, hints, pos, block_out, offset_out, 0, n)
                else:
                    # Read again with the GIL held: no change can run meanwhile.
                    bad = _lookup_range(&view, seqs, hints, pos, block_out, offset_out, 0, n)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                break
        if not consistent:
            raise RuntimeError(_READ_KEPT_CHANGING)
        self._raise_bad_seq(seq_array, bad)
        if strict:
            self._raise_unmapped(seq_array, pos_array, blocks)
        return blocks, offsets

    cdef int _raise_bad_seq(self, object seq_array, int64_t bad) except -1:
        if bad >= 0:
            raise ValueError(f"seq_ids must be in 0..{INT64_MAX}, got {seq_array[bad]} at index {bad}")
        return 0

    cdef int _raise_unmapped(self, seq_array, pos_array, result) except -1:
        unmapped = np.flatnonzero(result == PAD)
        if unmapped.shape[0]:
            i = int(unmapped[0])
            raise IndexError(
                f"position {int(pos_array[i])} of sequence {int(seq_array[i])} "
                f"(entry {i}) is not mapped")
        return 0

    def slot_mapping(self, seq_ids, positions, out=None, strict=False, rows=None):
        """Return the cache slot of each (sequence, position) pair.

        ``slot = block_id * block_size + offset``: the flat index into a KV cache laid
        out as ``[num_blocks * block_size, ...]``, what the kernel that writes new
        keys and values takes.

        Parameters
        ----------
        seq_ids, positions : array_like of int, shape (n,)
        out : numpy.ndarray of int64, shape (n,), optional
            Preallocated output buffer (native int64, C-contiguous, aligned,
            writeable).  It may overlap ``seq_ids``, ``positions`` or ``rows``: the
            slots are then computed aside and copied in, as numpy's ufuncs do.
        strict : bool, default False
            If true, an unmapped pair raises ``IndexError`` and ``out`` is left as it was.
        rows : array_like of int, shape (n,), optional
            Row hints, one per pair: ``table.rows(batch_seq_ids)[token_request]``,
            kept by the engine the way it keeps a persistent batch's row indices.
            A hint is checked against the row's sequence id before use, so a stale
            or wrong hint (a removed sequence, a reused row, -1) only costs a hash
            probe; the result never depends on the hints.

        Returns
        -------
        numpy.ndarray of int64, shape (n,)
            ``PAD_SLOT_ID`` where a pair is unmapped (unknown sequence, negative
            position, position past the mapped blocks).

        Notes
        -----
        A ``ValueError`` for a negative sequence id may leave ``out`` partly written.
        Tokens of one sequence placed next to each other cost one hash probe per
        sequence; interleaved tokens are handled exactly as well, one probe each,
        or one check of their row hint when ``rows`` is given.
        Batches of 131,072 tokens or more are split over OpenMP threads where the
        build has OpenMP (``OMP_NUM_THREADS`` sets the count).
        """
        seq_array, pos_array = _pair(seq_ids, positions)
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        hint_array = _row_hints(rows, n)
        if out is None:
            result = _empty(n, cnp.NPY_INT64)
        else:
            check_output_vector(out, n, cnp.NPY_INT64)
            if (strict or shares_memory(out, seq_array) or shares_memory(out, pos_array)
                    or (hint_array is not None and shares_memory(out, hint_array))):
                result = _empty(n, cnp.NPY_INT64)
            else:
                result = out
        if n == 0:
            return result if out is None else out
        self._slot_mapping_into(seq_array, pos_array, result, hint_array)
        if strict:
            self._raise_unmapped(seq_array, pos_array, result)
        if out is not None and result is not out:
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>out), cnp.PyArray_DATA(<cnp.ndarray>result),
                   <size_t>n * sizeof(int64_t))
            return out
        return result

    cdef int _slot_mapping_into(self, seq_array, pos_array, result, hint_array=None) except -1:
        cdef const int64_t* seqs = _i64(seq_array)
        cdef const int32_t* hints = _i32(hint_array) if hint_array is not None else NULL
        cdef const int64_t* pos = _i64(pos_array)
        cdef int64_t* out = _i64(result)
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        cdef TableView view
        cdef int64_t bad = -1, chunk, num_chunks = 0, begin, end, stamp
        cdef int64_t* chunk_bad = NULL
        cdef int threads = PAGETABLE_MAX_THREADS()
        cdef int attempt
        cdef bint consistent = False
        cdef bint parallel = n >= PARALLEL_THRESHOLD and threads > 1
        if parallel:
            num_chunks = (n + PARALLEL_CHUNK - 1) // PARALLEL_CHUNK
            chunk_results = _empty(num_chunks, cnp.NPY_INT64)
            chunk_bad = _i64(chunk_results)
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                view = self._view()
                if attempt > 0:
                    # Read again with the GIL held: no change can run meanwhile.
                    bad = _slot_mapping_range(&view, seqs, hints, pos, out, 0, n)
                elif not parallel:
                    with nogil:
                        bad = _slot_mapping_range(&view, seqs, hints, pos, out, 0, n)
                else:
                    for chunk in prange(num_chunks, nogil=True, schedule="dynamic"):
                        begin = chunk * PARALLEL_CHUNK
                        end = min(begin + PARALLEL_CHUNK, n)
                        chunk_bad[chunk] = _slot_mapping_range(&view, seqs, hints, pos, out,
                                                               begin, end)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                break
        if not consistent:
            raise RuntimeError(_READ_KEPT_CHANGING)
        if parallel and attempt == 0:
            bad = -1
            for chunk in range(num_chunks):
                if chunk_bad[chunk] >= 0:
                    bad = chunk_bad[chunk]
                    break
        self._raise_bad_seq(seq_array, bad)
        return 0

    def block_table(self, seq_ids, out=None):
        """Return the dense, padded block table of a batch of sequences.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)
        out : numpy.ndarray of int32, shape (B, W), optional
            Preallocated buffer; its width ``W`` must hold the longest row.

        Returns
        -------
        table : numpy.ndarray of int32, shape (B, W)
            Row ``b`` holds sequence ``seq_ids[b]``'s blocks, padded with
            ``PAD_SLOT_ID``; ``W`` is the longest row (or ``out``'s width).
        num_blocks : numpy.ndarray of int32, shape (B,)

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        if out is not None:
            check_output(out, (count, -1), _INT32)
        rows = _empty(count, cnp.NPY_INT32)
        num_blocks = _empty(count, cnp.NPY_INT32)
        starts = _empty(count, cnp.NPY_INT64)
        cdef int32_t* lengths = _i32(num_blocks)
        cdef int64_t* start_data = _i64(starts)
        cdef int64_t b, j, length, width = 0, stamp, bad = -1
        cdef int32_t* target
        cdef int32_t* dest
        cdef int attempt
        cdef bint consistent
        table = None
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                if bad < 0:
                    # Sizes and sources from one moment; the copy below uses only these.
                    self._capture(rows, start_data, lengths)
                    width = 0
                    for b in range(count):
                        width = max(width, <int64_t>lengths[b])
                    if out is None:
                        table = np.empty((count, width), dtype=np.int32)
                    elif out.shape[1] >= width:
                        table = out
                        width = out.shape[1]
                    else:
                        table = None
                    if table is not None and count and width:
                        target = _i32(table)
                        if attempt == 0:
                            with nogil:
                                _copy_padded(self._pool, start_data, lengths, count, target, width)
                        else:
                            _copy_padded(self._pool, start_data, lengths, count, target, width)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                if table is None:
                    raise ValueError(
                        f"out is {out.shape[1]} blocks wide but the longest sequence in the batch "
                        f"has {width} blocks")
                return table, num_blocks
        raise RuntimeError(_READ_KEPT_CHANGING)

    def to_csr(self, seq_ids):
        """Return the CSR page list of a batch: FlashInfer's ``kv_indptr`` / ``kv_indices``.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)

        Returns
        -------
        indptr : numpy.ndarray of int32, shape (B + 1,)
            ``indices[indptr[b]:indptr[b + 1]]`` are sequence ``seq_ids[b]``'s blocks.
        indices : numpy.ndarray of int32, shape (nnz,)

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        OverflowError
            If the batch maps more than ``2**31 - 1`` blocks.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        rows = _empty(count, cnp.NPY_INT32)
        lengths = _empty(count, cnp.NPY_INT32)
        starts = _empty(count, cnp.NPY_INT64)
        indptr = _empty(count + 1, cnp.NPY_INT32)
        cdef int32_t* length_data = _i32(lengths)
        cdef int64_t* start_data = _i64(starts)
        cdef int32_t* indptr_data = _i32(indptr)
        cdef int64_t b, total = 0, stamp, bad = -1
        cdef int32_t* target
        cdef int attempt
        cdef bint consistent
        indices = None
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                if bad < 0:
                    # Sizes and sources from one moment; the copy below uses only these.
                    self._capture(rows, start_data, length_data)
                    total = 0
                    for b in range(count):
                        total += length_data[b]
                    indices = None
                    if total <= C_INT32_MAX:
                        total = 0
                        for b in range(count):
                            indptr_data[b] = <int32_t>total
                            total += length_data[b]
                        indptr_data[count] = <int32_t>total
                        indices = _empty(total, cnp.NPY_INT32)
                        target = _i32(indices)
                        if attempt == 0:
                            with nogil:
                                _copy_packed(self._pool, start_data, length_data, count, target)
                        else:
                            _copy_packed(self._pool, start_data, length_data, count, target)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                if indices is None:
                    raise OverflowError(
                        f"the batch maps {total} blocks, more than int32 indices can address")
                return indptr, indices
        raise RuntimeError(_READ_KEPT_CHANGING)

    # ------------------------------------------------------------------ extras

    def fork_sequence(self, parent_id, child_id):
        """Give a new sequence ``child_id`` a copy of ``parent_id``'s block list.

        Parameters
        ----------
        parent_id : int
            An existing sequence.
        child_id : int
            A sequence id not yet in the table.

        Raises
        ------
        KeyError
            If ``parent_id`` is not in the table.
        ValueError
            If ``child_id`` is already in the table.
        """
        cdef seq_id_t parent = _seq_arg(parent_id)
        cdef seq_id_t child = _seq_arg(child_id)
        cdef row_t parent_row, child_row
        cdef const int32_t[::1] view
        self._begin_write()
        try:
            # Checked inside the change: no other thread's change can come between
            # these checks and the creation below.
            parent_row = self._row_or_raise(parent, "parent_id")
            if self._find_row(child) >= 0:
                raise ValueError(f"child_id {child} is already in the table")
            blocks = self._row_array(parent_row)
            view = blocks
            child_row = self._create_row(child)
            if blocks.shape[0]:
                try:
                    self._append_to_row(child_row, &view[0], blocks.shape[0])
                except BaseException:
                    self._drop_row(child_row)    # a failed call changes nothing
                    raise
        finally:
            self._writing = 0

    def set_block(self, sequence_id, block_index, block_id):
        """Replace one entry of a sequence's block list and return the old block id.

        Used for copy-on-write: the sequence's ``block_index``-th block becomes
        ``block_id``.

        Raises
        ------
        KeyError
            If the sequence is not in the table.
        IndexError
            If ``block_index`` is not in ``0 .. num_blocks - 1``.
        """
        cdef seq_id_t seq_id = _seq_arg(sequence_id)
        index = as_index(block_index, "block_index")
        cdef block_id_t block = _block_arg(block_id)
        cdef row_t row = self._row_or_raise(seq_id, "sequence_id")
        if self._writing or self._owned:    # nothing below lets another thread run
            self._refuse_write()
        if not 0 <= index < self._row_len[row]:
            raise IndexError(
                f"block_index {index} is out of range for sequence {seq_id} "
                f"with {self._row_len[row]} blocks")
        old = self._row_data(row)[<int64_t>index]
        self._set_block_at(row, index, block)
        return old

    cdef void _set_block_at(self, row_t row, int64_t index, block_id_t block) noexcept nogil:
        self._row_data(row)[index] = block
        self._next_version += 1
        self._row_version[row] = self._next_version
        if index < self._row_len[row] - 1:
            # Only appends and a new last block keep a mirror's copy of the row's
            # prefix valid; an edit further in asks mirrors to rewrite the row.
            self._row_rewrite[row] = self._next_version

    def versions(self, seq_ids):
        """Return change stamps of sequences, for mirrors that upload only what changed.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)

        Returns
        -------
        version : numpy.ndarray of int64, shape (B,)
            Changes whenever the sequence's block list changes in any way; -1 for a
            sequence not in the table.  Stamps come from one counter per table, so
            a removed and re-created sequence never repeats an earlier stamp.
        rewrite_version : numpy.ndarray of int64, shape (B,)
            Changes when the sequence is created and when a block other than its
            current last one is replaced; -1 for a sequence not in the table.  If it
            is unchanged, every change since was an append or a new last block, so
            a copy of the row's earlier blocks is still valid.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0), i, stamp
        cdef const int64_t* seqs = _i64(seq_array)
        version = _empty(count, cnp.NPY_INT64)
        rewrite = _empty(count, cnp.NPY_INT64)
        cdef int64_t* version_out = _i64(version)
        cdef int64_t* rewrite_out = _i64(rewrite)
        cdef row_t row
        cdef int attempt
        cdef bint consistent
        for i in range(count):
            if seqs[i] < 0:
                raise ValueError(f"seq_ids must be in 0..{INT64_MAX}, got {seqs[i]} at index {i}")
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                if attempt == 0:
                    with nogil:
                        self._versions_into(seqs, count, version_out, rewrite_out)
                else:
                    self._versions_into(seqs, count, version_out, rewrite_out)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                return version, rewrite
        raise RuntimeError(_READ_KEPT_CHANGING)

    cdef void _versions_into(self, const int64_t* seqs, int64_t count, int64_t* version_out,
                             int64_t* rewrite_out) noexcept nogil:
        cdef int64_t i
        cdef row_t row
        for i in range(count):
            row = self._find_row(seqs[i])
            version_out[i] = self._row_version[row] if row >= 0 else -1
            rewrite_out[i] = self._row_rewrite[row] if row >= 0 else -1

    def _set_owned(self, owned):
        """Private: mark the table owned by a manager, or not (tests corrupt it this way)."""
        self._owned = 1 if owned else 0

    def _memory_stats(self):
        """Return a dict describing the storage (for tests and memory reports)."""
        return {
            "pool_capacity": self._pool_capacity,
            "pool_tail": self._pool_tail,
            "pool_garbage": self._pool_garbage,
            "total_blocks": self._total_blocks,
            "index_capacity": self._index_mask + 1,
            "rows_capacity": self._rows_capacity,
            "nbytes": sum(array.nbytes for array in (
                self._pool_arr, self._index_keys_arr, self._index_rows_arr,
                self._row_start_arr, self._row_len_arr, self._row_cap_arr, self._row_seq_arr,
                self._row_order_arr, self._row_pending_arr, self._row_version_arr,
                self._row_rewrite_arr, self._free_stack_arr)),
        }

    def _check_invariants(self):
        """Verify the internal structure; raise ``AssertionError`` on any inconsistency."""
        cdef row_t row
        cdef int64_t live_rows = 0, blocks = 0, reserved = 0
        for row in range(self._rows_used):
            if self._row_seq[row] < 0:
                continue
            live_rows += 1
            blocks += self._row_len[row]
            reserved += self._row_cap[row]
            assert self._row_len[row] <= self._row_cap[row], "row longer than its room"
            assert 0 <= self._row_start[row] and self._row_start[row] + self._row_cap[row] <= self._pool_tail, \
                "row outside the pool"
            assert self._find_row(self._row_seq[row]) == row, "index does not find row"
        assert live_rows == self._num_sequences, "sequence count mismatch"
        assert blocks == self._total_blocks, "block count mismatch"
        assert self._pool_tail <= self._pool_capacity, "tail past capacity"
        assert reserved + self._pool_garbage == self._pool_tail, "pool accounting mismatch"
        keys = self._index_keys_arr
        assert int((keys != EMPTY_KEY).sum()) == self._num_sequences, "index count mismatch"
