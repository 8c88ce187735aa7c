"""Upload planning: what one ``DeviceBlockTable.sync`` must send, worked out in numpy.

:class:`_HostMirror` records what the device table holds and which rows hold which
sequence, and plans each sync as packed updates or a whole table (:class:`_UploadPlan`).
It needs no CuPy, so the CPU tests drive it directly and apply its updates with the
emulated scatter kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from ._signatures import PAD_SLOT_ID


@dataclasses.dataclass
class SyncStats:
    """What one :meth:`DeviceBlockTable.sync` did.

    Attributes
    ----------
    mode : {"none", "incremental", "full"}
        Nothing changed, packed updates were scattered, or the whole table was re-uploaded.
    bytes_uploaded : int
        Bytes copied from host to device.
    table_bytes : int
        Bytes of the whole device table plus row lengths (what a full upload moves).
    cell_updates : int
        Table entries written by the scatter kernel.
    length_updates : int
        Row lengths written by the scatter kernel.
    rows_changed : int
        Rows whose contents or length changed.
    """

    mode: Literal["none", "incremental", "full"]
    bytes_uploaded: int
    table_bytes: int
    cell_updates: int = 0
    length_updates: int = 0
    rows_changed: int = 0


@dataclasses.dataclass
class _UploadPlan:
    """The host side of one sync: either packed updates or a whole table."""

    stats: SyncStats
    # Incremental: num_cell_updates (row, column, block_id) triples, then
    # num_length_updates (row, new_length) pairs, the layout pagetable_apply_updates reads.
    packed_updates: np.ndarray | None = None
    num_cell_updates: int = 0
    num_length_updates: int = 0
    # Full: the table and lengths the device should hold.
    full_table: np.ndarray | None = None
    full_lengths: np.ndarray | None = None


class _HostMirror:
    """What the device table holds after the last sync, and which rows hold which sequence.

    Kept apart from the CuPy code so the planner runs, and is tested, without a GPU.
    """

    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.max_rows = max_rows
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.row_sequence = np.full(max_rows, -1, dtype=np.int64)
        self.row_of_sequence: dict[int, int] = {}
        # Lowest free row first, so a small batch stays in the table's first rows.
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.device_lengths = np.zeros(max_rows, dtype=np.int32)
        self.device_last_block = np.full(max_rows, PAD_SLOT_ID, dtype=np.int32)
        self.needs_rewrite = np.zeros(max_rows, dtype=bool)
        self.needs_clear = np.zeros(max_rows, dtype=bool)
        # The page table's change stamps (PageTable.versions) as of the last upload:
        # a row whose stamp is unchanged needs nothing, whatever else happened.
        self.device_version = np.full(max_rows, -2, dtype=np.int64)
        self.device_rewrite = np.full(max_rows, -2, dtype=np.int64)

    @property
    def table_bytes(self) -> int:
        return self.max_rows * (self.max_blocks_per_seq + 1) * 4

    def _sequence_ids(self, seq_ids: Any, argument: str) -> list[int]:
        array = np.asarray(seq_ids)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1:
            raise ValueError(f"{argument} must be 1-D, got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise TypeError(f"{argument} must hold integers, got dtype {array.dtype}")
        return [int(value) for value in array]

    def assign(self, seq_ids: Any) -> np.ndarray:
        ids = self._sequence_ids(seq_ids, "seq_ids")
        seen = set()
        for seq_id in ids:
            if seq_id < 0:
                raise ValueError(f"seq_ids: sequence id {seq_id} is negative")
            if seq_id in self.row_of_sequence or seq_id in seen:
                raise ValueError(f"seq_ids: sequence {seq_id} already has a device row")
            seen.add(seq_id)
        if len(ids) > len(self.free_rows):
            raise ValueError(
                f"seq_ids: {len(ids)} sequences need rows but only {len(self.free_rows)} "
                f"of max_rows={self.max_rows} are free"
            )
        rows = np.empty(len(ids), dtype=np.int32)
        for index, seq_id in enumerate(ids):
            row = self.free_rows.pop()
            self.row_of_sequence[seq_id] = row
            self.row_sequence[row] = seq_id
            self.needs_rewrite[row] = True
            self.needs_clear[row] = False
            rows[index] = row
        return rows

    def rows_for(self, seq_ids: Any) -> np.ndarray:
        ids = self._sequence_ids(seq_ids, "seq_ids")
        rows = np.empty(len(ids), dtype=np.int32)
        for index, seq_id in enumerate(ids):
            row = self.row_of_sequence.get(seq_id)
            if row is None:
                raise KeyError(f"seq_ids: sequence {seq_id} has no device row (assign it first)")
            rows[index] = row
        return rows

    def release(self, seq_ids: Any) -> np.ndarray:
        rows = self.rows_for(seq_ids)
        if len(set(rows.tolist())) != len(rows):
            raise ValueError("seq_ids: a sequence is listed twice")
        for row in rows.tolist():
            del self.row_of_sequence[int(self.row_sequence[row])]
            self.row_sequence[row] = -1
            self.needs_rewrite[row] = False
            self.needs_clear[row] = self.device_lengths[row] > 0
            self.free_rows.append(row)
        return rows

    def invalidate(self, seq_ids: Any) -> None:
        self.needs_rewrite[self.rows_for(seq_ids)] = True

    def _current_lengths(self, page_table: Any, seq_ids: np.ndarray) -> np.ndarray:
        """Blocks per sequence now; 0 for one the page table does not (yet) hold."""
        try:
            return np.asarray(page_table.num_blocks(seq_ids), dtype=np.int32)
        except KeyError:
            return np.array(
                [page_table.num_blocks([s])[0] if int(s) in page_table else 0 for s in seq_ids],
                dtype=np.int32,
            )

    def _blocks_at(self, page_table: Any, seq_ids: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Block ids at the given logical block indices (all mapped, so never PAD)."""
        if seq_ids.size == 0:
            return np.empty(0, dtype=np.int32)
        positions = columns.astype(np.int64) * self.block_size
        block_ids, _ = page_table.lookup(seq_ids, positions)
        return np.asarray(block_ids, dtype=np.int32)

    def plan(self, page_table: Any, full_upload_fraction: float) -> _UploadPlan:
        """Work out what the device needs; commits nothing (see :meth:`commit`)."""
        assigned_rows = np.flatnonzero(self.row_sequence >= 0).astype(np.int32)
        seq_ids = self.row_sequence[assigned_rows]
        versions, rewrite_versions = page_table.versions(seq_ids)
        # Only rows whose stamps moved (or that were assigned or invalidated) can differ
        # from the device; the rest of the plan looks at those alone.
        moved = (versions != self.device_version[assigned_rows]) | self.needs_rewrite[assigned_rows]
        assigned_rows = assigned_rows[moved]
        seq_ids = seq_ids[moved]
        versions = versions[moved]
        rewrite_versions = rewrite_versions[moved]
        new_lengths = self._current_lengths(page_table, seq_ids)
        too_long = np.flatnonzero(new_lengths > self.max_blocks_per_seq)
        if too_long.size:
            first = too_long[0]
            raise ValueError(
                f"sequence {int(seq_ids[first])} has {int(new_lengths[first])} blocks, more "
                f"than max_blocks_per_seq={self.max_blocks_per_seq}"
            )
        old_lengths = self.device_lengths[assigned_rows]
        # A shrunk row may have changed anywhere below its new length, and a row whose
        # rewrite stamp moved had a block other than its last replaced: rewrite it whole.
        rewrite = (self.needs_rewrite[assigned_rows] | (new_lengths < old_lengths)
                   | (rewrite_versions != self.device_rewrite[assigned_rows]))

        # Copy-on-write replaces a row's last block; compare it with what the device holds.
        kept = ~rewrite & (old_lengths > 0)
        kept_blocks = self._blocks_at(page_table, seq_ids[kept], old_lengths[kept] - 1)
        last_changed = np.zeros(assigned_rows.size, dtype=bool)
        last_changed[kept] = kept_blocks != self.device_last_block[assigned_rows[kept]]

        # Cell updates: appended blocks of kept rows, every block of rewritten rows, and the
        # replaced last block of kept rows.
        first_column = np.where(rewrite, 0, old_lengths).astype(np.int64)
        first_column[last_changed] -= 1
        counts = np.maximum(new_lengths - first_column, 0)
        total_cells = int(counts.sum())
        cell_rows = np.repeat(assigned_rows, counts)
        group_starts = np.repeat(np.cumsum(counts) - counts, counts)
        cell_columns = np.arange(total_cells, dtype=np.int64) - group_starts
        cell_columns += np.repeat(first_column, counts)
        cell_values = self._blocks_at(page_table, np.repeat(seq_ids, counts), cell_columns)

        # Length updates: every row whose length changes, every rewritten row (its tail past
        # the new length is cleared), and every released row the device still holds.
        length_changed = rewrite | (new_lengths != old_lengths)
        cleared_rows = np.flatnonzero(self.needs_clear).astype(np.int32)
        length_rows = np.concatenate([assigned_rows[length_changed], cleared_rows])
        length_values = np.concatenate(
            [new_lengths[length_changed], np.zeros(cleared_rows.size, dtype=np.int32)]
        )

        rows_changed = int(np.count_nonzero(length_changed | last_changed)) + cleared_rows.size
        incremental_bytes = 4 * (3 * total_cells + 2 * length_rows.size)
        has_cells = counts > 0
        self._pending = (
            assigned_rows, new_lengths, assigned_rows[has_cells],
            cell_values[np.cumsum(counts)[has_cells] - 1], versions, rewrite_versions,
        )
        if rows_changed == 0:
            return _UploadPlan(SyncStats("none", 0, self.table_bytes))
        if incremental_bytes >= full_upload_fraction * self.table_bytes:
            return self._plan_full(page_table, rows_changed)

        packed = np.empty(3 * total_cells + 2 * length_rows.size, dtype=np.int32)
        cells = packed[: 3 * total_cells].reshape(total_cells, 3)
        cells[:, 0] = cell_rows
        cells[:, 1] = cell_columns
        cells[:, 2] = cell_values
        lengths = packed[3 * total_cells :].reshape(length_rows.size, 2)
        lengths[:, 0] = length_rows
        lengths[:, 1] = length_values
        stats = SyncStats(
            "incremental", incremental_bytes, self.table_bytes,
            total_cells, int(length_rows.size), rows_changed,
        )
        return _UploadPlan(stats, packed, total_cells, int(length_rows.size))

    def _plan_full(self, page_table, rows_changed):
        # A full upload rebuilds every assigned row, changed or not.
        assigned_rows = np.flatnonzero(self.row_sequence >= 0).astype(np.int32)
        seq_ids = self.row_sequence[assigned_rows]
        versions, rewrite_versions = page_table.versions(seq_ids)
        new_lengths = self._current_lengths(page_table, seq_ids)
        table = np.full((self.max_rows, self.max_blocks_per_seq), PAD_SLOT_ID, dtype=np.int32)
        lengths = np.zeros(self.max_rows, dtype=np.int32)
        self._pending = (assigned_rows, new_lengths, assigned_rows[:0], new_lengths[:0],
                         versions, rewrite_versions)
        if assigned_rows.size:
            counts = new_lengths.astype(np.int64)
            columns = np.arange(int(counts.sum()), dtype=np.int64)
            columns -= np.repeat(np.cumsum(counts) - counts, counts)
            values = self._blocks_at(page_table, np.repeat(seq_ids, counts), columns)
            table[np.repeat(assigned_rows, counts), columns] = values
            lengths[assigned_rows] = new_lengths
            has_blocks = counts > 0
            self._pending = (
                assigned_rows, new_lengths, assigned_rows[has_blocks],
                values[np.cumsum(counts)[has_blocks] - 1], versions, rewrite_versions,
            )
        stats = SyncStats("full", self.table_bytes, self.table_bytes, rows_changed=rows_changed)
        return _UploadPlan(stats, full_table=table, full_lengths=lengths)

    def commit(self) -> None:
        """Record that the planned upload was enqueued: the device now holds it."""
        (assigned_rows, new_lengths, rows_with_cells, last_cell_values,
         versions, rewrite_versions) = self._pending
        del self._pending
        self.device_version[assigned_rows] = versions
        self.device_rewrite[assigned_rows] = rewrite_versions
        self.device_version[self.needs_clear] = -2
        self.device_rewrite[self.needs_clear] = -2
        self.device_lengths[self.needs_clear] = 0
        self.device_last_block[self.needs_clear] = PAD_SLOT_ID
        self.device_lengths[assigned_rows] = new_lengths
        self.device_last_block[assigned_rows[new_lengths == 0]] = PAD_SLOT_ID
        # A row's cells always run up to its new last block, so the last cell is that block;
        # rows without cells kept their last block.
        self.device_last_block[rows_with_cells] = last_cell_values
        self.needs_rewrite[:] = False
        self.needs_clear[:] = False
