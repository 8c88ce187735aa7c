# C-level interface of the PageTable, for other extension modules (the KV-cache
# manager) that need to read and grow rows without going through Python.
cimport cython
from pagetable._types cimport block_id_t, seq_id_t, row_t, int32_t, int64_t


# A plain-pointer snapshot of the table for nogil kernels.  Valid until the next
# call that may grow or compact storage.
cdef struct TableView:
    int64_t* index_keys
    int32_t* index_rows
    int64_t index_mask
    int32_t index_shift
    int64_t* row_start
    int32_t* row_len
    int64_t* row_seq             # sequence id of each row, -1 for a free row
    int64_t rows_used            # rows 0 .. rows_used - 1 exist (some may be free)
    int32_t* pool
    int64_t pool_capacity        # entries of pool; never shrinks while a read is in flight
    int64_t block_size
    int32_t block_shift
    int64_t block_mask


# Wait (letting other threads run) until ``flag[0]`` clears; RuntimeError after 0.5 s.
cdef int _wait_while_set(int32_t* flag, str message) except -1


@cython.final
cdef class PageTable:
    cdef:
        int32_t _block_size
        int32_t _block_shift       # log2(block_size) when a power of two, else -1
        int32_t _block_mask        # block_size - 1 when a power of two

        # Open-addressing hash index: sequence id -> row.  Empty slots hold key -1.
        object _index_keys_arr     # int64 [capacity]
        object _index_rows_arr     # int32 [capacity]
        int64_t* _index_keys
        int32_t* _index_rows
        int64_t _index_mask        # capacity - 1 (capacity is a power of two)
        int32_t _index_shift       # 64 - log2(capacity), for Fibonacci hashing

        # Per-row metadata, rows indexed 0 .. _rows_used - 1.
        object _row_start_arr      # int64: offset of the row's first block in the pool
        object _row_len_arr        # int32: number of blocks mapped
        object _row_cap_arr        # int32: blocks reserved in the pool
        object _row_seq_arr        # int64: sequence id, -1 for a free row
        object _row_order_arr      # int64: insertion stamp, for iteration order
        object _row_pending_arr    # int32: scratch for append_blocks, all zero between calls
        object _row_version_arr    # int64: stamp of the row's last change (see versions())
        object _row_rewrite_arr    # int64: stamp of its last change other than an append
        int64_t* _row_start
        int32_t* _row_len
        int32_t* _row_cap
        int64_t* _row_seq
        int64_t* _row_order
        int32_t* _row_pending
        int64_t* _row_version
        int64_t* _row_rewrite
        int64_t _next_version
        int32_t _rows_used         # high-water mark of rows handed out
        int32_t _rows_capacity
        object _free_stack_arr     # int32: recycled rows, a stack of _num_free_rows
        int32_t* _free_stack
        int32_t _num_free_rows
        int64_t _next_order
        int64_t _num_sequences

        # The block pool: every row's blocks, each row contiguous.
        object _pool_map           # anonymous mmap owning the pool's memory
        object _pool_arr           # int32 [capacity], a view of _pool_map
        int32_t* _pool
        int64_t _pool_capacity
        int64_t _pool_tail         # first never-used entry
        int64_t _pool_garbage      # entries abandoned by relocated or removed rows
        int64_t _total_blocks      # sum of row lengths
        # Batched calls in flight without the GIL (other threads may run meanwhile).
        # Storage is never reallocated or compacted while this is non-zero.
        int32_t _busy
        # A change in progress that may let other threads run (allocating or freeing
        # mapped memory releases the GIL).  Another change meanwhile raises.
        int32_t _writing
        # Set while a KVCacheManager owns the table: changes from outside it raise.
        int32_t _owned

    # Lookups (no Python objects touched; safe without the GIL).
    cdef row_t _find_row(self, seq_id_t seq_id) noexcept nogil
    cdef inline block_id_t* _row_data(self, row_t row) noexcept nogil:
        return self._pool + self._row_start[row]
    cdef inline int32_t _row_length(self, row_t row) noexcept nogil:
        return self._row_len[row]
    cdef TableView _view(self) noexcept nogil

    # Mutations (may allocate; raise MemoryError through except -1).  Each one may
    # move rows: re-read _row_data after calling it.
    cdef row_t _get_or_create_row(self, seq_id_t seq_id) except -1
    cdef row_t _create_row(self, seq_id_t seq_id) except -1
    cdef int _reserve_row(self, row_t row, int64_t min_capacity) except -1
    cdef int _append_to_row(self, row_t row, const block_id_t* blocks, int64_t count) except -1
    cdef int _drop_row(self, row_t row) except -1
    # Replace one block (copy-on-write) and record the change for device mirrors.
    cdef void _set_block_at(self, row_t row, int64_t index, block_id_t block) noexcept nogil

    # Internal storage management.
    cdef object _allocate_index(self, int64_t capacity)
    cdef void _index_insert(self, seq_id_t seq_id, row_t row) noexcept nogil
    cdef void _index_remove(self, seq_id_t seq_id) noexcept nogil
    cdef int _grow_index(self) except -1
    cdef int _reserve_sequences(self, int64_t extra) except -1
    cdef int _rebuild_index(self, int64_t capacity) except -1
    cdef int _grow_rows(self, int32_t capacity) except -1
    cdef int _compact_into(self, object target_arr) except -1
    cdef int _append_many(self, object seq_array, object block_array, int64_t num_runs) except -1
    cdef int _undo_pending(self, int32_t* touched, int64_t num_touched, int64_t first_new_order) except -1
    cdef int _ensure_pool_space(self, int64_t needed) except -1
    cdef int _wait_for_readers(self) except -1
    cdef int _begin_write(self) except -1
    cdef int _refuse_write(self) except -1
    cdef int64_t _read_begin(self) except -1
    cdef bint _read_end(self, int64_t stamp) noexcept
    cdef int _set_pool(self, object pool_map, int64_t capacity) except -1
    cdef int _resize_pool(self, int64_t capacity) except -1
    cdef int _maybe_shrink(self) except -1
    cdef int _populate(self, int64_t begin) except -1
    cdef int _release_tail_pages(self) except -1
    cdef row_t _row_or_raise(self, seq_id_t seq_id, str name) except -1
    cdef object _row_array(self, row_t row)
    cdef int _capture(self, object rows_array, int64_t* starts, int32_t* lengths) except -1
    cdef object _snapshot(self, bint with_blocks, bint hold_gil=*)
    cdef int64_t _resolve(self, object seq_array, object rows_array, bint release) except -2
    cdef void _versions_into(self, const int64_t* seqs, int64_t count, int64_t* version_out,
                             int64_t* rewrite_out) noexcept nogil
    cdef int _raise_unresolved(self, object seq_array, int64_t bad) except -1
    cdef int _raise_bad_seq(self, object seq_array, int64_t bad) except -1
    cdef int _raise_unmapped(self, seq_array, pos_array, result) except -1
    cdef int _slot_mapping_into(self, seq_array, pos_array, result, hint_array=*) except -1

    cpdef append_block(self, sequence_id, block_id)
    cpdef get_block_for_position(self, sequence_id, token_pos)
    cpdef Py_ssize_t num_sequences(self)
