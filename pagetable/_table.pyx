"""The PageTable: sequence id -> ordered physical block ids, in contiguous arrays.

Layout
------
* A block **pool**: one int32 array holding every sequence's block ids, each sequence
  in one contiguous **row** ``pool[start : start + length]`` with some reserved room
  after it (``capacity``).  A row that outgrows its room moves to the end of the pool;
  the room it leaves is garbage that a compaction reclaims once it is a sizeable part
  of the pool.  Memory therefore follows the blocks actually mapped.
* Per-row metadata (start, length, capacity, sequence id, insertion order, change
  stamps): one struct of arrays, see ``_rows.pxd``.
* An index from sequence id to row: the open-addressing map of ``_idmap.pxd``.

The kernels (``_table_kernels.pxd``) resolve a sequence id once per run of equal ids,
which makes the usual grouped batches (all tokens of a sequence together) cost one
hash probe per sequence; interleaved batches stay correct and pay one probe per token.
This module holds storage and its growth, the read and write protocol that makes the
table safe to read from other threads, and the Python API.
"""

cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memmove, memcmp
from libc.stdlib cimport qsort

import mmap as _mmap
import sys
from time import monotonic as _monotonic, perf_counter as _perf_counter, sleep as _sleep

import numpy as np
cimport numpy as cnp

from libc.stdint cimport INT32_MAX, INT64_MAX

from pagetable._types cimport block_id_t, seq_id_t, slot_t, row_t, PAD
from pagetable._accept cimport (
    block_arg, int_vector, is_kernel_vector, output_vector, seq_arg, shares_memory)
from pagetable._guard cimport Guarded
from pagetable._blocks cimport block_geometry, block_index, block_offset
from pagetable._buffers cimport empty, i32, i64, new_map, zeroed
from pagetable._idmap cimport (
    idmap_attach, idmap_count, idmap_find, idmap_insert, idmap_remove, idmap_storage)
from pagetable._rows cimport Rows, rows_layout
from pagetable._table_kernels cimport (
    TableView, compare_pairs, copy_packed, copy_packed_kernel_blocks, copy_padded,
    copy_padded_kernel_blocks, load_i32, load_i64,
    lookup_range, resolve_rows, end_of_run, slot_mapping_range, view_find)
from pagetable._convert import as_index, check_output, kernel_blocks_per_block
from pagetable import _state

cnp.import_array()

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define PAGETABLE_MAX_THREADS() omp_get_max_threads()
    #define PAGETABLE_THREAD_NUM() omp_get_thread_num()
    #define PAGETABLE_OPENMP 1
    #else
    #define PAGETABLE_OPENMP 0
    #define PAGETABLE_MAX_THREADS() 1
    #define PAGETABLE_THREAD_NUM() 0
    #endif
    """
    int PAGETABLE_MAX_THREADS() noexcept nogil
    int PAGETABLE_THREAD_NUM() noexcept nogil
    int PAGETABLE_OPENMP

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
    #ifndef PAGETABLE_DEBUG_BUILD
    #define PAGETABLE_DEBUG_BUILD 0
    #endif
    """
    int PAGETABLE_DEBUG_BUILD

#: Whether this build has bounds and initialisation checks on (``PAGETABLE_DEBUG=1``).
DEBUG_BUILD = bool(PAGETABLE_DEBUG_BUILD)

cdef bint _LINUX = sys.platform.startswith("linux")


cdef int wait_while_set(int32_t* flag, str message) except -1:
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


# ------------------------------------------------------------------------ threads
# Threads for batches of PARALLEL_THRESHOLD tokens or more: set_num_threads, or
# PAGETABLE_NUM_THREADS at import, else OpenMP's default (OMP_NUM_THREADS, or one per
# CPU), never more than the CPUs this process may run on.  One means no thread team.
cdef int _num_threads = 1


def _available_cpus():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _thread_count(n, str name):
    """``n`` as a thread count (a positive integer), capped at the CPUs available."""
    if isinstance(n, bool) or not hasattr(type(n), "__index__"):
        raise TypeError(f"{name} must be a positive integer, got {n!r}")
    value = as_index(n, name)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return min(value, _available_cpus(), PAGETABLE_MAX_THREADS() if OPENMP else 1)


def set_num_threads(n):
    """Set how many threads a batch of 131,072 tokens or more is split over.

    Parameters
    ----------
    n : int
        A positive integer.  ``1`` runs every call on the calling thread alone (no
        thread team is ever started).  A count above the CPUs this process may run
        on (``os.sched_getaffinity``) is capped at that number, and at 1 in a build
        without OpenMP.

    Raises
    ------
    TypeError
        If ``n`` is not an integer (a bool is refused too).
    ValueError
        If ``n`` is zero or negative.
    """
    global _num_threads
    _num_threads = _thread_count(n, "n")


def get_num_threads():
    """Return how many threads a batch of 131,072 tokens or more is split over.

    See :func:`set_num_threads`; the default is ``PAGETABLE_NUM_THREADS`` when set at
    import, else OpenMP's (``OMP_NUM_THREADS``, or one per CPU), capped at the CPUs
    this process may run on.
    """
    return _num_threads


def _threads_from_environment():
    import os
    import warnings
    text = os.environ.get("PAGETABLE_NUM_THREADS", "").strip()
    if text:
        try:
            return _thread_count(int(text), "PAGETABLE_NUM_THREADS")
        except (TypeError, ValueError) as error:
            warnings.warn(f"ignoring PAGETABLE_NUM_THREADS={text!r}: {error}", RuntimeWarning,
                          stacklevel=3)
    return min(PAGETABLE_MAX_THREADS(), _available_cpus())


