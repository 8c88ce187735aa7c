"""A slow, obviously-correct model of :class:`pagetable.BatchTable`.

The contract is ``docs/BATCH_TABLE.md``.  The model keeps no change stamps and no
row hints: ``update()`` rebuilds every occupied row from the page table's
``get_sequence_blocks`` and compares it with what the row held, and ``changes()``
compares the whole table with a copy taken at the last clear.  So its ranges are
the smallest that cover the changed entries (the compiled class may report wider
ones, or rows that changed and changed back).  Arguments are validated as the
compiled class validates them: same exception types, same argument names.
"""

from __future__ import annotations

import numpy as np

from pagetable._convert import (
    INT32_MAX,
    INT64_MAX,
    as_index,
    as_int_array,
    check_range,
    kernel_blocks_per_block,
)
from pagetable._manager import KVCacheManager
from pagetable._table import PAD_SLOT_ID, PageTable


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class ReferenceBatchTable:
    """Rows of a dense block table assigned to sequences, kept in numpy arrays."""

    def __init__(self, source: object, max_rows: int, max_blocks_per_seq: int, *,
                 kernel_block_size: int | None = None) -> None:
        # A KVCacheManager is mirrored through its page table.
        if isinstance(source, KVCacheManager):
            table = source.page_table
        elif isinstance(source, PageTable):
            table = source
        else:
            raise TypeError(f"source must be a PageTable or a KVCacheManager, got {type(source).__name__}")
        max_rows = check_range(as_index(max_rows, "max_rows"), 1, INT32_MAX, "max_rows")
        max_blocks_per_seq = check_range(
            as_index(max_blocks_per_seq, "max_blocks_per_seq"), 1, INT32_MAX, "max_blocks_per_seq")
        if kernel_block_size is None:
            per_block = 1
        else:
            per_block = kernel_blocks_per_block(kernel_block_size, int(table.block_size))
            kernel_block_size = int(kernel_block_size)
        width = max_blocks_per_seq * per_block
        check_range(width, 1, INT32_MAX, "width (max_blocks_per_seq * block_size // kernel_block_size)")
        self._table = table
        self._max_rows = max_rows
        self._max_blocks_per_seq = max_blocks_per_seq
        self._kernel_block_size = kernel_block_size
        self._per_block = per_block
        self._width = width
        self._block_table = np.full((max_rows, width), PAD_SLOT_ID, dtype=np.int32)
        self._num_blocks = np.zeros(max_rows, dtype=np.int32)
        self._seq_ids = np.full(max_rows, -1, dtype=np.int64)
        self._row_of: dict[int, int] = {}
        # What the table held at the last clear of changes().
        self._cleared_table = self._block_table.copy()
        self._cleared_num_blocks = self._num_blocks.copy()

    # ------------------------------------------------------------ properties
    @property
    def block_table(self) -> np.ndarray:
        return _read_only(self._block_table)

    @property
    def num_blocks(self) -> np.ndarray:
        return _read_only(self._num_blocks)

    @property
    def seq_ids(self) -> np.ndarray:
        return _read_only(self._seq_ids)

    @property
    def num_rows(self) -> int:
        return len(self._row_of)

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, seq_id: object) -> bool:
        try:
            return as_index(seq_id, "seq_id") in self._row_of
        except TypeError:
            return False

    @property
    def max_rows(self) -> int:
        return self._max_rows

    @property
    def max_blocks_per_seq(self) -> int:
        return self._max_blocks_per_seq

    @property
    def width(self) -> int:
        return self._width

    @property
    def kernel_block_size(self) -> int | None:
        return self._kernel_block_size

    # ------------------------------------------------------------ validation
    def _sequence_ids(self, seq_ids: object, name: str, distinct: bool) -> list[int]:
        ids = [int(s) for s in as_int_array(seq_ids, name)]
        seen: set[int] = set()
        for i, s in enumerate(ids):
            if s < 0:
                raise ValueError(f"{name}[{i}] = {s} is negative; sequence ids are 0..{INT64_MAX}")
            if distinct and s in seen:
                raise ValueError(f"{name}[{i}] = {s} appears more than once")
            seen.add(s)
        return ids

    def _known_ids(self, seq_ids: object, name: str, distinct: bool) -> list[int]:
        ids = self._sequence_ids(seq_ids, name, distinct=False)
        for i, s in enumerate(ids):
            if s not in self._row_of:
                raise KeyError(f"{name}[{i}] = {s} is not in the batch table")
        if distinct:
            self._sequence_ids(seq_ids, name, distinct=True)
        return ids

    def _row_indices(self, rows: object, name: str) -> list[int]:
        indices = [int(r) for r in as_int_array(rows, name)]
        for i, r in enumerate(indices):
            if not 0 <= r < self._max_rows:
                raise IndexError(f"{name}[{i}] = {r} is out of range 0..{self._max_rows - 1}")
        return indices

    def _row_pairs(self, first: object, second: object, names: tuple[str, str]) -> tuple[list[int], list[int]]:
        a = self._row_indices(first, names[0])
        b = self._row_indices(second, names[1])
        if len(a) != len(b):
            raise ValueError(f"{names[0]} has {len(a)} rows but {names[1]} has {len(b)}")
        return a, b

    # ------------------------------------------------------------ row operations
    def _free_row(self, row: int) -> None:
        self._block_table[row, :] = PAD_SLOT_ID
        self._num_blocks[row] = 0
        self._seq_ids[row] = -1

    def _move_row(self, src: int, dst: int) -> None:
        self._block_table[dst, :] = self._block_table[src, :]
        self._num_blocks[dst] = self._num_blocks[src]
        self._seq_ids[dst] = self._seq_ids[src]
        self._row_of[int(self._seq_ids[dst])] = dst
        self._free_row(src)

    def add(self, seq_ids: object, rows: object = None) -> np.ndarray:
        ids = self._sequence_ids(seq_ids, "seq_ids", distinct=True)
        for i, s in enumerate(ids):
            if s in self._row_of:
                raise ValueError(f"seq_ids[{i}] = {s} is already in the batch table (row {self._row_of[s]})")
        if rows is None:
            free = [r for r in range(self._max_rows) if self._seq_ids[r] < 0]
            if len(ids) > len(free):
                raise ValueError(f"seq_ids has {len(ids)} sequences but only {len(free)} rows are free")
            chosen = free[: len(ids)]
        else:
            chosen = self._row_indices(rows, "rows")
            if len(chosen) != len(ids):
                raise ValueError(f"rows has {len(chosen)} rows for {len(ids)} seq_ids")
            seen: set[int] = set()
            for i, r in enumerate(chosen):
                if r in seen:
                    raise ValueError(f"rows[{i}] = {r} appears more than once")
                seen.add(r)
                if self._seq_ids[r] >= 0:
                    raise ValueError(f"rows[{i}] = {r} is occupied (sequence {int(self._seq_ids[r])})")
        # A new row holds nothing until update() copies the sequence's blocks.
        for s, r in zip(ids, chosen):
            self._seq_ids[r] = s
            self._num_blocks[r] = 0
            self._block_table[r, :] = PAD_SLOT_ID
            self._row_of[s] = r
        return np.array(chosen, dtype=np.int32)

    def remove(self, seq_ids: object) -> np.ndarray:
        ids = self._known_ids(seq_ids, "seq_ids", distinct=True)
        freed = [self._row_of.pop(s) for s in ids]
        for r in freed:
            self._free_row(r)
        return np.array(freed, dtype=np.int32)

    def move(self, src_rows: object, dst_rows: object) -> None:
        src, dst = self._row_pairs(src_rows, dst_rows, ("src_rows", "dst_rows"))
        # Pairwise, in order: check the whole sequence of moves on a copy of the
        # occupancy before any row changes.
        occupied = [bool(s >= 0) for s in self._seq_ids]
        for i, (a, b) in enumerate(zip(src, dst)):
            if not occupied[a]:
                raise ValueError(f"src_rows[{i}] = {a} is a free row")
            if occupied[b]:
                raise ValueError(f"dst_rows[{i}] = {b} is occupied")
            occupied[a], occupied[b] = False, True
        for a, b in zip(src, dst):
            self._move_row(a, b)

    def swap(self, rows_a: object, rows_b: object) -> None:
        first, second = self._row_pairs(rows_a, rows_b, ("rows_a", "rows_b"))
        for a, b in zip(first, second):
            self._block_table[[a, b], :] = self._block_table[[b, a], :]
            self._num_blocks[[a, b]] = self._num_blocks[[b, a]]
            self._seq_ids[[a, b]] = self._seq_ids[[b, a]]
            for r in (a, b):
                if self._seq_ids[r] >= 0:
                    self._row_of[int(self._seq_ids[r])] = r

    def condense(self) -> tuple[np.ndarray, np.ndarray]:
        src: list[int] = []
        dst: list[int] = []
        n = len(self._row_of)
        free = [r for r in range(n) if self._seq_ids[r] < 0]
        last = self._max_rows - 1
        for hole in free:
            while self._seq_ids[last] < 0:
                last -= 1
            self._move_row(last, hole)
            src.append(last)
            dst.append(hole)
        return np.array(src, dtype=np.int32), np.array(dst, dtype=np.int32)

    def rows(self, seq_ids: object) -> np.ndarray:
        ids = self._known_ids(seq_ids, "seq_ids", distinct=False)
        return np.array([self._row_of[s] for s in ids], dtype=np.int32)

    def invalidate(self, seq_ids: object) -> None:
        # update() rebuilds every row, so there is nothing to mark.
        self._known_ids(seq_ids, "seq_ids", distinct=False)

    # ------------------------------------------------------------ contents
    def _expected_row(self, row: int) -> list[int]:
        seq = int(self._seq_ids[row])
        found = self._table.get_sequence_blocks(seq)
        blocks = [] if found is None else [int(b) for b in found]
        if len(blocks) > self._max_blocks_per_seq:
            raise ValueError(
                f"sequence {seq} (row {row}) has {len(blocks)} blocks, more than "
                f"max_blocks_per_seq ({self._max_blocks_per_seq})")
        k = self._per_block
        entries: list[int] = []
        for block in blocks:
            if block == PAD_SLOT_ID:
                entries.extend([PAD_SLOT_ID] * k)
                continue
            if block * k + k - 1 > INT32_MAX:
                raise OverflowError(
                    f"sequence {seq} (row {row}): block {block} is kernel blocks "
                    f"{block * k}..{block * k + k - 1}, past int32")
            entries.extend(range(block * k, block * k + k))
        return entries

    def update(self) -> int:
        occupied = [r for r in range(self._max_rows) if self._seq_ids[r] >= 0]
        new_rows = {r: self._expected_row(r) for r in occupied}   # raises before any write
        changed = 0
        for r, entries in new_rows.items():
            row = np.full(self._width, PAD_SLOT_ID, dtype=np.int32)
            row[: len(entries)] = entries
            if len(entries) != self._num_blocks[r] or not np.array_equal(row, self._block_table[r]):
                changed += 1
            self._block_table[r, :] = row
            self._num_blocks[r] = len(entries)
        return changed

    def changes(self, clear: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(clear, (bool, np.bool_)):
            raise TypeError(f"clear must be a bool, got {type(clear).__name__}")
        rows: list[int] = []
        first: list[int] = []
        end: list[int] = []
        for r in range(self._max_rows):
            columns = set(np.flatnonzero(self._block_table[r] != self._cleared_table[r]).tolist())
            old, new = int(self._cleared_num_blocks[r]), int(self._num_blocks[r])
            # A length change is a change of the row even where the entries around
            # the old and new ends are PAD in both (a windowed row of PAD heads).
            columns.update(range(min(old, new), max(old, new)))
            if columns:
                rows.append(r)
                first.append(min(columns))
                end.append(max(columns) + 1)
        if clear:
            self._cleared_table = self._block_table.copy()
            self._cleared_num_blocks = self._num_blocks.copy()
        return (np.array(rows, dtype=np.int32), np.array(first, dtype=np.int32),
                np.array(end, dtype=np.int32))
