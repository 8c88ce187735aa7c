# The PageTable's C interface, for modules that cimport it (the KV-cache manager).
#
# Rows: a row is one sequence's slot in the table's metadata; it stays the same while
# the sequence is in the table, however its blocks move.  ``row_blocks(row)`` is
# invalidated by any call that may grow or compact the pool (``create_row``,
# ``reserve_row``, ``append_to_row``, ``drop_row``): read it again after them.
#
# Threads: a caller that changes the table from C marks it changing
# (``mark_changing``) for the duration, as the public methods do, because growth may
# let other threads run; see the README's "Threads" section for the whole contract.
cimport cython
from libc.stdint cimport int32_t, int64_t

from pagetable._types cimport block_id_t, seq_id_t, row_t
from pagetable._blocks cimport BlockGeometry
from pagetable._idmap cimport IdMap, idmap_find
from pagetable._guard cimport Guarded
from pagetable._rows cimport Rows
from pagetable._table_kernels cimport TableView


# Wait (letting other threads run) until ``flag[0]`` clears; RuntimeError after 0.5 s.
cdef int wait_while_set(int32_t* flag, str message) except -1


@cython.final
cdef class PageTable(Guarded):
    cdef:
        int32_t _block_size
        BlockGeometry _geometry    # the block size, with its shift and mask

        IdMap _index               # sequence id -> row
        object _index_storage      # (keys, values) arrays the index points into
        Rows _rows                 # per-row metadata (see _rows.pxd)
        object _rows_storage       # the one buffer _rows points into
        int32_t _rows_used         # high-water mark of rows handed out
        int32_t _rows_capacity
        int32_t _num_free_rows     # entries of _rows.free_stack
        int64_t _next_order
        int64_t _next_version      # the table's change stamp (see _touch)
        int64_t _num_sequences

        # The block pool: every row's blocks, each row contiguous.
        object _pool_map           # anonymous mmap owning the pool's memory
        object _pool_arr           # int32 [capacity], a view of _pool_map
        int32_t* _pool
        int64_t _pool_capacity
        int64_t _pool_tail         # first never-used entry
        int64_t _pool_garbage      # entries abandoned by relocated or removed rows
        int64_t _total_blocks      # sum of row lengths

        # Batched reads in flight without the GIL (other threads may run meanwhile).
        # Storage is never reallocated or compacted while this is non-zero.
        # (The change and ownership flags, _writing and _owned, come from Guarded.)
        int32_t _busy

    # ---- the interface other modules use ----------------------------------------
    # Lookups touch no Python object (safe without the GIL).
    cdef inline row_t find_row(self, seq_id_t seq_id) noexcept nogil:
        """Row of ``seq_id``, or -1 (also for a negative id)."""
        if seq_id < 0:
            return -1
        return idmap_find(&self._index, seq_id)

    cdef inline block_id_t* row_blocks(self, row_t row) noexcept nogil:
        return self._pool + self._rows.start[row]

    cdef inline int32_t row_length(self, row_t row) noexcept nogil:
        return self._rows.length[row]

    cdef inline int32_t rows_used(self) noexcept nogil:
        """Rows ``0 .. rows_used() - 1`` have been handed out (some may be free now)."""
        return self._rows_used

    cdef inline int64_t sequence_count(self) noexcept nogil:
        return self._num_sequences

    # Replace one block (copy-on-write), recording the change for device mirrors.
    cdef inline void set_block_at(self, row_t row, int64_t index, block_id_t block) noexcept nogil:
        self.row_blocks(row)[index] = block
        # Only appends and a new last block keep a mirror's copy of the row's prefix
        # valid; an edit further in asks mirrors to rewrite the row.
        self._touch(row, index < self._rows.length[row] - 1)

    # Changes (may allocate: MemoryError through except -1).  Each may move rows.
    cdef row_t create_row(self, seq_id_t seq_id) except -1      # seq_id >= 0, known absent
    cdef int reserve_row(self, row_t row, int64_t min_capacity) except -1
    cdef int append_to_row(self, row_t row, const block_id_t* blocks, int64_t count) except -1
    cdef int drop_row(self, row_t row) except -1                # never fails once started
    # Keep a row's first ``length`` blocks (``length`` <= its length); never fails.
    cdef inline void truncate_row(self, row_t row, int32_t length) noexcept nogil:
        if length >= self._rows.length[row]:
            return
        self._total_blocks -= self._rows.length[row] - length
        self._rows.length[row] = length
        # A mirror holding the dropped blocks must rewrite the row, not append to it.
        self._touch(row, True)
    cdef int reserve_sequences(self, int64_t extra) except -1

    # ``(seq_ids int64, lengths int32, blocks int32 or None)`` of one state, in
    # insertion order (see PageTable.snapshot in _table.pyx).
    cdef object snapshot(self, bint with_blocks, bint hold_gil=*)

    # ---- inside the table ---------------------------------------------------------
    # Every change to a row bumps the table's stamp and the row's (``rewrite``: also
    # the stamp of changes other than appends); nothing else writes them.  Dropping a
    # row bumps only the table's stamp (a re-created row gets fresh stamps).
    cdef inline void _touch(self, row_t row, bint rewrite) noexcept nogil:
        self._next_version += 1
        self._rows.version[row] = self._next_version
        if rewrite:
            self._rows.rewrite[row] = self._next_version

    cdef TableView _view(self) noexcept nogil
    cdef int _grow_index(self) except -1
    cdef int _rebuild_index(self, int64_t capacity) except -1
    cdef int _grow_rows(self, int32_t capacity) except -1
    cdef int _compact(self) except -1
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
    cdef int64_t _resolve(self, object seq_array, object rows_array, bint release) except -2
    cdef int _rows_of(self, object seq_array, object rows, int32_t* lengths) except -1
    cdef void _versions_into(self, const int64_t* seqs, int64_t count, int64_t* version_out,
                             int64_t* rewrite_out) noexcept nogil
    cdef int _raise_unresolved(self, object seq_array, int64_t bad) except -1
    cdef int _raise_bad_seq(self, object seq_array, int64_t bad) except -1
    cdef int _raise_unmapped(self, seq_array, pos_array, result) except -1
    cdef int _slot_mapping_into(self, seq_array, pos_array, result, hint_array=*) except -1

    cpdef append_block(self, sequence_id, block_id)
    cpdef get_block_for_position(self, sequence_id, token_pos)
    cpdef Py_ssize_t num_sequences(self)


# A new table holding validated rows (``_state.table_state``) in insertion order.
cdef PageTable _table_from_rows(int64_t block_size, object seq_ids, object lengths, object blocks)