# A thread team pays only while its helpers get CPU time: with another process
# keeping a core busy, a helper that the OS takes off its core mid-chunk holds the
# whole call up at the team's closing barrier.  So the time per token of both ways
# (a team, the calling thread alone) is kept over each way's last three large calls,
# and each call takes the way whose median is lower; every TEAM_PROBE_INTERVAL-th
# call (less often while probes keep losing) runs the other way, so that the choice
# follows the machine's load.  A median of three shrugs off one outlier, such as the
# first team's start (tens of ms here).
cdef double _seconds_per_token[2][3]    # [alone, team][last three]; 0 until measured
cdef int64_t _timed_calls[2]
cdef int64_t _large_calls = 0
cdef int64_t _next_probe = 0
cdef int64_t _probe_interval = 16
cdef bint _probing = False, _probe_lost = False

cdef enum:
    TEAM_PROBE_INTERVAL = 16
    TEAM_PROBE_MAX = 1024


cdef inline double median_of_three(const double* x) noexcept:
    return max(min(x[0], x[1]), min(max(x[0], x[1]), x[2]))


cdef int team_size(int64_t n) noexcept:
    """Threads for a batch of ``n`` tokens: 1, or ``_num_threads`` (see above)."""
    global _large_calls, _next_probe, _probe_interval, _probing
    if n < PARALLEL_THRESHOLD or _num_threads <= 1:
        return 1
    _large_calls += 1
    cdef bint team
    if _timed_calls[0] < 3 or _timed_calls[1] < 3:
        team = _timed_calls[1] <= _timed_calls[0]
    else:
        team = median_of_three(_seconds_per_token[1]) < median_of_three(_seconds_per_token[0])
        if _large_calls >= _next_probe:
            team = not team
            # A probe that loses again waits twice as long for the next one: on a
            # busy machine one team call can cost several ordinary ones.
            _probe_interval = min(2 * _probe_interval, TEAM_PROBE_MAX) if _probe_lost else TEAM_PROBE_INTERVAL
            _next_probe = _large_calls + _probe_interval
            _probing = True
    return _num_threads if team else 1


cdef void team_timed(bint team, double seconds_per_token) noexcept:
    """Keep one large call's time per token among its way's last three."""
    global _probing, _probe_lost
    if _num_threads <= 1:
        return
    _seconds_per_token[team][_timed_calls[team] % 3] = seconds_per_token
    _timed_calls[team] += 1
    if _probing:
        _probing = False
        _probe_lost = seconds_per_token >= median_of_three(_seconds_per_token[not team])


#: Whether this build splits large batches over OpenMP threads.
OPENMP = PAGETABLE_MAX_THREADS() > 0 and PAGETABLE_OPENMP
_num_threads = _threads_from_environment()


def _check_block_size(block_size):
    """Validate a block size: a positive integer no larger than ``MAX_BLOCK_SIZE``."""
    value = as_index(block_size, "block_size")
    if value <= 0:
        raise ValueError(f"block_size must be a positive integer, got {value}")
    if value > MAX_BLOCK_SIZE:
        raise OverflowError(f"block_size must be at most {MAX_BLOCK_SIZE}, got {value}")
    return value


cdef inline object _int64_ids(object values, str name):
    """``values`` as the int64 vector kernels read (see ``_accept.pxd``)."""
    return int_vector(values, name, cnp.NPY_INT64)


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


cdef int _raise_past_int32(object seq_array, int64_t bad, int64_t per_block) except -1:
    """Raise for the row a kernel-block copy reported (``bad >= 0``) as past int32."""
    if bad >= 0:
        raise OverflowError(
            f"sequence {i64(seq_array)[bad]} (seq_ids[{bad}]) holds a block whose kernel "
            f"block ids (block * {per_block} + 0 .. {per_block - 1}) do not fit in int32")
    return 0


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
        return empty(count, cnp.NPY_INT32)
    if _scratch is None or cnp.PyArray_DIM(<cnp.ndarray>_scratch, 0) < count:
        _scratch = None
        _scratch = empty(max(count, 4096), cnp.NPY_INT32)
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
    cdef const int64_t* ids = i64(seq_ids)
    cdef const int64_t* sizes = i64(lengths)
    cdef const int32_t* data = i32(blocks)
    cdef row_t row
    table.reserve_sequences(count)
    table._ensure_pool_space(total)
    for i in range(count):
        length = sizes[i]
        row = table.create_row(ids[i])
        if length:
            table.reserve_row(row, length)      # a fresh row at the tail: grows in place
            table.append_to_row(row, data + at, length)
            at += length
    return table


# --------------------------------------------------------------------------- the class

