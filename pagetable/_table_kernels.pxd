# The table's kernels: pure nogil loops over a TableView, a plain-pointer snapshot.
#
# Each batched kernel returns the index of the first entry it could not handle (a
# negative sequence id), or -1; the caller raises once it holds the GIL again.  All
# are ``cdef inline`` so that every module that cimports them runs them at no call
# cost.  Another thread may change the table while a kernel runs without the GIL:
# each kernel reads a row's start and length once (relaxed atomic loads) and checks
# them against ``pool_capacity`` before indexing the pool, and the caller runs a read
# that overlapped a change again (see PageTable's read protocol).
from libc.stdint cimport int32_t, int64_t, uint64_t, INT32_MAX
from libc.string cimport memcpy

from pagetable._types cimport block_id_t, seq_id_t, row_t, PAD
from pagetable._idmap cimport IdMap, idmap_find


cdef struct TableView:
    IdMap index                  # sequence id -> row
    int64_t* row_start
    int32_t* row_len
    int64_t* row_seq             # sequence id of each row, -1 for a free row
    int64_t rows_used            # rows 0 .. rows_used - 1 exist (some may be free)
    int32_t* pool
    int64_t pool_capacity        # entries of pool; never shrinks while a read is in flight
    int64_t block_size
    int32_t block_shift          # log2(block_size) when a power of two, else -1
    int64_t block_mask           # block_size - 1 when a power of two


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
    int64_t load_i64 "pagetable_load_i64" (const int64_t* p) noexcept nogil
    int32_t load_i32 "pagetable_load_i32" (const int32_t* p) noexcept nogil

cdef extern from *:
    """
    #define PAGETABLE_EXACT_DOUBLE_LIMIT (1LL << 52)
    """
    int64_t EXACT_DOUBLE_LIMIT "PAGETABLE_EXACT_DOUBLE_LIMIT"

cdef inline row_t view_find(const TableView* view, seq_id_t seq_id) noexcept nogil:
    """Row of ``seq_id`` (>= 0), or -1."""
    return idmap_find(&view.index, seq_id)


