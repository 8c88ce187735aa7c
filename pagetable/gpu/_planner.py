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

from .._batch import BatchTable


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

    A :class:`pagetable.BatchTable` is the host copy: the planning of what changed is
    the batch table's (its change stamps and ``changes()``), shared with engines that
    keep a host table.  A plan sends the changes since the last commit; they are cleared
    only by :meth:`commit`, so an upload that failed is sent again by the next plan.
    Kept apart from the CuPy code so the planner runs, and is tested, without a GPU.
    """

    def __init__(self, page_table: Any, max_rows: int, max_blocks_per_seq: int) -> None:
        self.batch = BatchTable(page_table, max_rows, max_blocks_per_seq)
        self.max_rows = max_rows
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = int(page_table.block_size)

    @property
    def table_bytes(self) -> int:
        return self.max_rows * (self.max_blocks_per_seq + 1) * 4

    @property
    def row_sequence(self) -> np.ndarray:
        """int64 [max_rows]: the sequence each row holds, -1 for a free row."""
        return self.batch.seq_ids

    @property
    def device_lengths(self) -> np.ndarray:
        """int32 [max_rows]: each row's length as of the last plan."""
        return self.batch.num_blocks

    def assign(self, seq_ids: Any) -> np.ndarray:
        return self.batch.add(seq_ids)

    def rows_for(self, seq_ids: Any) -> np.ndarray:
        return self.batch.rows(seq_ids)

    def release(self, seq_ids: Any) -> np.ndarray:
        return self.batch.remove(seq_ids)

    def invalidate(self, seq_ids: Any) -> None:
        self.batch.invalidate(seq_ids)

    def plan(self, page_table: Any, full_upload_fraction: float) -> _UploadPlan:
        """Work out what the device needs (see the class notes on committing)."""
        self.batch.update()
        rows, first, end = self.batch.changes(clear=False)
        if rows.size == 0:
            return _UploadPlan(SyncStats("none", 0, self.table_bytes))
        counts = (end - first).astype(np.int64)
        total_cells = int(counts.sum())
        incremental_bytes = 4 * (3 * total_cells + 2 * rows.size)
        if incremental_bytes >= full_upload_fraction * self.table_bytes:
            stats = SyncStats("full", self.table_bytes, self.table_bytes, rows_changed=int(rows.size))
            return _UploadPlan(stats, full_table=self.batch.block_table.copy(),
                               full_lengths=self.batch.num_blocks.copy())
        cell_rows = np.repeat(rows, counts)
        cell_columns = np.arange(total_cells, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        cell_columns += np.repeat(first, counts)
        packed = np.empty(3 * total_cells + 2 * rows.size, dtype=np.int32)
        cells = packed[: 3 * total_cells].reshape(total_cells, 3)
        cells[:, 0] = cell_rows
        cells[:, 1] = cell_columns
        cells[:, 2] = self.batch.block_table[cell_rows, cell_columns]
        lengths = packed[3 * total_cells :].reshape(rows.size, 2)
        lengths[:, 0] = rows
        lengths[:, 1] = self.batch.num_blocks[rows]
        stats = SyncStats(
            "incremental", incremental_bytes, self.table_bytes,
            total_cells, int(rows.size), int(rows.size),
        )
        return _UploadPlan(stats, packed, total_cells, int(rows.size))

    def commit(self) -> None:
        """Record that the planned upload was enqueued: the device now holds it."""
        self.batch.changes(clear=True)
