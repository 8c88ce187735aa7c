"""Benchmark-only code: the baselines pagetable is timed against.

Nothing in the library imports this module; it is not part of the API.  It is the one
copy shared by the asv suites (``benchmarks/``), the pytest-benchmark tests
(``tests/benchmarks/``) and ``pagetable bench``; the inputs they time come from
:mod:`pagetable.cli.workloads`.  It depends on numpy only, so that asv can load it
straight from the checkout (see ``benchmarks/workloads.py``).

Baselines
---------
``DictOfListsPageTable``
    The seed's layout and algorithms: a dict mapping a sequence id to a list of
    Python ints.  ``block_table`` / ``to_csr`` fill a numpy array row by row from
    those lists, the way an engine without a native table builds kernel inputs.
``formula_slot_mapping``
    vLLM's host formula over its persistent dense ``[rows, W]`` int32 block table,
    with each token's row index handed over for free.
``memcpy_floor``
    ``np.copyto(out, positions)``: read 8 bytes and write 8 bytes per token, the
    least any slot mapping over int64 arrays can cost.
``input_stream_floor``
    ``np.add(seq_ids, positions, out=out)``: the traffic ``slot_mapping`` itself must
    move (two int64 inputs, one output), for information beside the memcpy floor.
"""

from __future__ import annotations

import numpy as np

from .workloads import PAD_SLOT_ID


class DictOfListsPageTable:
    """The seed's PageTable: ``{sequence_id: [block_id, ...]}`` of Python ints."""

    def __init__(self, block_size: int = 16) -> None:
        self.block_size = block_size
        self.blocks: dict[int, list[int]] = {}

    def append_block(self, sequence_id, block_id):
        self.blocks.setdefault(sequence_id, []).append(block_id)

    def get_block_for_position(self, sequence_id, token_pos):
        blocks = self.blocks.get(sequence_id)
        if blocks is None:
            return None
        index = token_pos // self.block_size
        if index >= len(blocks):
            return None
        return blocks[index], token_pos % self.block_size

    def get_sequence_blocks(self, sequence_id):
        blocks = self.blocks.get(sequence_id)
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def remove_sequence(self, sequence_id):
        blocks = self.blocks.pop(sequence_id, None)
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def num_sequences(self):
        return len(self.blocks)

    def block_table(self, seq_ids):
        """Fill a padded numpy table row by row from the Python lists."""
        rows = [self.blocks[seq_id] for seq_id in seq_ids]
        num_blocks = np.array([len(row) for row in rows], dtype=np.int32)
        width = int(num_blocks.max()) if len(rows) else 0
        table = np.full((len(rows), width), PAD_SLOT_ID, dtype=np.int32)
        for i, row in enumerate(rows):
            table[i, :len(row)] = row
        return table, num_blocks

    def to_csr(self, seq_ids):
        """Fill CSR arrays row by row from the Python lists."""
        rows = [self.blocks[seq_id] for seq_id in seq_ids]
        indptr = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum([len(row) for row in rows], out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        for i, row in enumerate(rows):
            indices[indptr[i]:indptr[i + 1]] = row
        return indptr, indices


def formula_slot_mapping(dense_table, rows, positions, block_size, out):
    """vLLM's host slot mapping over its persistent dense table (rows given for free)."""
    width = dense_table.shape[1]
    idx = rows * width + positions // block_size
    np.add(dense_table.ravel()[idx].astype(np.int64) * block_size, positions % block_size, out=out)
    return out


def formula_lookup(dense_table, rows, positions, block_size):
    """The same formula, returning (block id, offset) the way ``lookup`` does."""
    width = dense_table.shape[1]
    idx = rows * width + positions // block_size
    return dense_table.ravel()[idx], (positions % block_size).astype(np.int32)


def memcpy_floor(positions, out):
    """The memory floor of a slot mapping: stream the int64 input into the int64 output."""
    np.copyto(out, positions)
    return out


def input_stream_floor(seq_ids, positions, out):
    """The floor for a slot mapping that reads its sequence ids too: 16 bytes in, 8 out.

    ``np.add(seq_ids, positions, out=out)`` streams exactly what ``slot_mapping`` must
    touch per token (two int64 inputs, one int64 output), so ours can approach this,
    never ``memcpy_floor`` (which reads one input).
    """
    np.add(seq_ids, positions, out=out)
    return out


def setdefault_append_loop(seq_ids: list[int], block_ids: list[int]) -> dict[int, list[int]]:
    """The seed's append in a Python loop: ``dict.setdefault(s, []).append(b)``."""
    blocks: dict[int, list[int]] = {}
    for seq_id, block_id in zip(seq_ids, block_ids):
        blocks.setdefault(seq_id, []).append(block_id)
    return blocks


def dict_get_block_loop(table, seq_ids, positions):
    """The seed's ``get_block_for_position`` from a Python loop."""
    get = table.get_block_for_position
    result = None
    for seq_id, position in zip(seq_ids, positions):
        result = get(seq_id, position)
    return result