cdef class PageTable(Guarded):
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
        self._geometry = block_geometry(_check_block_size(block_size))
        self._block_size = <int32_t>self._geometry.size
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
        self._set_pool(new_map(MIN_POOL_CAPACITY * sizeof(int32_t)), MIN_POOL_CAPACITY)

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
            wait_while_set(&self._busy, _READS_IN_FLIGHT)
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
            wait_while_set(&self._writing, _READ_DURING_CHANGE)
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
            fresh = new_map(<Py_ssize_t>capacity * sizeof(int32_t))            # may let another thread run
            np.frombuffer(fresh, dtype=np.int32, count=self._pool_tail)[:] = \
                self._pool_arr[:self._pool_tail]
            self._wait_for_readers()
            pool_map = fresh
        except BaseException:
            self._set_pool(pool_map, old_capacity)
            raise
        self._set_pool(pool_map, capacity)
        return 0

    cdef int _rebuild_index(self, int64_t capacity) except -1:
        """Give the index ``capacity`` slots (a power of two) and reinsert every row."""
        cdef row_t row
        storage = idmap_storage(capacity)
        # Allocation above may let another thread run; the switch below may not.  The
        # old arrays stay referenced until every pointer is switched: freeing a mapped
        # array releases the GIL (munmap), and no thread may see a stale pointer then.
        self._wait_for_readers()
        retired = self._index_storage
        self._index_storage = storage
        idmap_attach(&self._index, storage)
        for row in range(self._rows_used):
            if self._rows.seq[row] >= 0:
                idmap_insert(&self._index, self._rows.seq[row], row)
        del retired     # only now may freeing the old index let another thread run
        return 0

    cdef int _grow_index(self) except -1:
        # Small indexes grow fourfold: a batch creating a thousand sequences would
        # otherwise rebuild one eight times.  From SMALL_INDEX slots on, every slot
        # is resident memory (keys are filled with EMPTY_KEY), so growth halves.
        cdef int64_t capacity = self._index.mask + 1
        return self._rebuild_index(capacity * (4 if capacity < SMALL_INDEX else 2))

    cdef int reserve_sequences(self, int64_t extra) except -1:
        """Grow the index and the row arrays once for up to ``extra`` more sequences."""
        cdef int64_t capacity = self._index.mask + 1
        cdef int64_t needed = self._num_sequences + extra
        cdef int64_t new_rows = extra - self._num_free_rows
        while needed * INDEX_LOAD_DEN > capacity * INDEX_LOAD_NUM:
            capacity *= 2
        if capacity != self._index.mask + 1:
            self._rebuild_index(capacity)
        if new_rows > 0 and self._rows_used + new_rows > self._rows_capacity:
            if self._rows_used + new_rows >= INT32_MAX // 2:
                raise OverflowError("a PageTable holds at most 2**30 sequences")
            self._grow_rows(<int32_t>max(ROWS_GROWTH * <int64_t>self._rows_capacity,
                                         self._rows_used + new_rows))
        return 0

    cdef int _grow_rows(self, int32_t capacity) except -1:
        """Give the row metadata room for ``capacity`` rows (see ``_rows.pxd``)."""
        cdef Rows grown
        # Rows past _rows_used are never read, so zeros (untouched pages) will do.
        storage = zeroed((rows_layout(&grown, NULL, capacity, NULL, 0, 0) + 7) // 8,
                         cnp.NPY_INT64)
        # Allocation above may let another thread run; the switch below may not.  The
        # old storage stays referenced until every pointer is switched: freeing a
        # mapping releases the GIL (munmap), and no thread may see a stale pointer then.
        self._wait_for_readers()
        rows_layout(&grown, <char*>cnp.PyArray_DATA(<cnp.ndarray>storage), capacity,
                    &self._rows if self._rows_storage is not None else NULL,
                    self._rows_used, self._num_free_rows)
        retired = self._rows_storage
        self._rows_storage = storage
        self._rows = grown
        self._rows_capacity = capacity
        del retired
        return 0

    cdef row_t create_row(self, seq_id_t seq_id) except -1:
        """Add a sequence known to be absent; return its (empty) row."""
        cdef row_t row
        if seq_id < 0:
            # A negative key would read as an empty index slot (-1) or corrupt a probe
            # chain; every entry point checks ids, and this is the last line.
            raise ValueError(f"sequence ids must be in 0..{INT64_MAX}, got {seq_id}")
        # Reserve everything first, so a MemoryError leaves no half-made row.
        if (self._num_sequences + 1) * INDEX_LOAD_DEN > (self._index.mask + 1) * INDEX_LOAD_NUM:
            self._grow_index()
        if self._num_free_rows:
            self._num_free_rows -= 1
            row = self._rows.free_stack[self._num_free_rows]
        else:
            if self._rows_used == self._rows_capacity:
                if self._rows_capacity >= INT32_MAX // 2:
                    raise OverflowError("a PageTable holds at most 2**30 sequences")
                self._grow_rows(<int32_t>min(ROWS_GROWTH * <int64_t>self._rows_capacity,
                                             INT32_MAX // 2))
            row = self._rows_used
            self._rows_used += 1
        self._rows.start[row] = self._pool_tail
        self._rows.length[row] = 0
        self._rows.capacity[row] = 0
        self._rows.seq[row] = seq_id
        self._rows.order[row] = self._next_order
        self._touch(row, True)
        self._next_order += 1
        idmap_insert(&self._index, seq_id, row)
        self._num_sequences += 1
        return row

    cdef TableView _view(self) noexcept nogil:
        cdef TableView view
        view.index = self._index
        view.row_start = self._rows.start
        view.row_len = self._rows.length
        view.row_seq = self._rows.seq
        view.rows_used = self._rows_used
        view.pool = self._pool
        view.pool_capacity = self._pool_capacity
        view.block_size = self._block_size
        view.block_shift = self._geometry.shift
        view.block_mask = self._geometry.mask
        return view

    cdef int _compact(self) except -1:
        """Move every live row, in pool order, to the front of the pool.

        Rows only move towards the front, in start order, so ``memmove`` never
        overwrites data that is still to be read.  The order comes from numpy's
        stable sort of the live rows' starts.
        """
        cdef int64_t write = 0, i, n
        cdef row_t row
        cdef cnp.npy_intp used = self._rows_used
        # Views of the row metadata for numpy; dropped before anything changes.
        starts = cnp.PyArray_SimpleNewFromData(1, &used, cnp.NPY_INT64, self._rows.start)
        seqs = cnp.PyArray_SimpleNewFromData(1, &used, cnp.NPY_INT64, self._rows.seq)
        live = np.flatnonzero(seqs >= 0).astype(np.int32)
        cdef int32_t[::1] order = live[np.argsort(starts[live], kind="stable")]
        del starts, seqs
        n = order.shape[0]
        # numpy above may have let another thread start a read; check just before
        # moving.  Rows move with the GIL held: no other thread reads or writes meanwhile.
        self._wait_for_readers()
        for i in range(n):
            row = order[i]
            if self._rows.length[row]:
                memmove(self._pool + write, self._pool + self._rows.start[row],
                        <size_t>self._rows.length[row] * sizeof(int32_t))
            self._rows.start[row] = write
            write += self._rows.capacity[row]
        # Free rows point at the tail so that they look empty and harmless.
        for i in range(self._rows_used):
            if self._rows.seq[i] < 0:
                self._rows.start[i] = write
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
            self._compact()
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
            self._compact()
            if self._pool_capacity > 2 * (self._pool_tail + MIN_POOL_CAPACITY):
                self._resize_pool(self._pool_tail + (self._pool_tail >> 1) + MIN_POOL_CAPACITY)
            self._release_tail_pages()
        except Exception:
            pass
        return 0

    cdef int reserve_row(self, row_t row, int64_t min_capacity) except -1:
        cdef int64_t capacity = self._rows.capacity[row]
        cdef int64_t new_capacity, old_start
        if min_capacity <= capacity:
            return 0
        if min_capacity > INT32_MAX:
            raise OverflowError("a sequence holds at most 2**31 - 1 blocks")
        # A row that ends at the pool's tail grows in place.
        if self._rows.start[row] + capacity == self._pool_tail:
            if self._pool_tail + (min_capacity - capacity) <= self._pool_capacity:
                self._pool_tail += min_capacity - capacity
                self._rows.capacity[row] = <int32_t>min_capacity
                return 0
        if capacity == 0:
            new_capacity = min_capacity
        else:
            new_capacity = max(min_capacity, capacity + (capacity >> 2) + 4)
            new_capacity = min(new_capacity, <int64_t>INT32_MAX)
        self._ensure_pool_space(new_capacity)   # may move every row
        old_start = self._rows.start[row]
        if self._rows.length[row]:
            memcpy(self._pool + self._pool_tail, self._pool + old_start,
                   <size_t>self._rows.length[row] * sizeof(int32_t))
        if old_start + self._rows.capacity[row] == self._pool_tail:
            self._pool_tail = old_start    # never happens after a move, kept for safety
        else:
            self._pool_garbage += self._rows.capacity[row]
        self._rows.start[row] = self._pool_tail
        self._rows.capacity[row] = <int32_t>new_capacity
        self._pool_tail += new_capacity
        # Abandoned room stays resident until reclaimed: compact once it is a quarter
        # of the live data, so resident memory tracks the mapped blocks.
        if (self._pool_garbage > 4096 and self._busy == 0
                and self._pool_garbage * 4 > self._pool_tail - self._pool_garbage):
            # Optional maintenance: the row has moved, so this call may not fail now.
            try:
                self._compact()
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

    cdef int append_to_row(self, row_t row, const block_id_t* blocks, int64_t count) except -1:
        cdef int64_t length = self._rows.length[row]
        if count <= 0:
            return 0
        self.reserve_row(row, length + count)
        memcpy(self._pool + self._rows.start[row] + length, blocks, <size_t>count * sizeof(int32_t))
        self._rows.length[row] = <int32_t>(length + count)
        self._touch(row, False)
        self._total_blocks += count
        return 0

    cdef int drop_row(self, row_t row) except -1:
        cdef int64_t start = self._rows.start[row]
        cdef int64_t capacity = self._rows.capacity[row]
        idmap_remove(&self._index, self._rows.seq[row])
        if start + capacity == self._pool_tail:
            self._pool_tail = start
        else:
            self._pool_garbage += capacity
        self._total_blocks -= self._rows.length[row]
        self._rows.length[row] = 0
        self._rows.capacity[row] = 0
        self._rows.seq[row] = -1
        self._rows.start[row] = self._pool_tail
        self._num_sequences -= 1
        self._next_version += 1     # readers in flight see that something changed (the row is gone)
        self._rows.free_stack[self._num_free_rows] = row
        self._num_free_rows += 1
        if self._num_sequences == 0:
            # An empty table gives its whole pool back to reuse from the front.
            self._pool_tail = 0
            self._pool_garbage = 0
        self._maybe_shrink()
        return 0

    cdef row_t _row_or_raise(self, seq_id_t seq_id, str name) except -1:
        cdef row_t row = self.find_row(seq_id)
        if row < 0:
            raise KeyError(f"{name} {seq_id} is not in the table")
        return row

    cdef object _row_array(self, row_t row):
        """A copy of a row's blocks, or None if the row's sequence went meanwhile.

        Allocating may run another thread, which may change the row: the copy is
        taken only once the row's length is the one the array was sized for, with
        nothing in between that could let another thread run.
        """
        cdef seq_id_t seq_id = self._rows.seq[row]
        cdef int32_t length = -1
        result = None
        while seq_id >= 0 and self._rows.seq[row] == seq_id:
            if self._rows.length[row] == length:
                if length:
                    memcpy(cnp.PyArray_DATA(result), self.row_blocks(row),
                           <size_t>length * sizeof(int32_t))
                return result
            length = self._rows.length[row]
            result = empty(length, cnp.NPY_INT32)
        return None

    cdef int _capture(self, object rows_array, int64_t* starts, int32_t* lengths) except -1:
        """Each row's start and length, all from one moment.

        A plain C loop holding the GIL: no other thread runs in it.  ``starts`` may
        be NULL.  What it captured stays inside the pool until ``_read_end``, since
        the pool does not shrink or move while a read is in flight.
        """
        cdef int64_t b, count = cnp.PyArray_DIM(<cnp.ndarray>rows_array, 0)
        cdef const int32_t* rows = i32(rows_array)
        cdef row_t row
        for b in range(count):
            row = rows[b]
            if starts != NULL:
                starts[b] = self._rows.start[row]
            lengths[b] = self._rows.length[row]
        return 0

    cdef object snapshot(self, bint with_blocks, bint hold_gil=False):
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
                order = empty(2 * count, cnp.NPY_INT64)     # (insertion stamp, row) pairs
                seq_ids = empty(count, cnp.NPY_INT64)
                lengths = empty(count, cnp.NPY_INT32)
                starts = empty(count, cnp.NPY_INT64)
                pairs = i64(order)
                id_data = i64(seq_ids)
                start_data = i64(starts)
                length_data = i32(lengths)
                blocks = None
                # One C section: which rows are live, in what order, where and how long.
                k = 0
                for row in range(self._rows_used):
                    if self._rows.seq[row] >= 0 and k < count:
                        pairs[2 * k] = self._rows.order[row]
                        pairs[2 * k + 1] = row
                        k += 1
                complete = k == count and count == self._num_sequences
                if complete:
                    if count > 1:
                        qsort(pairs, <size_t>count, 2 * sizeof(int64_t), compare_pairs)
                    total = 0
                    for b in range(count):
                        row = <row_t>pairs[2 * b + 1]
                        id_data[b] = self._rows.seq[row]
                        start_data[b] = self._rows.start[row]
                        length_data[b] = self._rows.length[row]
                        total += length_data[b]
                    if with_blocks:
                        blocks = empty(total, cnp.NPY_INT32)
                        target = i32(blocks)
                        if attempt == 0 and not hold_gil:
                            with nogil:
                                copy_packed(self._pool, start_data, length_data, count, target)
                        else:
                            # Read again with the GIL held: no change can run meanwhile.
                            copy_packed(self._pool, start_data, length_data, count, target)
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
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        cdef block_id_t block = block_arg(block_id, "block_id")
        if self._writing or self._owned:
            self._refuse_write()
        cdef row_t row = self.find_row(seq_id)
        cdef int32_t length = self._rows.length[row] if row >= 0 else 0
        cdef bint created = False
        if row < 0 or length >= self._rows.capacity[row]:
            # The slow path may allocate, and so let other threads run.
            self._writing = 1
            try:
                if row < 0:
                    row = self.create_row(seq_id)
                    created = True
                # A sequence grown one block at a time starts with room for four.
                self.reserve_row(row, <int64_t>length + 1 if length else 4)
            except BaseException:
                if created:
                    self.drop_row(row)     # a failed call leaves no empty sequence
                raise
            finally:
                self._writing = 0
        self._pool[self._rows.start[row] + length] = block
        self._rows.length[row] = length + 1
        self._touch(row, False)
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
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        cdef int overflow = 0
        cdef long long pos
        cdef int64_t index
        cdef row_t row
        if type(token_pos) is not int:
            token_pos = as_index(token_pos, "token_pos")
        pos = PyLong_AsLongLongAndOverflow(token_pos, &overflow)
        if overflow > 0:
            return None
        if overflow < 0 or pos < 0:
            raise ValueError(f"token_pos must be non-negative, got {token_pos}")
        row = self.find_row(seq_id)
        if row < 0:
            return None
        index = block_index(&self._geometry, pos)
        if index >= self._rows.length[row]:
            return None
        return (self._pool[self._rows.start[row] + index], block_offset(&self._geometry, pos))

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
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        cdef row_t row
        if self._writing:
            wait_while_set(&self._writing, _READ_DURING_CHANGE)
        row = self.find_row(seq_id)
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
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        cdef row_t row
        self._begin_write()
        try:
            row = self.find_row(seq_id)
            if row < 0:
                return None
            blocks = self._row_array(row)
            self.drop_row(row)
            return blocks
        finally:
            self._writing = 0

    def truncate_sequence(self, sequence_id, num_blocks):
        """Keep a sequence's first ``num_blocks`` blocks; return the dropped ones.

        The change stamps of the row are bumped as for any rewrite, so device
        mirrors see it.

        Parameters
        ----------
        sequence_id : int
        num_blocks : int
            Blocks to keep, ``0 .. num_blocks(sequence)``.

        Returns
        -------
        numpy.ndarray of int32
            The dropped blocks in logical order (empty if none), for the caller to free.

        Raises
        ------
        KeyError
            If the sequence is not in the table.
        ValueError
            If ``num_blocks`` is negative or more than the sequence holds.
        """
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        keep = as_index(num_blocks, "num_blocks")
        cdef row_t row
        self._begin_write()
        try:
            row = self._row_or_raise(seq_id, "sequence_id")
            if not 0 <= keep <= self._rows.length[row]:
                raise ValueError(
                    f"num_blocks must be 0 .. {self._rows.length[row]} (the blocks sequence "
                    f"{seq_id} holds), got {keep}")
            dropped = self._row_array(row)[keep:].copy()
            self.truncate_row(row, <int32_t>keep)
            return dropped
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
        return self.find_row(value) >= 0

    def __iter__(self):
        """Iterate over sequence ids in insertion order."""
        return iter(self.sequence_ids().tolist())

    def sequence_ids(self):
        """Return every sequence id, in insertion order, as an int64 array."""
        return self.snapshot(False)[0]

    def __repr__(self):
        shown = []
        limit = 8
        seq_ids, lengths, blocks = self.snapshot(True)
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
            if self._rows.seq[row] < 0:
                continue
            other_row = that.find_row(self._rows.seq[row])
            if other_row < 0 or that._rows.length[other_row] != self._rows.length[row]:
                return False
            if self._rows.length[row] and memcmp(self.row_blocks(row), that.row_blocks(other_row),
                                             <size_t>self._rows.length[row] * sizeof(int32_t)) != 0:
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
        seq_ids, lengths, blocks = self.snapshot(True)
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
        cdef const int64_t* seqs = i64(seq_array)
        cdef const int64_t* blocks64 = i64(block_array)
        cdef const int32_t* blocks32 = i32(block_array)
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
        cdef const int64_t* seqs = i64(seq_array)
        cdef bint narrow = cnp.PyArray_TYPE(<cnp.ndarray>block_array) == cnp.NPY_INT32
        cdef const int32_t* blocks32 = i32(block_array)
        cdef const int64_t* blocks64 = i64(block_array)
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
        cdef int32_t* run_rows = i32(scratch)
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
                    if self.find_row(seqs[i]) < 0:
                        missing += 1
                    i = end_of_run(seqs, i, n)
                if missing:
                    self.reserve_sequences(missing)
            i = 0
            r = 0
            # Local copies of the table's pointers: the compiler would reload them
            # after every store otherwise.  Creating a row may move the arrays, so
            # they are refreshed after each creation.
            view = self._view()
            pending = self._rows.pending
            while i < n:
                # When every run is one block (interleaved input), skip the run scan.
                end = i + 1 if interleaved else end_of_run(seqs, i, n)
                seq_id = seqs[i]
                if r >= num_runs or seq_id < 0:
                    self._undo_pending(touched, num_touched, first_new_order)
                    raise ValueError(
                        "seq_ids changed while append_blocks read it (another thread "
                        "wrote to the array); nothing was appended")
                row = view_find(&view, seq_id)
                if row < 0:
                    try:
                        row = self.create_row(seq_id)
                    except BaseException:
                        self._undo_pending(touched, num_touched, first_new_order)
                        raise
                    view = self._view()
                    pending = self._rows.pending
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
                    count = <int64_t>self._rows.length[row] + self._rows.pending[row]
                    if (self._rows.capacity[row] == 0 and self._pool_tail + count <= self._pool_capacity
                            and count <= INT32_MAX):
                        # A new row (no room yet, nothing to move): its exact room at
                        # the tail, which the reservation above has made.
                        self._rows.start[row] = self._pool_tail
                        self._rows.capacity[row] = <int32_t>count
                        self._pool_tail += count
                    else:
                        self.reserve_row(row, count)
            except BaseException:
                self._undo_pending(touched, num_touched, first_new_order)
                raise
            self._populate(old_tail)
            # Writing the table: nothing below lets another thread run, and nothing
            # below reads the ids again.
            pool = self._pool
            row_start = self._rows.start
            row_len = self._rows.length
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
                self._rows.pending[touched[k]] = 0
                self._touch(touched[k], False)
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
            self._rows.pending[row] = 0
            if self._rows.order[row] >= first_new_order and self._rows.seq[row] >= 0:
                self.drop_row(row)
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
        cdef const int64_t* seqs = i64(seq_array)
        cdef int32_t* rows = i32(rows_array)
        cdef TableView view = self._view()
        if count == 0:
            return -1
        if release:
            with nogil:
                bad = resolve_rows(&view, seqs, rows, count)
        else:
            bad = resolve_rows(&view, seqs, rows, count)
        return bad

    cdef int _raise_unresolved(self, object seq_array, int64_t bad) except -1:
        cdef int64_t value
        if bad >= 0:
            value = i64(seq_array)[bad]
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
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        lengths = empty(count, cnp.NPY_INT32)
        self._rows_of(seq_array, empty(count, cnp.NPY_INT32), i32(lengths))
        return lengths

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
        rows = empty(cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0), cnp.NPY_INT32)
        self._rows_of(seq_array, rows, NULL)
        return rows

    cdef int _rows_of(self, object seq_array, object rows, int32_t* lengths) except -1:
        """Fill ``rows`` with each id's row (and ``lengths``, unless NULL), all of one state.

        Raises for a negative or unknown id; see the read protocol above.
        """
        cdef int64_t stamp, bad = -1
        cdef int attempt
        cdef bint consistent
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                if bad < 0 and lengths != NULL:
                    self._capture(rows, NULL, lengths)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                return 0
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
        blocks = empty(n, cnp.NPY_INT32)
        offsets = empty(n, cnp.NPY_INT32)
        if n == 0:
            return blocks, offsets
        cdef const int64_t* seqs = i64(seq_array)
        cdef const int32_t* hints = i32(hint_array) if hint_array is not None else NULL
        cdef const int64_t* pos = i64(pos_array)
        cdef int32_t* block_out = i32(blocks)
        cdef int32_t* offset_out = i32(offsets)
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
                        bad = lookup_range(&view, seqs, hints, pos, block_out, offset_out, 0, n)
                else:
                    # Read again with the GIL held: no change can run meanwhile.
                    bad = lookup_range(&view, seqs, hints, pos, block_out, offset_out, 0, n)
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
        build has OpenMP (see :func:`set_num_threads`), or run on the calling thread
        alone when recent calls found that faster (a busy machine).
        """
        seq_array, pos_array = _pair(seq_ids, positions)
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        hint_array = _row_hints(rows, n)
        out_array = None
        if out is None:
            result = empty(n, cnp.NPY_INT64)
        else:
            out_array = output_vector(out, n, cnp.NPY_INT64)
            if (strict or shares_memory(out_array, seq_array) or shares_memory(out_array, pos_array)
                    or (hint_array is not None and shares_memory(out_array, hint_array))):
                result = empty(n, cnp.NPY_INT64)
            else:
                result = out_array
        if n == 0:
            return result if out is None else out
        self._slot_mapping_into(seq_array, pos_array, result, hint_array)
        if strict:
            self._raise_unmapped(seq_array, pos_array, result)
        if out is None:
            return result
        if result is not out_array:
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>out_array), cnp.PyArray_DATA(<cnp.ndarray>result),
                   <size_t>n * sizeof(int64_t))
        return out

    cdef int _slot_mapping_into(self, seq_array, pos_array, result, hint_array=None) except -1:
        cdef const int64_t* seqs = i64(seq_array)
        cdef const int32_t* hints = i32(hint_array) if hint_array is not None else NULL
        cdef const int64_t* pos = i64(pos_array)
        cdef int64_t* out = i64(result)
        cdef int64_t n = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        cdef TableView view
        cdef int64_t bad = -1, chunk, num_chunks = 0, begin, end, stamp
        cdef int64_t* chunk_bad = NULL
        cdef int threads = team_size(n)
        cdef int attempt
        cdef bint consistent = False
        cdef bint parallel = threads > 1
        if parallel:
            num_chunks = (n + PARALLEL_CHUNK - 1) // PARALLEL_CHUNK
            chunk_results = empty(num_chunks, cnp.NPY_INT64)
            chunk_bad = i64(chunk_results)
        started = _perf_counter() if n >= PARALLEL_THRESHOLD else 0.0
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                view = self._view()
                if attempt > 0:
                    # Read again with the GIL held: no change can run meanwhile.
                    bad = slot_mapping_range(&view, seqs, hints, pos, out, 0, n)
                elif not parallel:
                    with nogil:
                        bad = slot_mapping_range(&view, seqs, hints, pos, out, 0, n)
                else:
                    for chunk in prange(num_chunks, nogil=True, schedule="dynamic",
                                        num_threads=threads):
                        begin = chunk * PARALLEL_CHUNK
                        end = min(begin + PARALLEL_CHUNK, n)
                        chunk_bad[chunk] = slot_mapping_range(&view, seqs, hints, pos, out,
                                                               begin, end)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                break
        if not consistent:
            raise RuntimeError(_READ_KEPT_CHANGING)
        if n >= PARALLEL_THRESHOLD and attempt == 0:
            team_timed(parallel, (_perf_counter() - started) / n)
        if parallel and attempt == 0:
            bad = -1
            for chunk in range(num_chunks):
                if chunk_bad[chunk] >= 0:
                    bad = chunk_bad[chunk]
                    break
        self._raise_bad_seq(seq_array, bad)
        return 0

    def block_table(self, seq_ids, out=None, kernel_block_size=None):
        """Return the dense, padded block table of a batch of sequences.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)
        out : numpy.ndarray of int32, shape (B, W), optional
            Preallocated buffer; its width ``W`` must hold the longest row.
        kernel_block_size : int, optional
            List kernel blocks of this many tokens instead of the table's blocks: a
            positive divisor ``b`` of :attr:`block_size`, ``k = block_size // b``.
            Block ``m`` becomes kernel blocks ``m*k .. m*k + k - 1`` and a padded
            entry ``k`` padded ones.  A row has no token count, so a row of ``L``
            blocks lists ``L*k`` kernel blocks (the manager's exports drop those past
            a sequence's length).  Slot mappings need no conversion:
            ``m*B + o == (m*k + o//b)*b + o%b``.

        Returns
        -------
        table : numpy.ndarray of int32, shape (B, W)
            Row ``b`` holds sequence ``seq_ids[b]``'s blocks (or kernel blocks),
            padded with ``PAD_SLOT_ID``; ``W`` is the longest row (or ``out``'s width).
        num_blocks : numpy.ndarray of int32, shape (B,)
            Entries of each row (kernel blocks with ``kernel_block_size``).

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        TypeError, ValueError
            If ``kernel_block_size`` is not a positive integer dividing the block size.
        OverflowError
            If a kernel block id would not fit in int32.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        cdef int64_t per_block = 1
        if kernel_block_size is not None:
            per_block = kernel_blocks_per_block(kernel_block_size, self._block_size)
        out_array = None
        if out is not None:
            out_array = check_output(out, (count, -1), _INT32)
        rows = empty(count, cnp.NPY_INT32)
        num_blocks = empty(count, cnp.NPY_INT32)
        starts = empty(count, cnp.NPY_INT64)
        cdef int32_t* lengths = i32(num_blocks)
        cdef int64_t* start_data = i64(starts)
        cdef int64_t b, j, length, width = 0, stamp, bad = -1, too_big = -1
        cdef int32_t* target
        cdef int32_t* dest
        cdef int attempt
        cdef bint consistent
        cdef TableView view
        table = None
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                too_big = -1
                if bad < 0:
                    # Sizes and sources from one moment; the copy below uses only these.
                    self._capture(rows, start_data, lengths)
                    width = 0
                    for b in range(count):
                        width = max(width, <int64_t>lengths[b])
                    width *= per_block
                    if width > INT32_MAX:
                        table = None     # raised below; no int32 count can say it
                    elif out is None:
                        table = np.empty((count, width), dtype=np.int32)
                    elif out_array.shape[1] >= width:
                        table = out_array
                        width = out_array.shape[1]
                    else:
                        table = None
                    if table is not None and count and width:
                        target = i32(table)
                        view = self._view()
                        if per_block > 1:
                            if attempt == 0:
                                with nogil:
                                    too_big = copy_padded_kernel_blocks(
                                        &view, start_data, lengths, count, per_block, target, width)
                            else:
                                too_big = copy_padded_kernel_blocks(
                                    &view, start_data, lengths, count, per_block, target, width)
                        elif attempt == 0:
                            with nogil:
                                copy_padded(self._pool, start_data, lengths, count, target, width)
                        else:
                            copy_padded(self._pool, start_data, lengths, count, target, width)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                _raise_past_int32(seq_array, too_big, per_block)
                if width > INT32_MAX:
                    raise OverflowError(
                        f"the longest sequence in the batch has {width} kernel blocks, "
                        f"more than int32 can count")
                if table is None:
                    raise ValueError(
                        f"out is {out_array.shape[1]} {'kernel ' if per_block > 1 else ''}blocks "
                        f"wide but the longest sequence in the batch has {width} "
                        f"{'kernel ' if per_block > 1 else ''}blocks")
                if per_block > 1:
                    for b in range(count):
                        lengths[b] *= <int32_t>per_block
                return (table if out is None else out), num_blocks
        raise RuntimeError(_READ_KEPT_CHANGING)

    def to_csr(self, seq_ids, kernel_block_size=None):
        """Return the CSR page list of a batch: FlashInfer's ``kv_indptr`` / ``kv_indices``.

        Parameters
        ----------
        seq_ids : array_like of int, shape (B,)
        kernel_block_size : int, optional
            List kernel blocks of this many tokens instead of the table's blocks; see
            :meth:`block_table`.

        Returns
        -------
        indptr : numpy.ndarray of int32, shape (B + 1,)
            ``indices[indptr[b]:indptr[b + 1]]`` are sequence ``seq_ids[b]``'s blocks
            (or kernel blocks).
        indices : numpy.ndarray of int32, shape (nnz,)

        Raises
        ------
        KeyError
            If a sequence id is not in the table.
        TypeError, ValueError
            If ``kernel_block_size`` is not a positive integer dividing the block size.
        OverflowError
            If the batch maps more than ``2**31 - 1`` blocks (or kernel blocks), or a
            kernel block id would not fit in int32.
        """
        seq_array = _int64_ids(seq_ids, "seq_ids")
        cdef int64_t count = cnp.PyArray_DIM(<cnp.ndarray>seq_array, 0)
        cdef int64_t per_block = 1
        if kernel_block_size is not None:
            per_block = kernel_blocks_per_block(kernel_block_size, self._block_size)
        rows = empty(count, cnp.NPY_INT32)
        lengths = empty(count, cnp.NPY_INT32)
        starts = empty(count, cnp.NPY_INT64)
        indptr = empty(count + 1, cnp.NPY_INT32)
        cdef int32_t* length_data = i32(lengths)
        cdef int64_t* start_data = i64(starts)
        cdef int32_t* indptr_data = i32(indptr)
        cdef int64_t b, total = 0, stamp, bad = -1, too_big = -1
        cdef int32_t* target
        cdef int attempt
        cdef bint consistent
        cdef TableView view
        indices = None
        for attempt in range(READ_ATTEMPTS):
            stamp = self._read_begin()
            try:
                bad = self._resolve(seq_array, rows, attempt == 0)
                too_big = -1
                if bad < 0:
                    # Sizes and sources from one moment; the copy below uses only these.
                    self._capture(rows, start_data, length_data)
                    total = 0
                    for b in range(count):
                        total += length_data[b]
                    total *= per_block
                    indices = None
                    if total <= INT32_MAX:
                        total = 0
                        for b in range(count):
                            indptr_data[b] = <int32_t>total
                            total += length_data[b] * per_block
                        indptr_data[count] = <int32_t>total
                        indices = empty(total, cnp.NPY_INT32)
                        target = i32(indices)
                        view = self._view()
                        if per_block > 1:
                            if attempt == 0:
                                with nogil:
                                    too_big = copy_packed_kernel_blocks(
                                        &view, start_data, length_data, count, per_block, target)
                            else:
                                too_big = copy_packed_kernel_blocks(
                                    &view, start_data, length_data, count, per_block, target)
                        elif attempt == 0:
                            with nogil:
                                copy_packed(self._pool, start_data, length_data, count, target)
                        else:
                            copy_packed(self._pool, start_data, length_data, count, target)
            finally:
                consistent = self._read_end(stamp)
            if consistent:
                self._raise_unresolved(seq_array, bad)
                _raise_past_int32(seq_array, too_big, per_block)
                if indices is None:
                    raise OverflowError(
                        f"the batch maps {total} {'kernel ' if per_block > 1 else ''}blocks, "
                        f"more than int32 indices can address")
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
        cdef seq_id_t parent = seq_arg(parent_id, "parent_id")
        cdef seq_id_t child = seq_arg(child_id, "child_id")
        cdef row_t parent_row, child_row
        cdef const int32_t[::1] view
        self._begin_write()
        try:
            # Checked inside the change: no other thread's change can come between
            # these checks and the creation below.
            parent_row = self._row_or_raise(parent, "parent_id")
            if self.find_row(child) >= 0:
                raise ValueError(f"child_id {child} is already in the table")
            blocks = self._row_array(parent_row)
            view = blocks
            child_row = self.create_row(child)
            if blocks.shape[0]:
                try:
                    self.append_to_row(child_row, &view[0], blocks.shape[0])
                except BaseException:
                    self.drop_row(child_row)    # a failed call changes nothing
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
        cdef seq_id_t seq_id = seq_arg(sequence_id, "sequence_id")
        index = as_index(block_index, "block_index")
        cdef block_id_t block = block_arg(block_id, "block_id")
        cdef row_t row = self._row_or_raise(seq_id, "sequence_id")
        if self._writing or self._owned:    # nothing below lets another thread run
            self._refuse_write()
        if not 0 <= index < self._rows.length[row]:
            raise IndexError(
                f"block_index {index} is out of range for sequence {seq_id} "
                f"with {self._rows.length[row]} blocks")
        old = self.row_blocks(row)[<int64_t>index]
        self.set_block_at(row, index, block)
        return old

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
        cdef const int64_t* seqs = i64(seq_array)
        version = empty(count, cnp.NPY_INT64)
        rewrite = empty(count, cnp.NPY_INT64)
        cdef int64_t* version_out = i64(version)
        cdef int64_t* rewrite_out = i64(rewrite)
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
            row = self.find_row(seqs[i])
            version_out[i] = self._rows.version[row] if row >= 0 else -1
            rewrite_out[i] = self._rows.rewrite[row] if row >= 0 else -1

    def _memory_stats(self):
        """Return a dict describing the storage (for tests and memory reports)."""
        return {
            "pool_capacity": self._pool_capacity,
            "pool_tail": self._pool_tail,
            "pool_garbage": self._pool_garbage,
            "total_blocks": self._total_blocks,
            "index_capacity": self._index.mask + 1,
            "rows_capacity": self._rows_capacity,
            "nbytes": sum(array.nbytes for array in (
                self._pool_arr, self._rows_storage) + self._index_storage),
        }

    def _check_invariants(self):
        """Verify the internal structure; raise ``AssertionError`` on any inconsistency."""
        cdef row_t row
        cdef int64_t live_rows = 0, blocks = 0, reserved = 0
        for row in range(self._rows_used):
            if self._rows.seq[row] < 0:
                continue
            live_rows += 1
            blocks += self._rows.length[row]
            reserved += self._rows.capacity[row]
            assert self._rows.length[row] <= self._rows.capacity[row], "row longer than its room"
            assert 0 <= self._rows.start[row] and self._rows.start[row] + self._rows.capacity[row] <= self._pool_tail, \
                "row outside the pool"
            assert self.find_row(self._rows.seq[row]) == row, "index does not find row"
        assert live_rows == self._num_sequences, "sequence count mismatch"
        assert blocks == self._total_blocks, "block count mismatch"
        assert self._pool_tail <= self._pool_capacity, "tail past capacity"
        assert reserved + self._pool_garbage == self._pool_tail, "pool accounting mismatch"
        assert idmap_count(&self._index) == self._num_sequences, "index count mismatch"


_state.register("PageTable", PageTable._from_state)
