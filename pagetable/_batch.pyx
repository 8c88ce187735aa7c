"""BatchTable: a persistent dense block table, kept current from a page table's change stamps.

See docs/BATCH_TABLE.md for the contract.  Layout: three per-row arrays users read
(the dense table, entries per row, the sequence in each row) and, privately, per row:
the page table's row of the sequence (a hint, checked before every use), the change
stamps last copied, and the column range changed since the changes were last taken.

Every method holds the GIL from start to end and calls nothing that could let another
thread run once it has begun to change anything, so the arrays are never seen
half-changed by Python code.  Arguments are all checked first: a call that raises has
changed nothing.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, INT32_MAX, INT64_MAX
from libc.string cimport memcpy

import numpy as np
cimport numpy as cnp

from pagetable._types cimport block_id_t, row_t, PAD
from pagetable._accept cimport int_vector, is_kernel_vector, output_vector, shares_memory
from pagetable._blocks cimport BlockGeometry, block_geometry, block_index, block_offset
from pagetable._buffers cimport empty, i32, i64
from pagetable._table cimport PageTable
from pagetable._convert import as_index, check_range, kernel_blocks_per_block
from pagetable._manager import KVCacheManager
import operator

cnp.import_array()

cdef enum:
    # A row's stamps before its first update: never equal to a table's stamp (those
    # are >= 1) nor to the stamp of a sequence absent from the table (-1).
    NEVER = -2
    READ_ATTEMPTS = 4

_KEPT_CHANGING = (
    "the page table kept changing in another thread during BatchTable.update; "
    "hold a lock around changes and updates")


cdef object _readonly(object array):
    view = array.view()
    view.flags.writeable = False
    return view


cdef object _size(object value, str name):
    return check_range(as_index(value, name), 1, INT32_MAX, name)


@cython.final
cdef class BatchTable:
    """A dense block table whose rows persist across engine steps.

    Rows are assigned to sequences (:meth:`add`, :meth:`remove`, :meth:`move`,
    :meth:`swap`, :meth:`condense`); :meth:`update` brings every row up to date with
    the page table, copying only rows whose change stamps moved, and of those only
    the appended blocks unless a block further in was replaced.

    Parameters
    ----------
    source : PageTable or KVCacheManager
        The table to mirror (a manager's ``page_table``), for the batch table's life.
    max_rows : int
        Rows of the table: the most sequences held at once.
    max_blocks_per_seq : int
        The most blocks one sequence may have (in the table's blocks).
    kernel_block_size : int, optional
        List kernel blocks of this many tokens: a divisor ``b`` of the block size,
        ``k = block_size // b``; block ``m`` is listed as ``m*k .. m*k + k - 1``.

    Attributes
    ----------
    block_table : numpy.ndarray of int32, shape (max_rows, width)
        Read-only view; row ``r`` holds its sequence's blocks, PAD_SLOT_ID after them.
    num_blocks : numpy.ndarray of int32, shape (max_rows,)
        Read-only view: entries of each row (0 for a free row).
    seq_ids : numpy.ndarray of int64, shape (max_rows,)
        Read-only view: the sequence in each row, -1 for a free row.

    Examples
    --------
    >>> import pagetable
    >>> kv = pagetable.KVCacheManager(num_blocks=64, block_size=16)
    >>> _ = kv.add_sequences([7, 9], num_tokens=[20, 3])
    >>> bt = pagetable.BatchTable(kv, max_rows=4, max_blocks_per_seq=8)
    >>> bt.add([7, 9]).tolist()
    [0, 1]
    >>> bt.update()
    2
    >>> bt.num_blocks[:2].tolist()
    [2, 1]
    """

    cdef:
        PageTable _source
        int64_t _max_rows, _max_blocks, _per_block, _width, _num_rows
        object _table_arr, _num_arr, _seq_arr, _hint_arr, _ver_arr, _rew_arr
        object _first_arr, _end_arr, _moved_arr
        object _table_view, _num_view, _seq_view
        int32_t* _table
        int32_t* _num
        int64_t* _seq
        int32_t* _hint
        int64_t* _ver
        int64_t* _rew
        int32_t* _first      # changed columns [first, end) since the changes were taken
        int32_t* _end
        int32_t* _moved      # scratch of update: the rows whose stamps moved
        int64_t _num_moved
        dict _row_of
        BlockGeometry _entry      # tokens per entry: the kernel block size, or the block size
        int64_t _seen_stamp   # the source's stamp when every row was last current
        bint _stale           # a row was added or invalidated since the last update
        readonly object kernel_block_size

    def __init__(self, source, max_rows, max_blocks_per_seq, *, kernel_block_size=None):
        table = source
        if isinstance(source, KVCacheManager):
            table = source.page_table
        elif not isinstance(source, PageTable):
            raise TypeError(
                f"source must be a PageTable or a KVCacheManager, got {type(source).__name__}"
                + (" (use HybridKVCacheManager.batch_table)"
                   if type(source).__name__ == "HybridKVCacheManager" else ""))
        rows = _size(max_rows, "max_rows")
        blocks = _size(max_blocks_per_seq, "max_blocks_per_seq")
        per_block = 1
        if kernel_block_size is not None:
            per_block = kernel_blocks_per_block(kernel_block_size, (<PageTable>table)._block_size)
            kernel_block_size = (<PageTable>table)._block_size // per_block
        if blocks * per_block > INT32_MAX:
            raise OverflowError(
                f"max_blocks_per_seq * (block_size // kernel_block_size) must be at most "
                f"{INT32_MAX}, got {blocks} * {per_block}")
        self._source = table
        self._entry = block_geometry((<PageTable>table)._block_size // per_block)
        self._max_rows = rows
        self._max_blocks = blocks
        self._per_block = per_block
        self._width = blocks * per_block
        self.kernel_block_size = kernel_block_size
        self._table_arr = np.full((rows, self._width), PAD, dtype=np.int32)
        self._num_arr = np.zeros(rows, dtype=np.int32)
        self._seq_arr = np.full(rows, -1, dtype=np.int64)
        self._hint_arr = np.full(rows, -1, dtype=np.int32)
        self._ver_arr = np.full(rows, NEVER, dtype=np.int64)
        self._rew_arr = np.full(rows, NEVER, dtype=np.int64)
        self._first_arr = np.full(rows, INT32_MAX, dtype=np.int32)
        self._end_arr = np.zeros(rows, dtype=np.int32)
        self._table = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>self._table_arr)
        self._num = i32(self._num_arr)
        self._seq = i64(self._seq_arr)
        self._hint = i32(self._hint_arr)
        self._ver = i64(self._ver_arr)
        self._rew = i64(self._rew_arr)
        self._first = i32(self._first_arr)
        self._end = i32(self._end_arr)
        self._moved_arr = np.zeros(rows, dtype=np.int32)
        self._moved = i32(self._moved_arr)
        self._table_view = _readonly(self._table_arr)
        self._num_view = _readonly(self._num_arr)
        self._seq_view = _readonly(self._seq_arr)
        self._row_of = {}
        self._num_rows = 0
        self._seen_stamp = NEVER
        self._stale = False

    # -- what users read -----------------------------------------------------------
    @property
    def block_table(self):
        """int32 [max_rows, width], read-only: each row's blocks, PAD_SLOT_ID after them."""
        return self._table_view

    @property
    def num_blocks(self):
        """int32 [max_rows], read-only: entries of each row (0 for a free row)."""
        return self._num_view

    @property
    def seq_ids(self):
        """int64 [max_rows], read-only: the sequence in each row, -1 for a free row."""
        return self._seq_view

    @property
    def max_rows(self):
        return self._max_rows

    @property
    def max_blocks_per_seq(self):
        return self._max_blocks

    @property
    def width(self):
        """Columns of ``block_table``: ``max_blocks_per_seq * block_size // kernel_block_size``."""
        return self._width

    @property
    def num_rows(self):
        """Rows holding a sequence."""
        return self._num_rows

    def __len__(self):
        return self._num_rows

    def __contains__(self, seq_id):
        try:
            return operator.index(seq_id) in self._row_of
        except TypeError:
            return False

    def __repr__(self):
        return (f"BatchTable(num_rows={self._num_rows}, max_rows={self._max_rows}, "
                f"max_blocks_per_seq={self._max_blocks}"
                + (f", kernel_block_size={self.kernel_block_size}" if self._per_block > 1 else "")
                + ")")

    def __reduce__(self):
        raise TypeError("a BatchTable mirrors one live table and cannot be pickled or copied")

    # -- argument checks -----------------------------------------------------------
    cdef object _ids(self, seq_ids, str name):
        ids = int_vector(seq_ids, name, cnp.NPY_INT64)
        cdef const int64_t* data = i64(ids)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>ids, 0)
        for i in range(n):
            if data[i] < 0:
                raise ValueError(f"{name}[{i}] = {data[i]} is negative; sequence ids are 0..2**63-1")
        return ids

    cdef object _rows_arg(self, rows, str name):
        array = int_vector(rows, name, cnp.NPY_INT64)
        cdef const int64_t* data = i64(array)
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>array, 0)
        for i in range(n):
            if not 0 <= data[i] < self._max_rows:
                raise IndexError(f"{name}[{i}] = {data[i]} is not a row (0 .. {self._max_rows - 1})")
        return array

    cdef object _rows_of_ids(self, ids, str name):
        """Each id's row (KeyError for one not held), as int32; ids distinct."""
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>ids, 0)
        cdef const int64_t* data = i64(ids)
        rows = empty(n, cnp.NPY_INT32)
        cdef int32_t* out = i32(rows)
        row_of = self._row_of
        for i in range(n):
            row = row_of.get(data[i])
            if row is None:
                raise KeyError(f"{name}[{i}] = {data[i]} has no row in this BatchTable")
            out[i] = row
        return rows

    # -- row changes ---------------------------------------------------------------
    cdef inline void _mark(self, int64_t row, int64_t first, int64_t end) noexcept:
        if end <= first:
            return
        if first < self._first[row]:
            self._first[row] = <int32_t>first
        if end > self._end[row]:
            self._end[row] = <int32_t>end

    cdef void _clear_row(self, int64_t row) noexcept:
        cdef int64_t j, n = self._num[row]
        cdef int32_t* entries = self._table + row * self._width
        for j in range(n):
            entries[j] = PAD
        self._mark(row, 0, n)
        self._num[row] = 0
        self._seq[row] = -1
        self._hint[row] = -1
        self._ver[row] = NEVER
        self._rew[row] = NEVER

    def add(self, seq_ids, rows=None):
        """Give each sequence a free row; return the rows (int32).

        Parameters
        ----------
        seq_ids : array_like of int, shape (n,)
            Distinct non-negative ids not already in the batch table.  A sequence
            not yet in the page table holds 0 blocks until it is.
        rows : array_like of int, shape (n,), optional
            The free rows to use; by default the lowest free rows, in order.

        Raises
        ------
        ValueError
            A duplicate, negative or already-held id, a row not free or given twice,
            or more sequences than free rows.
        IndexError
            A row outside ``0 .. max_rows - 1``.
        """
        ids = self._ids(seq_ids, "seq_ids")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>ids, 0)
        cdef const int64_t* data = i64(ids)
        cdef int64_t row, at = 0
        seen = set()
        for i in range(n):
            if data[i] in self._row_of:
                raise ValueError(f"seq_ids[{i}] = {data[i]} already has a row")
            if data[i] in seen:
                raise ValueError(f"seq_ids[{i}] = {data[i]} appears more than once")
            seen.add(data[i])
        result = empty(n, cnp.NPY_INT32)
        cdef int32_t* out = i32(result)
        if rows is None:
            if n > self._max_rows - self._num_rows:
                raise ValueError(
                    f"seq_ids: {n} sequences need rows but only "
                    f"{self._max_rows - self._num_rows} of max_rows={self._max_rows} are free")
            for i in range(n):
                while self._seq[at] >= 0:
                    at += 1
                out[i] = <int32_t>at
                at += 1
        else:
            given = self._rows_arg(rows, "rows")
            if cnp.PyArray_DIM(<cnp.ndarray>given, 0) != n:
                raise ValueError(f"rows has {given.shape[0]} entries for {n} seq_ids")
            taken = set()
            for i in range(n):
                row = i64(given)[i]
                if self._seq[row] >= 0:
                    raise ValueError(f"rows[{i}] = {row} holds sequence {self._seq[row]}")
                if row in taken:
                    raise ValueError(f"rows[{i}] = {row} appears more than once")
                taken.add(row)
                out[i] = <int32_t>row
        row_of = self._row_of
        for i in range(n):
            row = out[i]
            row_of[data[i]] = row
            self._seq[row] = data[i]
            self._hint[row] = -1
            self._ver[row] = NEVER
            self._rew[row] = NEVER
        self._num_rows += n
        if n:
            self._stale = True
        return result

    def remove(self, seq_ids):
        """Free the rows of these sequences (entries PAD, length 0); return the rows.

        Raises
        ------
        KeyError
            An id without a row.
        ValueError
            An id given twice.
        """
        ids = self._ids(seq_ids, "seq_ids")
        rows = self._rows_of_ids(ids, "seq_ids")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>ids, 0)
        if len(set(ids.tolist())) != n:
            raise ValueError("seq_ids: a sequence is listed more than once")
        row_of = self._row_of
        for i in range(n):
            del row_of[i64(ids)[i]]
            self._clear_row(i32(rows)[i])
        self._num_rows -= n
        return rows

    cdef object _pairs(self, a, b, str name_a, str name_b):
        rows_a = self._rows_arg(a, name_a)
        rows_b = self._rows_arg(b, name_b)
        if cnp.PyArray_DIM(<cnp.ndarray>rows_a, 0) != cnp.PyArray_DIM(<cnp.ndarray>rows_b, 0):
            raise ValueError(
                f"{name_a} and {name_b} must have the same length, "
                f"got {rows_a.shape[0]} and {rows_b.shape[0]}")
        return rows_a, rows_b

    cdef void _move_row(self, int64_t src, int64_t dst) noexcept:
        """Move occupied row ``src`` into free row ``dst`` (PAD throughout)."""
        cdef int64_t n = self._num[src]
        memcpy(self._table + dst * self._width, self._table + src * self._width,
               <size_t>n * sizeof(int32_t))
        self._mark(dst, 0, n)
        self._num[dst] = <int32_t>n
        self._seq[dst] = self._seq[src]
        self._hint[dst] = self._hint[src]
        self._ver[dst] = self._ver[src]
        self._rew[dst] = self._rew[src]
        self._row_of[self._seq[dst]] = dst
        self._clear_row(src)

    def move(self, src_rows, dst_rows):
        """Move each occupied ``src`` row into the free ``dst`` row, pair by pair in order.

        A moved row keeps its contents: it is as current as it was.

        Raises
        ------
        IndexError
            A row outside ``0 .. max_rows - 1``.
        ValueError
            A ``src`` row that is free, or a ``dst`` row that is occupied, at its turn.
        """
        src, dst = self._pairs(src_rows, dst_rows, "src_rows", "dst_rows")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>src, 0)
        cdef const int64_t* s = i64(src)
        cdef const int64_t* d = i64(dst)
        occupied = {}
        for i in range(n):
            if not occupied.get(s[i], self._seq[s[i]] >= 0):
                raise ValueError(f"src_rows[{i}] = {s[i]} is free")
            if occupied.get(d[i], self._seq[d[i]] >= 0):
                raise ValueError(f"dst_rows[{i}] = {d[i]} is occupied")
            occupied[s[i]] = False
            occupied[d[i]] = True
        for i in range(n):
            self._move_row(s[i], d[i])

    def swap(self, rows_a, rows_b):
        """Exchange rows pairwise, with their contents (either row may be free).

        Raises
        ------
        IndexError
            A row outside ``0 .. max_rows - 1``.
        """
        a, b = self._pairs(rows_a, rows_b, "rows_a", "rows_b")
        cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>a, 0)
        for i in range(n):
            self._swap_rows(i64(a)[i], i64(b)[i])

    cdef void _swap_rows(self, int64_t a, int64_t b) noexcept:
        if a == b:
            return
        cdef int64_t j, n = max(self._num[a], self._num[b])
        cdef int32_t* x = self._table + a * self._width
        cdef int32_t* y = self._table + b * self._width
        cdef int32_t t32
        cdef int64_t t64
        for j in range(n):
            t32 = x[j]; x[j] = y[j]; y[j] = t32
        self._mark(a, 0, n)
        self._mark(b, 0, n)
        t32 = self._num[a]; self._num[a] = self._num[b]; self._num[b] = t32
        t32 = self._hint[a]; self._hint[a] = self._hint[b]; self._hint[b] = t32
        t64 = self._seq[a]; self._seq[a] = self._seq[b]; self._seq[b] = t64
        t64 = self._ver[a]; self._ver[a] = self._ver[b]; self._ver[b] = t64
        t64 = self._rew[a]; self._rew[a] = self._rew[b]; self._rew[b] = t64
        if self._seq[a] >= 0:
            self._row_of[self._seq[a]] = a
        if self._seq[b] >= 0:
            self._row_of[self._seq[b]] = b

    def condense(self):
        """Move the last occupied rows into the lowest free rows until rows
        ``0 .. num_rows - 1`` are the occupied ones; return the moves ``(src, dst)``.

        Rows already below ``num_rows`` stay where they are.
        """
        cdef int64_t n = self._num_rows, low = 0, high = self._max_rows - 1, count = 0
        cdef int64_t r, holes = 0
        for r in range(n):
            if self._seq[r] < 0:
                holes += 1
        src = empty(holes, cnp.NPY_INT32)
        dst = empty(holes, cnp.NPY_INT32)
        while count < holes:
            while self._seq[low] >= 0:
                low += 1
            while self._seq[high] < 0:
                high -= 1
            i32(src)[count] = <int32_t>high
            i32(dst)[count] = <int32_t>low
            self._move_row(high, low)
            count += 1
        return src, dst

    def rows(self, seq_ids):
        """Each sequence's row (int32): the step's row-index mapping.

        Raises
        ------
        KeyError
            An id without a row.
        """
        return self._rows_of_ids(self._ids(seq_ids, "seq_ids"), "seq_ids")

    def invalidate(self, seq_ids):
        """Copy these rows whole at the next :meth:`update`.

        Never needed for changes made through the page table; for a row an engine
        suspects it wrote into.
        """
        rows = self._rows_of_ids(self._ids(seq_ids, "seq_ids"), "seq_ids")
        cdef Py_ssize_t i
        for i in range(cnp.PyArray_DIM(<cnp.ndarray>rows, 0)):
            self._ver[i32(rows)[i]] = NEVER
            self._rew[i32(rows)[i]] = NEVER
        if cnp.PyArray_DIM(<cnp.ndarray>rows, 0):
            self._stale = True

    # -- bringing rows up to date --------------------------------------------------
    cdef int64_t _check(self) except -1:
        """Raise for a row the update could not hold; list the rows whose stamps moved."""
        cdef PageTable table = self._source
        cdef int64_t r, j, length, moved = 0
        cdef row_t source
        cdef const block_id_t* blocks
        cdef const int64_t* seq = self._seq
        cdef const int64_t* ver = self._ver
        cdef int32_t* hint = self._hint
        cdef const int64_t* table_seq = table._rows.seq
        cdef const int64_t* table_version = table._rows.version
        cdef int32_t used = table._rows_used
        for r in range(self._max_rows):
            if seq[r] < 0:
                continue
            source = hint[r]
            if not (0 <= source < used and table_seq[source] == seq[r]):
                source = table.find_row(seq[r])
                hint[r] = source
            if source < 0:
                if ver[r] != -1:
                    self._moved[moved] = <int32_t>r
                    moved += 1
                continue
            if table_version[source] == ver[r]:
                continue
            self._moved[moved] = <int32_t>r
            moved += 1
            length = table._rows.length[source]
            if length > self._max_blocks:
                raise ValueError(
                    f"sequence {self._seq[r]} has {length} blocks (row {r}), more than "
                    f"max_blocks_per_seq={self._max_blocks}; nothing was updated")
            if self._per_block > 1:
                blocks = table.row_blocks(source)
                for j in range(length):
                    if <int64_t>blocks[j] * self._per_block + self._per_block - 1 > INT32_MAX:
                        raise OverflowError(
                            f"sequence {self._seq[r]} (row {r}) holds block {blocks[j]}, whose "
                            f"kernel block ids do not fit in int32; nothing was updated")
        self._num_moved = moved
        return moved

    cdef int64_t _apply(self) noexcept:
        """Copy every moved row; return how many rows' contents or length changed."""
        cdef PageTable table = self._source
        cdef int64_t i, r, j, k = self._per_block, old, new, first, end, changed = 0
        cdef int64_t version, rewrite
        cdef row_t source
        cdef const block_id_t* blocks
        cdef int32_t* entries
        cdef int32_t value
        cdef bint whole
        for i in range(self._num_moved):
            r = self._moved[i]
            source = self._hint[r]      # resolved by _check just before
            if source < 0:
                version = rewrite = -1
                new = 0
                blocks = NULL
            else:
                version = table._rows.version[source]
                if version == self._ver[r]:
                    continue
                rewrite = table._rows.rewrite[source]
                new = table._rows.length[source] * k
                blocks = table.row_blocks(source)
            if version == self._ver[r]:
                continue
            old = self._num[r]
            entries = self._table + r * self._width
            whole = rewrite != self._rew[r] or new < old
            first = INT32_MAX
            end = 0
            # An unchanged rewrite stamp: entries before the old last block are current;
            # the last one may have been replaced (copy-on-write), so it is compared.
            j = 0 if whole else max(old - k, 0)
            if k == 1:
                while j < new:
                    if entries[j] != blocks[j]:
                        entries[j] = blocks[j]
                        if j < first:
                            first = j
                        end = j + 1
                    j += 1
            else:
                while j < new:
                    value = blocks[j // k]
                    if value != PAD:
                        value = <int32_t>(<int64_t>value * k + j % k)
                    if entries[j] != value:
                        entries[j] = value
                        if j < first:
                            first = j
                        end = j + 1
                    j += 1
            for j in range(new, old):
                if entries[j] != PAD:
                    entries[j] = PAD
                    if j < first:
                        first = j
                    end = j + 1
            if new != old:
                first = min(first, min(old, new))
                end = max(end, max(old, new))
            if end > first:
                changed += 1
                self._mark(r, first, end)
            self._num[r] = <int32_t>new
            self._ver[r] = version
            self._rew[r] = rewrite
        return changed

    def update(self):
        """Bring every row up to date with the page table; return the rows that changed.

        Only rows whose change stamp moved are looked at: of those, a row whose
        rewrite stamp is unchanged gets its appended blocks and its last block
        compared (copy-on-write replaces the last block); the others are compared
        whole.  A sequence not in the page table holds 0 blocks.

        Raises
        ------
        ValueError
            A sequence has more than ``max_blocks_per_seq`` blocks; nothing changes.
        OverflowError
            A kernel block id would not fit in int32; nothing changes.
        RuntimeError
            The page table kept changing in another thread while it was read.
        """
        cdef PageTable table = self._source
        cdef int64_t stamp, changed = 0
        cdef int attempt
        if not self._stale and table._next_version == self._seen_stamp and not table._writing:
            return 0
        for attempt in range(READ_ATTEMPTS):
            stamp = table._read_begin()
            try:
                # Nothing from here to _read_end lets another thread run, so what is
                # read is one state of the table; _read_end confirms it.
                if self._check():
                    changed = self._apply()
            finally:
                consistent = table._read_end(stamp)
            if consistent:
                self._seen_stamp = stamp
                self._stale = False
                return changed
        raise RuntimeError(_KEPT_CHANGING)

    def slot_mapping(self, rows, positions, out=None):
        """Each token's cache slot from its row and position, over the table as it is.

        What a step computes from its persistent table (``rows`` is each token's row,
        as :meth:`rows` gives them): ``slot = entry * e + position % e`` with ``entry =
        block_table[row, position // e]`` and ``e`` tokens per entry (the kernel block
        size, or the block size), equal to the page table's ``block * block_size +
        offset``.  Reads only this table: call :meth:`update` first.

        Parameters
        ----------
        rows : array_like of int, shape (n,)
            Rows, ``0 .. max_rows - 1`` (int32 or int64 arrays are read as they are).
        positions : array_like of int, shape (n,)
        out : numpy.ndarray of int64, shape (n,), optional
            Preallocated output (native int64, C-contiguous, writeable); it may
            overlap the inputs.

        Returns
        -------
        numpy.ndarray of int64, shape (n,)
            ``PAD_SLOT_ID`` for a position that is negative or past the row's entries,
            in a free row, or in a released (PAD) entry.

        Raises
        ------
        IndexError
            A row outside ``0 .. max_rows - 1`` (``out`` may then be partly written).
        """
        cdef bint narrow = is_kernel_vector(rows, cnp.NPY_INT32)
        row_array = rows if narrow else int_vector(rows, "rows", cnp.NPY_INT64)
        pos_array = int_vector(positions, "positions", cnp.NPY_INT64)
        cdef Py_ssize_t n = cnp.PyArray_DIM(<cnp.ndarray>row_array, 0)
        if cnp.PyArray_DIM(<cnp.ndarray>pos_array, 0) != n:
            raise ValueError(f"rows and positions must have the same length, "
                             f"got {n} and {pos_array.shape[0]}")
        out_array = None
        if out is None:
            result = empty(n, cnp.NPY_INT64)
        else:
            out_array = output_vector(out, n, cnp.NPY_INT64)
            if shares_memory(out_array, row_array) or shares_memory(out_array, pos_array):
                result = empty(n, cnp.NPY_INT64)
            else:
                result = out_array
        cdef int64_t bad
        if narrow:
            bad = self._slots_i32(<const int32_t*>cnp.PyArray_DATA(<cnp.ndarray>row_array),
                                  i64(pos_array), i64(result), n)
        else:
            bad = self._slots_i64(i64(row_array), i64(pos_array), i64(result), n)
        if bad >= 0:
            raise IndexError(f"rows[{bad}] = {row_array[bad]} is not a row (0 .. {self._max_rows - 1})")
        if out is None:
            return result
        if result is not out_array:
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>out_array), cnp.PyArray_DATA(<cnp.ndarray>result),
                   <size_t>n * sizeof(int64_t))
        return out

    cdef inline int64_t _slot_of(self, int64_t row, int64_t position) noexcept nogil:
        cdef int64_t j
        cdef int32_t entry
        if position < 0:
            return PAD
        j = block_index(&self._entry, position)
        if j >= self._num[row]:
            return PAD
        entry = self._table[row * self._width + j]
        if entry == PAD:
            return PAD
        return <int64_t>entry * self._entry.size + block_offset(&self._entry, position)

    cdef int64_t _slots_i32(self, const int32_t* rows, const int64_t* positions, int64_t* out,
                            Py_ssize_t n) noexcept:
        cdef Py_ssize_t i
        for i in range(n):
            if <uint32_t>rows[i] >= <uint64_t>self._max_rows:
                return i
            out[i] = self._slot_of(rows[i], positions[i])
        return -1

    cdef int64_t _slots_i64(self, const int64_t* rows, const int64_t* positions, int64_t* out,
                            Py_ssize_t n) noexcept:
        cdef Py_ssize_t i
        for i in range(n):
            if <uint64_t>rows[i] >= <uint64_t>self._max_rows:
                return i
            out[i] = self._slot_of(rows[i], positions[i])
        return -1

    def _check_update(self):
        """Raise what :meth:`update` would raise now; change nothing visible."""
        cdef PageTable table = self._source
        cdef int64_t stamp = table._read_begin()
        try:
            self._check()
        finally:
            table._read_end(stamp)

    def changes(self, clear=True):
        """Rows whose entries changed since the changes were last cleared.

        Returns
        -------
        rows, first, end : numpy.ndarray of int32
            Sorted rows, and for each the column range ``[first, end)`` covering its
            changed entries (a change of length is a change of the entries between
            the two lengths).  What a device mirror must upload.
        """
        if not isinstance(clear, (bool, np.bool_)):
            raise TypeError(f"clear must be a bool, got {type(clear).__name__}")
        cdef int64_t r, count = 0
        for r in range(self._max_rows):
            if self._end[r] > self._first[r]:
                count += 1
        rows = empty(count, cnp.NPY_INT32)
        first = empty(count, cnp.NPY_INT32)
        end = empty(count, cnp.NPY_INT32)
        count = 0
        for r in range(self._max_rows):
            if self._end[r] > self._first[r]:
                i32(rows)[count] = <int32_t>r
                i32(first)[count] = self._first[r]
                i32(end)[count] = self._end[r]
                count += 1
                if clear:
                    self._first[r] = INT32_MAX
                    self._end[r] = 0
        return rows, first, end