cdef inline row_t hinted_find(const TableView* view, const int32_t* hints, int64_t k,
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
    return view_find(view, seq_id)


# Exact quotient by a block size that is not a power of two, for 0 <= pos < 2**52:
# a double-precision reciprocal is off by at most one there, and one correction step
# fixes it.  Hardware 64-bit division would cost tens of cycles per token.

cdef inline int64_t exact_quotient(int64_t pos, int64_t block_size, double reciprocal) noexcept nogil:
    cdef int64_t quotient = <int64_t>(<double>pos * reciprocal)
    cdef int64_t remainder = pos - quotient * block_size
    if remainder < 0:
        quotient -= 1
    elif remainder >= block_size:
        quotient += 1
    return quotient


cdef inline int64_t block_of(int64_t pos, const TableView* view, int64_t limit,
                              double reciprocal) noexcept nogil:
    """Logical block index of a mapped position ``0 <= pos < limit``."""
    if view.block_shift >= 0:
        return pos >> view.block_shift
    if limit <= EXACT_DOUBLE_LIMIT:
        return exact_quotient(pos, view.block_size, reciprocal)
    return pos // view.block_size


cdef enum:
    # The longest stretch of consecutive positions mapped in one pass (see
    # ``block_slots``); past it the pool is read again for the same block.
    CONSECUTIVE_STRETCH_MAX = 512
    # end_of_run compares this many ids per step, without an early exit inside the
    # step, so that the compiler turns the step into vector compares.
    RUN_SCAN_STEP = 8


cdef inline int64_t end_of_run(const int64_t* seq_ids, int64_t begin, int64_t end) noexcept nogil:
    """End of the run of equal ids starting at ``begin``."""
    cdef seq_id_t seq_id = seq_ids[begin]
    cdef int64_t i = begin + 1, t
    cdef uint64_t differ
    while i + RUN_SCAN_STEP <= end:
        differ = 0
        for t in range(RUN_SCAN_STEP):
            differ |= <uint64_t>(seq_ids[i + t] ^ seq_id)
        if differ:
            break
        i += RUN_SCAN_STEP
    while i < end and seq_ids[i] == seq_id:
        i += 1
    return i


# Consecutive positions of one sequence, the usual shape of its tokens (a prefill
# chunk, a decode window), stay in one block for up to ``block_size`` tokens, and
# there every slot is ``pos + (block - block_index) * block_size``: one pool read per
# block and an add per token.  One pass over such a stretch checks that the ids are
# still the run's and the positions still consecutive, and writes its guesses; a
# stretch that fails the check is mapped again from where it failed.  Checking the
# ids in the same pass leaves no separate scan for the run's end, so a grouped batch
# reads each input once.  The loops are in C for ``__restrict`` (the callers never let
# an output overlap an input): the compiler vectorises them with no overlap test, and
# the common block sizes get a constant count, unrolled into whole vector steps.
cdef extern from *:
    """
    static inline uint64_t pagetable_stretch_slots(const int64_t* __restrict seq_ids, int64_t seq_id,
            const int64_t* __restrict positions, int64_t* __restrict out, int64_t count,
            int64_t first, int64_t delta, int64_t pad) {
        uint64_t differ = 0;
        for (int64_t t = 0; t < count; t++) {
            int64_t pos = positions[t];
            differ |= (uint64_t)(pos ^ (first + t)) | (uint64_t)(seq_ids[t] ^ seq_id);
            out[t] = (pos + delta) | pad;
        }
        return differ;
    }
    static inline uint64_t pagetable_stretch_lookup(const int64_t* __restrict seq_ids, int64_t seq_id,
            const int64_t* __restrict positions, int32_t* __restrict blocks_out,
            int32_t* __restrict offsets_out, int64_t count, int64_t first, int32_t block,
            int64_t block_begin) {
        uint64_t differ = 0;
        for (int64_t t = 0; t < count; t++) {
            int64_t pos = positions[t];
            differ |= (uint64_t)(pos ^ (first + t)) | (uint64_t)(seq_ids[t] ^ seq_id);
            blocks_out[t] = block;
            offsets_out[t] = (int32_t)(pos - block_begin);
        }
        return differ;
    }
    """
    uint64_t stretch_slots "pagetable_stretch_slots" (
        const int64_t* seq_ids, int64_t seq_id, const int64_t* positions, int64_t* out,
        int64_t count, int64_t first, int64_t delta, int64_t pad) noexcept nogil
    uint64_t stretch_lookup "pagetable_stretch_lookup" (
        const int64_t* seq_ids, int64_t seq_id, const int64_t* positions, int32_t* blocks_out,
        int32_t* offsets_out, int64_t count, int64_t first, int32_t block,
        int64_t block_begin) noexcept nogil


cdef inline int64_t block_stretch(int64_t pos, int64_t block_index, int64_t block_size,
                                  int64_t limit, int64_t count) noexcept nogil:
    """Tokens from a mapped ``pos`` that stay in its block if positions are consecutive."""
    cdef int64_t take = (block_index + 1) * block_size - pos
    if take > limit - pos:
        take = limit - pos
    if take > count:
        take = count
    # A huge block would make one failed check cost a long second pass.
    if take > CONSECUTIVE_STRETCH_MAX:
        take = CONSECUTIVE_STRETCH_MAX
    return take


cdef inline uint64_t block_slots(const int64_t* seq_ids, int64_t seq_id, const int64_t* positions,
                                 int64_t* out, int64_t take, int64_t pos, int64_t delta,
                                 int64_t pad) noexcept nogil:
    if take == 16:
        return stretch_slots(seq_ids, seq_id, positions, out, 16, pos, delta, pad)
    if take == 32:
        return stretch_slots(seq_ids, seq_id, positions, out, 32, pos, delta, pad)
    return stretch_slots(seq_ids, seq_id, positions, out, take, pos, delta, pad)


cdef inline uint64_t block_lookup(const int64_t* seq_ids, int64_t seq_id, const int64_t* positions,
                                  int32_t* blocks_out, int32_t* offsets_out, int64_t take,
                                  int64_t pos, int32_t block, int64_t block_begin) noexcept nogil:
    if take == 16:
        return stretch_lookup(seq_ids, seq_id, positions, blocks_out, offsets_out, 16, pos,
                              block, block_begin)
    if take == 32:
        return stretch_lookup(seq_ids, seq_id, positions, blocks_out, offsets_out, 32, pos,
                              block, block_begin)
    return stretch_lookup(seq_ids, seq_id, positions, blocks_out, offsets_out, take, pos,
                          block, block_begin)


cdef inline int64_t consecutive_prefix(const int64_t* seq_ids, int64_t seq_id,
                                       const int64_t* positions, int64_t pos,
                                       int64_t count) noexcept nogil:
    """How many of ``count`` tokens are ``seq_id``'s and at ``pos``, ``pos + 1``, ..."""
    cdef int64_t t = 0
    while t < count and seq_ids[t] == seq_id and positions[t] == pos + t:
        t += 1
    return t


cdef inline void slots_one_by_one(const int32_t* data, int64_t limit, int64_t block_size,
                                     int32_t shift, int64_t mask, double reciprocal,
                                     const int64_t* positions, int64_t* out,
                                     int64_t count) noexcept nogil:
    """Slots of ``count`` positions of one mapped row, each on its own."""
    cdef int64_t k, pos, block_index
    cdef int32_t block
    if shift >= 0:
        for k in range(count):
            pos = positions[k]
            # One unsigned compare rejects negative and past-the-end positions alike.
            if <uint64_t>pos < <uint64_t>limit:
                # A released entry (PAD, windowed managers) gives PAD: OR-ing in
                # the block's sign (all ones for -1) keeps the loop branch-free.
                block = data[pos >> shift]
                out[k] = (<int64_t>block << shift) | (pos & mask) | (<int64_t>block >> 31)
            else:
                out[k] = PAD
    elif limit <= EXACT_DOUBLE_LIMIT:
        for k in range(count):
            pos = positions[k]
            if <uint64_t>pos < <uint64_t>limit:
                block_index = exact_quotient(pos, block_size, reciprocal)
                block = data[block_index]
                out[k] = (<int64_t>block * block_size + (pos - block_index * block_size)) | (<int64_t>block >> 31)
            else:
                out[k] = PAD
    else:
        for k in range(count):
            pos = positions[k]
            if <uint64_t>pos < <uint64_t>limit:
                block_index = pos // block_size
                block = data[block_index]
                out[k] = (<int64_t>block * block_size + (pos - block_index * block_size)) | (<int64_t>block >> 31)
            else:
                out[k] = PAD


cdef inline int64_t run_slots(const TableView* view, row_t row, const int64_t* seq_ids,
                               const int64_t* positions, int64_t* out, int64_t count) noexcept nogil:
    """Slots of the run of ``seq_ids[0]`` (``row``, or -1 if unknown) among ``count`` tokens.

    Returns the run's length: the tokens it mapped, up to the first other id.
    """
    cdef int64_t k = 0, pos, block_index, take, run_end
    cdef int32_t block
    cdef seq_id_t seq_id = seq_ids[0]
    cdef int64_t start = load_i64(view.row_start + row) if row >= 0 else 0
    cdef int64_t length = load_i32(view.row_len + row) if row >= 0 else 0
    cdef const int32_t* data
    cdef int64_t block_size = view.block_size
    cdef int64_t limit
    cdef double reciprocal = 1.0 / <double>block_size
    if start < 0 or start + length > view.pool_capacity:
        length = 0      # torn by a change in another thread: the caller reads again
    limit = length * block_size      # positions 0 .. limit - 1 are mapped
    if length <= 0:
        run_end = end_of_run(seq_ids, 0, count)
        for k in range(run_end):
            out[k] = PAD
        return run_end
    data = view.pool + start
    while k < count:
        if seq_ids[k] != seq_id:
            return k
        pos = positions[k]
        if <uint64_t>pos >= <uint64_t>limit:
            out[k] = PAD
            k += 1
            continue
        block_index = block_of(pos, view, limit, reciprocal)
        take = block_stretch(pos, block_index, block_size, limit, count - k)
        block = data[block_index]
        # A released entry (PAD, windowed managers) gives PAD: OR-ing in the block's
        # sign (all ones for -1) keeps the loop branch-free.
        if not block_slots(seq_ids + k, seq_id, positions + k, out + k, take, pos,
                           (<int64_t>block - block_index) * block_size, <int64_t>block >> 31):
            k += take
            continue
        k += consecutive_prefix(seq_ids + k, seq_id, positions + k, pos, take)
        if k < count and seq_ids[k] == seq_id:
            # Not consecutive: the rest of this run token by token.
            run_end = end_of_run(seq_ids, k, count)
            slots_one_by_one(data, limit, block_size, view.block_shift, view.block_mask,
                             reciprocal, positions + k, out + k, run_end - k)
            return run_end
    return k


cdef inline int64_t run_lookup(const TableView* view, row_t row, const int64_t* seq_ids,
                                const int64_t* positions, int32_t* blocks_out,
                                int32_t* offsets_out, int64_t count, bint consecutive) noexcept nogil:
    """Block ids and offsets of the run of ``seq_ids[0]``; returns as ``run_slots``.

    ``consecutive`` tries the one-pass stretches (see ``run_slots``); a short run
    goes token by token from the start.
    """
    cdef int64_t k = 0, pos, block_index, take
    cdef int64_t run_end = count if consecutive else end_of_run(seq_ids, 0, count)
    cdef int32_t block
    cdef seq_id_t seq_id = seq_ids[0]
    cdef int64_t start = load_i64(view.row_start + row) if row >= 0 else 0
    cdef int64_t length = load_i32(view.row_len + row) if row >= 0 else 0
    cdef const int32_t* data
    cdef int64_t block_size = view.block_size
    cdef int64_t limit
    cdef double reciprocal = 1.0 / <double>block_size
    if start < 0 or start + length > view.pool_capacity:
        length = 0      # torn by a change in another thread: the caller reads again
    limit = length * block_size
    if length <= 0:
        if consecutive:
            run_end = end_of_run(seq_ids, 0, count)
        for k in range(run_end):
            blocks_out[k] = PAD
            offsets_out[k] = PAD
        return run_end
    data = view.pool + start
    while k < run_end:
        if consecutive and seq_ids[k] != seq_id:
            return k
        pos = positions[k]
        if <uint64_t>pos >= <uint64_t>limit:
            blocks_out[k] = PAD
            offsets_out[k] = PAD
            k += 1
            continue
        block_index = block_of(pos, view, limit, reciprocal)
        if consecutive:
            take = block_stretch(pos, block_index, block_size, limit, count - k)
            block = data[block_index]
            if not block_lookup(seq_ids + k, seq_id, positions + k, blocks_out + k,
                                offsets_out + k, take, pos, block, block_index * block_size):
                k += take
                continue
            k += consecutive_prefix(seq_ids + k, seq_id, positions + k, pos, take)
            if k == count or seq_ids[k] != seq_id:
                return k
            # Not consecutive: the rest of this run token by token.
            consecutive = False
            run_end = end_of_run(seq_ids, k, count)
            continue
        blocks_out[k] = data[block_index]
        offsets_out[k] = <int32_t>(pos - block_index * block_size)
        k += 1
    return run_end


cdef enum:
    # Tokens outside long runs are mapped one by one, in stretches this long; after
    # each stretch the scan looks for a long run again.
    INTERLEAVED_BATCH = 64


cdef inline int64_t interleaved_slots(const TableView* view, const int64_t* seq_ids,
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
        row = hinted_find(view, hints, k, seq_id)
        pos = positions[k]
        limit = (load_i32(view.row_len + row) if row >= 0 else 0) * block_size
        if <uint64_t>pos >= <uint64_t>limit:
            out[k] = PAD
            continue
        block_index = pos >> shift if shift >= 0 else block_of(pos, view, limit, reciprocal)
        entry = load_i64(view.row_start + row) + block_index
        # A row torn by a change in another thread must not send the read outside
        # the pool; the caller reads again in that case.
        if <uint64_t>entry >= capacity:
            out[k] = PAD
        elif shift >= 0:   # a released entry (PAD) gives PAD, as in run_slots
            out[k] = ((<int64_t>view.pool[entry] << shift) | (pos & mask)
                      | (<int64_t>view.pool[entry] >> 31))
        else:
            out[k] = ((<int64_t>view.pool[entry] * block_size + (pos - block_index * block_size))
                      | (<int64_t>view.pool[entry] >> 31))
    return -1


cdef inline bint is_long_run(const int64_t* seq_ids, int64_t i, int64_t end) noexcept nogil:
    """Whether ``seq_ids[i]`` starts a run of at least four (worth one probe for all)."""
    return (i + 4 <= end and seq_ids[i + 1] == seq_ids[i] and seq_ids[i + 2] == seq_ids[i]
            and seq_ids[i + 3] == seq_ids[i])


cdef inline int64_t slot_mapping_range(const TableView* view, const int64_t* seq_ids,
                                 const int32_t* hints, const int64_t* positions,
                                 int64_t* out, int64_t begin, int64_t end) noexcept nogil:
    """Slots for entries ``begin .. end - 1``, one hash probe per run of equal ids.

    ``hints`` (NULL, or one row hint per entry) replaces probes whose hint is right.
    Returns the index of the first negative sequence id, or -1.
    """
    cdef int64_t i = begin, batch_end, bad
    while i < end:
        if seq_ids[i] < 0:
            return i
        if is_long_run(seq_ids, i, end):
            i += run_slots(view, hinted_find(view, hints, i, seq_ids[i]), seq_ids + i,
                           positions + i, out + i, end - i)
            continue
        # Short runs: the batch is interleaved here.
        batch_end = min(i + INTERLEAVED_BATCH, end)
        bad = interleaved_slots(view, seq_ids + i, hints + i if hints != NULL else NULL,
                                 positions + i, out + i, batch_end - i)
        if bad >= 0:
            return i + bad
        i = batch_end
    return -1


cdef inline int64_t interleaved_lookup(const TableView* view, const int64_t* seq_ids,
                                        const int32_t* hints, const int64_t* positions,
                                        int32_t* blocks_out, int32_t* offsets_out,
                                        int64_t count) noexcept nogil:
    """Block ids and offsets of ``count`` tokens of mixed ids; see ``interleaved_slots``."""
    cdef int64_t k, pos, block_index, limit, entry
    cdef int64_t block_size = view.block_size
    cdef int32_t shift = view.block_shift
    cdef uint64_t capacity = <uint64_t>view.pool_capacity
    cdef double reciprocal = 1.0 / <double>block_size
    cdef seq_id_t seq_id
    cdef row_t row
    for k in range(count):
        seq_id = seq_ids[k]
        if seq_id < 0:
            return k
        row = hinted_find(view, hints, k, seq_id)
        pos = positions[k]
        limit = (load_i32(view.row_len + row) if row >= 0 else 0) * block_size
        block_index = pos >> shift if shift >= 0 else block_of(pos, view, limit, reciprocal)
        entry = load_i64(view.row_start + row) + block_index if row >= 0 else -1
        # A row torn by a change in another thread must not send the read outside
        # the pool; the caller reads again in that case.
        if <uint64_t>pos >= <uint64_t>limit or <uint64_t>entry >= capacity:
            blocks_out[k] = PAD
            offsets_out[k] = PAD
        else:
            blocks_out[k] = view.pool[entry]
            offsets_out[k] = <int32_t>(pos - block_index * block_size)
    return -1


cdef inline int64_t lookup_range(const TableView* view, const int64_t* seq_ids,
                           const int32_t* hints, const int64_t* positions,
                           int32_t* blocks_out, int32_t* offsets_out,
                           int64_t begin, int64_t end) noexcept nogil:
    """Block ids and offsets for entries ``begin .. end - 1``; see ``slot_mapping_range``."""
    cdef int64_t i = begin, batch_end, bad
    while i < end:
        if seq_ids[i] < 0:
            return i
        if is_long_run(seq_ids, i, end):
            i += run_lookup(view, hinted_find(view, hints, i, seq_ids[i]), seq_ids + i,
                            positions + i, blocks_out + i, offsets_out + i, end - i, True)
            continue
        # Short runs: the batch is interleaved here.
        batch_end = min(i + INTERLEAVED_BATCH, end)
        bad = interleaved_lookup(view, seq_ids + i, hints + i if hints != NULL else NULL,
                                 positions + i, blocks_out + i, offsets_out + i, batch_end - i)
        if bad >= 0:
            return i + bad
        i = batch_end
    return -1


cdef inline int64_t resolve_rows(const TableView* view, const int64_t* seq_ids, int32_t* rows,
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
            row = view_find(view, seq_id)
            if row < 0:
                return i
        rows[i] = row
    return -1


cdef inline int compare_pairs(const void* a, const void* b) noexcept nogil:
    """qsort order of (int64, int64) pairs: by the first, then the second."""
    cdef const int64_t* x = <const int64_t*>a
    cdef const int64_t* y = <const int64_t*>b
    if x[0] != y[0]:
        return (x[0] > y[0]) - (x[0] < y[0])
    return (x[1] > y[1]) - (x[1] < y[1])


cdef inline void copy_padded(const int32_t* pool, const int64_t* starts, const int32_t* lengths,
                       int64_t count, int32_t* target, int64_t width) noexcept nogil:
    """Rows ``pool[starts[b] : starts[b] + lengths[b]]`` into a ``count x width`` table, padded."""
    cdef int64_t b, j
    cdef int32_t* dest
    for b in range(count):
        dest = target + b * width
        memcpy(dest, pool + starts[b], <size_t>lengths[b] * sizeof(int32_t))
        for j in range(lengths[b], width):
            dest[j] = PAD


cdef inline void copy_packed(const int32_t* pool, const int64_t* starts, const int32_t* lengths,
                       int64_t count, int32_t* target) noexcept nogil:
    """Rows ``pool[starts[b] : starts[b] + lengths[b]]`` one after another into ``target``."""
    cdef int64_t b, write = 0
    for b in range(count):
        memcpy(target + write, pool + starts[b], <size_t>lengths[b] * sizeof(int32_t))
        write += lengths[b]


# Kernel blocks: an attention kernel may page the cache in blocks of ``b`` tokens, a
# divisor of the table's block size ``B``; each table block then is ``k = B // b``
# kernel blocks, block ``m`` being kernel blocks ``m*k .. m*k + k - 1``.

cdef inline void expand_whole_blocks(const int32_t* blocks, int64_t count, int64_t k,
                                     int32_t* dest) noexcept nogil:
    """Kernel blocks of ``count`` whole table blocks, ``k`` each.

    PAD (-1) is a row's only negative entry; ``pad`` is all ones for it and zero
    otherwise, so the OR makes its ``k`` entries PAD without a branch.  Where the
    caller passes a constant ``k`` the compiler turns the inner loop into vector
    stores (one 16-byte store per block for ``k = 4``, seen in the disassembly); in
    C alone this splits 32 K blocks into 128 K kernel blocks in about 21 us here,
    the speed of writing the output.
    """
    cdef int64_t i, j
    cdef int32_t block, pad
    cdef int32_t step = <int32_t>k
    for i in range(count):
        block = blocks[i]
        pad = -<int32_t>(block < 0)
        for j in range(k):
            dest[j] = (block * step + <int32_t>j) | pad
        dest += k


cdef inline void expand_to_kernel_blocks(const int32_t* blocks, int64_t count, int64_t k,
                                         int32_t* dest) noexcept nogil:
    """The first ``count`` kernel blocks of a row of table blocks into ``dest``.

    A padded entry becomes ``k`` padded ones.  ``count`` may end inside a table block
    (a sequence's kernel blocks past its length are not listed).
    """
    cdef int64_t j, full = count // k, rest = count - full * k
    cdef int32_t block
    if k == 1:          # no split: the blocks themselves (a manager's own layout)
        memcpy(dest, blocks, <size_t>count * sizeof(int32_t))
        return
    # The usual splits get a constant k (see expand_whole_blocks).
    if k == 2:
        expand_whole_blocks(blocks, full, 2, dest)
    elif k == 4:
        expand_whole_blocks(blocks, full, 4, dest)
    elif k == 8:
        expand_whole_blocks(blocks, full, 8, dest)
    elif k == 16:
        expand_whole_blocks(blocks, full, 16, dest)
    else:
        expand_whole_blocks(blocks, full, k, dest)
    if rest:
        dest += full * k
        block = blocks[full]
        for j in range(rest):
            dest[j] = PAD if block == PAD else block * <int32_t>k + <int32_t>j


cdef inline int64_t first_row_past_int32(const TableView* view, const int64_t* starts,
                                         const int32_t* lengths, int64_t count,
                                         int64_t k) noexcept nogil:
    """Index of the first row holding a block whose kernel block ids pass int32, or -1.

    Block ``m``'s last kernel block is ``m*k + k - 1``.  A table takes any block id
    up to ``2**31 - 1``, so a split can overflow; the manager's ids cannot (its pool
    has fewer than ``2**31`` tokens).
    """
    cdef int64_t b
    cdef int32_t j, length, largest
    cdef int32_t limit = <int32_t>((<int64_t>INT32_MAX - k + 1) // k)
    cdef const int32_t* data
    if k == 1:
        return -1
    for b in range(count):
        data = view.pool + starts[b]
        length = lengths[b]
        largest = 0
        # A maximum without an early exit: the compiler vectorises it, twice as fast
        # as stopping at the first large entry (measured on 32 K entries).
        for j in range(length):
            largest = data[j] if data[j] > largest else largest
        if largest > limit:
            return b
    return -1


cdef inline int64_t copy_padded_kernel_blocks(const TableView* view, const int64_t* starts,
                                              const int32_t* lengths, int64_t count, int64_t k,
                                              int32_t* target, int64_t width) noexcept nogil:
    """``copy_padded`` in kernel blocks: row ``b``'s ``lengths[b] * k``, then padding.

    Checks every row before writing anything: returns the index of the first row
    that ``first_row_past_int32`` reports (``target`` untouched), or -1.
    """
    cdef int64_t b, j, bad = first_row_past_int32(view, starts, lengths, count, k)
    cdef int32_t* dest
    if bad >= 0:
        return bad
    for b in range(count):
        dest = target + b * width
        expand_to_kernel_blocks(view.pool + starts[b], lengths[b] * k, k, dest)
        for j in range(lengths[b] * k, width):
            dest[j] = PAD
    return -1


cdef inline int64_t copy_packed_kernel_blocks(const TableView* view, const int64_t* starts,
                                              const int32_t* lengths, int64_t count, int64_t k,
                                              int32_t* target) noexcept nogil:
    """``copy_packed`` in kernel blocks; returns as ``copy_padded_kernel_blocks``."""
    cdef int64_t b, bad = first_row_past_int32(view, starts, lengths, count, k)
    if bad >= 0:
        return bad
    for b in range(count):
        expand_to_kernel_blocks(view.pool + starts[b], lengths[b] * k, k, target)
        target += lengths[b] * k
    return -1
