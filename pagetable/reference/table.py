"""A slow, obviously-correct model of :class:`pagetable.PageTable`.

A dict of lists of Python ints, one loop per batched call: the layout the seed
describes.  Tests hold the Cython table against it; benchmarks use it as the
baseline.  It trusts its arguments (no validation): give it what the fast table
accepted.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from pagetable._table import PAD_SLOT_ID


class ReferencePageTable:
    """Sequence id -> list of block ids, kept in a plain ``dict``."""

    def __init__(self, block_size: int = 16) -> None:
        self.block_size = block_size
        self.sequences: dict[int, list[int]] = {}

    # seed API
    def append_block(self, sequence_id: int, block_id: int) -> None:
        self.sequences.setdefault(int(sequence_id), []).append(int(block_id))

    def get_block_for_position(self, sequence_id: int, token_pos: int) -> tuple[int, int] | None:
        blocks = self.sequences.get(int(sequence_id))
        if blocks is None:
            return None
        index = token_pos // self.block_size
        if index >= len(blocks):
            return None
        return blocks[index], token_pos % self.block_size

    def get_sequence_blocks(self, sequence_id: int) -> np.ndarray | None:
        blocks = self.sequences.get(int(sequence_id))
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def remove_sequence(self, sequence_id: int) -> np.ndarray | None:
        blocks = self.sequences.pop(int(sequence_id), None)
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def num_sequences(self) -> int:
        return len(self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __contains__(self, sequence_id: object) -> bool:
        return sequence_id in self.sequences

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sequences))

    # extras
    def fork_sequence(self, parent_id: int, child_id: int) -> None:
        self.sequences[int(child_id)] = list(self.sequences[int(parent_id)])

    def set_block(self, sequence_id: int, block_index: int, block_id: int) -> int:
        blocks = self.sequences[int(sequence_id)]
        old = blocks[block_index]
        blocks[block_index] = int(block_id)
        return old

    @property
    def total_blocks(self) -> int:
        return sum(len(b) for b in self.sequences.values())

    # batched API
    def append_blocks(self, seq_ids: Iterable[int], block_ids: Iterable[int]) -> None:
        for seq_id, block_id in zip(seq_ids, block_ids):
            self.append_block(int(seq_id), int(block_id))

    def num_blocks(self, seq_ids: Iterable[int]) -> np.ndarray:
        return np.array([len(self.sequences[int(s)]) for s in seq_ids], dtype=np.int32)

    def lookup(self, seq_ids: Iterable[int], positions: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        blocks, offsets = [], []
        for seq_id, pos in zip(seq_ids, positions):
            found = self.get_block_for_position(int(seq_id), int(pos)) if pos >= 0 else None
            blocks.append(PAD_SLOT_ID if found is None else found[0])
            offsets.append(PAD_SLOT_ID if found is None else found[1])
        return np.array(blocks, dtype=np.int32), np.array(offsets, dtype=np.int32)

    def slot_mapping(self, seq_ids: Iterable[int], positions: Iterable[int]) -> np.ndarray:
        slots = []
        for seq_id, pos in zip(seq_ids, positions):
            found = self.get_block_for_position(int(seq_id), int(pos)) if pos >= 0 else None
            slots.append(PAD_SLOT_ID if found is None else found[0] * self.block_size + found[1])
        return np.array(slots, dtype=np.int64)

    def block_table(self, seq_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.sequences[int(s)] for s in seq_ids]
        width = max((len(r) for r in rows), default=0)
        table = np.full((len(rows), width), PAD_SLOT_ID, dtype=np.int32)
        for b, row in enumerate(rows):
            table[b, : len(row)] = row
        return table, np.array([len(r) for r in rows], dtype=np.int32)

    def to_csr(self, seq_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.sequences[int(s)] for s in seq_ids]
        indptr = [0]
        indices: list[int] = []
        for row in rows:
            indices.extend(row)
            indptr.append(len(indices))
        return np.array(indptr, dtype=np.int32), np.array(indices, dtype=np.int32)
