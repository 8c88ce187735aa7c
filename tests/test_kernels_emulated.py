"""The GPU kernels' logic, run on the CPU and held against the Cython PageTable.

The kernel source is compiled as C++ under ``tests/kernel_emulation/grid_emulation.h``,
which turns ``blockIdx`` / ``threadIdx`` into globals and loops over them, into a shared
library called through ctypes (``tests/kernel_emulation/emulation.py``: arguments checked
against the source's declarations, canaries around every array, every launch run in both
thread orders).

The device table itself is built the way ``DeviceBlockTable.sync`` builds it: the host
planner (``pagetable.gpu._planner``) packs the updates and the emulated scatter kernel
applies them.
"""

import importlib.util
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # under --import-mode=importlib
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import child_env  # noqa: E402
from kernel_emulation.emulation import build_emulated_kernels, find_compiler  # noqa: E402
from kernel_emulation.fake_cupy import make_fake_cupy  # noqa: E402
from pagetable import PAD_SLOT_ID, PageTable  # noqa: E402
from pagetable import gpu  # noqa: E402


BLOCK_SIZES = [1, 7, 16, 32]


@pytest.fixture(scope="session")
def kernels(tmp_path_factory):
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to build the kernel emulation")
    return build_emulated_kernels(tmp_path_factory.mktemp("kernel_emulation"), compiler)


# ------------------------------------------------------------------ a mirrored table


class EmulatedDevice:
    """A PageTable, its device rows, and the device table built by the sync planner."""

    def __init__(self, kernels, page_table, max_rows, max_blocks):
        self.kernels = kernels
        self.page_table = page_table
        self.mirror = gpu._HostMirror(page_table, max_rows, max_blocks)
        self.table = np.full((max_rows, max_blocks), PAD_SLOT_ID, dtype=np.int32)
        self.row_lengths = np.zeros(max_rows, dtype=np.int32)

    @property
    def max_rows(self):
        return self.mirror.max_rows

    @property
    def max_blocks(self):
        return self.mirror.max_blocks_per_seq

    def sync(self, full_upload_fraction=0.5):
        plan = self.mirror.plan(self.page_table, full_upload_fraction)
        if plan.stats.mode == "incremental":
            grid, block = gpu.launch_shape_per_item(plan.num_cell_updates + plan.num_length_updates)
            self.kernels.launch(
                "pagetable_apply_updates", grid, block,
                self.table, self.row_lengths, self.max_rows, self.max_blocks,
                plan.packed_updates, plan.num_cell_updates, plan.num_length_updates,
            )
        elif plan.stats.mode == "full":
            self.table[...] = plan.full_table
            self.row_lengths[...] = plan.full_lengths
        self.mirror.commit()
        return plan.stats

    def table_arguments(self):
        return (self.table, self.row_lengths, self.max_rows, self.max_blocks)

    def sequence_of_rows(self, rows):
        """Sequence id each row holds, or an id the page table does not know."""
        rows = np.asarray(rows, dtype=np.int64)
        valid = (rows >= 0) & (rows < self.max_rows)
        sequences = np.full(rows.size, 2**62, dtype=np.int64)
        sequences[valid] = self.mirror.row_sequence[rows[valid]]
        sequences[sequences < 0] = 2**62
        return sequences

    def expected_block_table(self):
        """What the device table must hold: block_table of each row's sequence, else PAD."""
        table = np.full((self.max_rows, self.max_blocks), PAD_SLOT_ID, dtype=np.int32)
        lengths = np.zeros(self.max_rows, dtype=np.int32)
        rows = np.flatnonzero(self.mirror.row_sequence >= 0)
        present = [r for r in rows if int(self.mirror.row_sequence[r]) in self.page_table]
        if present:
            out = np.empty((len(present), self.max_blocks), dtype=np.int32)
            dense, counts = self.page_table.block_table(self.mirror.row_sequence[present], out=out)
            table[present] = dense
            lengths[present] = counts
        return table, lengths


def random_device(kernels, rng, block_size, num_sequences=40, max_rows=48, max_blocks=24):
    page_table = PageTable(block_size)
    seq_ids = rng.choice(10**12, size=num_sequences, replace=False).astype(np.int64)
    lengths = rng.integers(0, max_blocks + 1, size=num_sequences)
    lengths[:3] = [0, 1, max_blocks]
    appended = np.repeat(seq_ids, lengths)
    order = rng.permutation(appended.size)  # interleaved appends, per-sequence order kept
    appended = appended[np.sort(order)]
    page_table.append_blocks(appended, rng.integers(0, 2**31 - 1, size=appended.size))
    device = EmulatedDevice(kernels, page_table, max_rows, max_blocks)
    # Some sequences get rows, one of them not yet in the page table; a few rows stay free.
    device.mirror.assign(seq_ids[: num_sequences - 4])
    device.mirror.assign([10**13])
    device.sync()
    return device


def random_queries(rng, device, count):
    """(rows, positions) with out-of-range rows and positions mixed in."""
    max_position = device.max_blocks * device.page_table.block_size
    rows = rng.integers(-2, device.max_rows + 2, size=count).astype(np.int32)
    rows[:4] = [-1, device.max_rows, np.iinfo(np.int32).max, np.iinfo(np.int32).min]
    positions = rng.integers(-3, max_position + 5, size=count).astype(np.int64)
    positions[4:8] = [2**62, -(2**62), np.iinfo(np.int64).max, 0]
    return rows, positions


# Block widths: the planned 256; 3 (grid-stride loops in a tiny grid); one RDNA wavefront
# (32) and one CDNA wavefront (64); 100, a width that is no multiple of either.  The
# kernels use no warp-level operation (test_kernels_compile checks the source for one),
# so a wavefront is only a block width to them; these hold that for both widths.
LAUNCH_SHAPES = ["planned", "one_small_block", "wave32", "wave64", "block100"]
_FIXED_SHAPES = {
    "one_small_block": ((1, 1, 1), (3, 1, 1), (2, 2, 1), (3, 1, 1)),
    "wave32": ((2, 1, 1), (32, 1, 1), (2, 1, 1), (32, 1, 1)),
    "wave64": ((1, 1, 1), (64, 1, 1), (1, 3, 1), (64, 1, 1)),
    "block100": ((2, 1, 1), (100, 1, 1), (3, 1, 1), (100, 1, 1)),
}


def _shape_per_item(kind, count):
    if kind == "planned":
        return gpu.launch_shape_per_item(count)
    return _FIXED_SHAPES[kind][:2]


def _shape_per_request(kind, num_requests, items):
    if kind == "planned":
        return gpu.launch_shape_per_request(num_requests, items)
    return _FIXED_SHAPES[kind][2:]


# ------------------------------------------------------------------ tests


def test_signatures_cover_every_kernel():
    names = set(gpu.kernel_signatures())
    assert {
        "pagetable_lookup", "pagetable_slot_mapping", "pagetable_slot_mapping_from_batch",
        "pagetable_gather_block_table", "pagetable_csr_indptr", "pagetable_csr_indices",
        "pagetable_apply_updates",
    } <= names
    for parameters in gpu.kernel_signatures().values():
        assert all(p.dtype in (np.int32, np.int64) for p in parameters)


def test_pad_sentinel_matches_core():
    assert gpu.PAD_SLOT_ID == PAD_SLOT_ID == -1


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_synced_table_matches_block_table(kernels, block_size):
    rng = np.random.default_rng(block_size)
    device = random_device(kernels, rng, block_size)
    table, lengths = device.expected_block_table()
    np.testing.assert_array_equal(device.table, table)
    np.testing.assert_array_equal(device.row_lengths, lengths)


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_lookup(kernels, block_size, shape):
    rng = np.random.default_rng(100 + block_size)
    device = random_device(kernels, rng, block_size)
    rows, positions = random_queries(rng, device, 500)
    block_ids = np.empty(rows.size, dtype=np.int32)
    offsets = np.empty(rows.size, dtype=np.int32)
    grid, block = _shape_per_item(shape, rows.size)
    kernels.launch(
        "pagetable_lookup", grid, block, *device.table_arguments(),
        block_size, gpu._block_shift(block_size), rows, positions, rows.size, block_ids, offsets,
    )
    expected_blocks, expected_offsets = device.page_table.lookup(device.sequence_of_rows(rows), positions)
    np.testing.assert_array_equal(block_ids, expected_blocks)
    np.testing.assert_array_equal(offsets, expected_offsets)
    assert (block_ids[:4] == PAD_SLOT_ID).all()


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_slot_mapping(kernels, block_size, shape):
    rng = np.random.default_rng(200 + block_size)
    device = random_device(kernels, rng, block_size)
    rows, positions = random_queries(rng, device, 500)
    slots = np.empty(rows.size, dtype=np.int64)
    grid, block = _shape_per_item(shape, rows.size)
    kernels.launch(
        "pagetable_slot_mapping", grid, block, *device.table_arguments(),
        block_size, gpu._block_shift(block_size), rows, positions, rows.size, slots,
    )
    expected = device.page_table.slot_mapping(device.sequence_of_rows(rows), positions)
    np.testing.assert_array_equal(slots, expected)


def test_empty_launches(kernels):
    device = random_device(kernels, np.random.default_rng(0), 16)
    empty32, empty64 = np.empty(0, np.int32), np.empty(0, np.int64)
    grid, block = gpu.launch_shape_per_item(0)
    kernels.launch("pagetable_slot_mapping", grid, block, *device.table_arguments(),
                   16, 4, empty32, empty64, 0, empty64)
    slots = np.full(5, 99, dtype=np.int64)
    grid, block = gpu.launch_shape_per_request(0, 0)
    kernels.launch("pagetable_slot_mapping_from_batch", grid, block, *device.table_arguments(),
                   16, 4, empty32, np.zeros(1, np.int32), empty64, 0, 5, slots, 0, empty64)
    assert (slots == PAD_SLOT_ID).all()  # an empty batch is all padding
    indptr = np.full(1, 99, dtype=np.int32)
    kernels.launch("pagetable_csr_indptr", (1, 1, 1), (1, 1, 1), device.row_lengths,
                   device.max_rows, device.max_blocks, 16, empty32, 0, 0, empty32, indptr, empty32)
    assert indptr.tolist() == [0]


def _expand_batch(rows, query_start_loc, first_positions):
    """Per-token (row, position) of a batch description, the host-side way."""
    query_lengths = np.diff(query_start_loc)
    token_rows = np.repeat(rows, query_lengths)
    starts = np.repeat(query_start_loc[:-1], query_lengths)
    token_positions = np.repeat(first_positions, query_lengths)
    token_positions = token_positions + np.arange(token_rows.size) + query_start_loc[0] - starts
    return token_rows, token_positions


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("padding", [0, 37])
def test_slot_mapping_from_batch(kernels, block_size, shape, padding):
    rng = np.random.default_rng(300 + block_size + padding)
    device = random_device(kernels, rng, block_size)
    num_requests = 30
    rows = rng.integers(-1, device.max_rows + 1, size=num_requests).astype(np.int32)
    query_lengths = rng.integers(0, 3 * block_size + 2, size=num_requests)
    query_lengths[::5] = 1  # decode requests
    query_lengths[1] = 0
    query_start_loc = np.concatenate([[0], np.cumsum(query_lengths)]).astype(np.int32)
    max_position = device.max_blocks * block_size
    first_positions = rng.integers(-2, max_position, size=num_requests).astype(np.int64)
    total = int(query_start_loc[-1])
    out_length = total + padding
    slots = np.full(out_length, 12345, dtype=np.int64)
    positions = np.full(out_length, 12345, dtype=np.int64)
    grid, block = _shape_per_request(shape, num_requests, int(query_lengths.max()))
    kernels.launch(
        "pagetable_slot_mapping_from_batch", grid, block, *device.table_arguments(),
        block_size, gpu._block_shift(block_size), rows, query_start_loc, first_positions,
        num_requests, out_length, slots, 1, positions,
    )
    token_rows, token_positions = _expand_batch(rows, query_start_loc, first_positions)
    expected = device.page_table.slot_mapping(device.sequence_of_rows(token_rows), token_positions)
    np.testing.assert_array_equal(slots[:total], expected)
    np.testing.assert_array_equal(positions[:total], token_positions)
    assert (slots[total:] == PAD_SLOT_ID).all()
    assert (positions[total:] == PAD_SLOT_ID).all()


def test_slot_mapping_from_batch_truncates_and_pads_ends(kernels):
    """Tokens past out_length are never written; tokens before query_start_loc[0] are padding."""
    rng = np.random.default_rng(7)
    device = random_device(kernels, rng, 16)
    rows = np.array([0, 1, 2], dtype=np.int32)
    query_start_loc = np.array([5, 20, 21, 60], dtype=np.int32)
    first_positions = np.array([0, 3, 10], dtype=np.int64)
    out_length = 40
    slots = np.full(out_length, 12345, dtype=np.int64)
    grid, block = gpu.launch_shape_per_request(3, 39)
    kernels.launch(
        "pagetable_slot_mapping_from_batch", grid, block, *device.table_arguments(), 16, 4,
        rows, query_start_loc, first_positions, 3, out_length, slots, 0, np.empty(0, np.int64),
    )
    assert (slots[:5] == PAD_SLOT_ID).all()
    token_rows, token_positions = _expand_batch(rows, query_start_loc, first_positions)
    expected = device.page_table.slot_mapping(device.sequence_of_rows(token_rows), token_positions)
    np.testing.assert_array_equal(slots[5:], expected[: out_length - 5])


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_gather_block_table(kernels, block_size, shape):
    rng = np.random.default_rng(400 + block_size)
    device = random_device(kernels, rng, block_size)
    assigned = np.flatnonzero(device.mirror.row_sequence >= 0)
    known = [r for r in assigned if int(device.mirror.row_sequence[r]) in device.page_table]
    rows = np.array(rng.permutation(known).tolist() + [-1, device.max_rows, 47], dtype=np.int32)
    width = device.max_blocks
    table = np.empty((rows.size, width), dtype=np.int32)
    num_blocks = np.empty(rows.size, dtype=np.int32)
    grid, block = _shape_per_request(shape, rows.size, width)
    kernels.launch("pagetable_gather_block_table", grid, block, *device.table_arguments(),
                   rows, rows.size, width, table, num_blocks)
    known_count = len(known)
    out = np.empty((known_count, width), dtype=np.int32)
    expected, expected_counts = device.page_table.block_table(
        device.mirror.row_sequence[rows[:known_count]], out=out
    )
    np.testing.assert_array_equal(table[:known_count], expected)
    np.testing.assert_array_equal(num_blocks[:known_count], expected_counts)
    assert (table[known_count:] == PAD_SLOT_ID).all()
    assert (num_blocks[known_count:] == 0).all()


def _csr(kernels, device, rows, token_counts, shape, capacity=None):
    num_requests = rows.size
    indptr = np.empty(num_requests + 1, dtype=np.int32)
    has_counts = token_counts is not None
    last_page_len = np.full(max(num_requests, 1), 777, dtype=np.int32)
    kernels.launch(
        "pagetable_csr_indptr", (1, 1, 1), (4, 1, 1), device.row_lengths, device.max_rows,
        device.max_blocks, device.page_table.block_size, rows, num_requests, int(has_counts),
        token_counts if has_counts else rows, indptr, last_page_len,
    )
    capacity = int(indptr[-1]) if capacity is None else capacity
    indices = np.full(capacity, 12345, dtype=np.int32)
    grid, block = _shape_per_request(shape, num_requests, device.max_blocks)
    kernels.launch("pagetable_csr_indices", grid, block, *device.table_arguments(),
                   rows, num_requests, indptr, capacity, indices)
    return indptr, indices, last_page_len[:num_requests]


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_csr_matches_to_csr(kernels, block_size, shape):
    rng = np.random.default_rng(500 + block_size)
    device = random_device(kernels, rng, block_size)
    assigned = np.flatnonzero(device.mirror.row_sequence >= 0)
    known = [r for r in assigned if int(device.mirror.row_sequence[r]) in device.page_table]
    rows = rng.permutation(known).astype(np.int32)
    indptr, indices, _ = _csr(kernels, device, rows, None, shape)
    expected_indptr, expected_indices = device.page_table.to_csr(device.mirror.row_sequence[rows])
    np.testing.assert_array_equal(indptr, expected_indptr)
    np.testing.assert_array_equal(indices, expected_indices)


@pytest.mark.parametrize("shape", LAUNCH_SHAPES)
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_csr_with_token_counts(kernels, block_size, shape):
    """FlashInfer layout: ceil(tokens / page) pages, last page holding 1..page_size tokens."""
    rng = np.random.default_rng(600 + block_size)
    device = random_device(kernels, rng, block_size)
    rows = rng.integers(-1, device.max_rows + 1, size=40).astype(np.int32)
    sequences = device.sequence_of_rows(rows)
    blocks = np.array([device.page_table.num_blocks([s])[0] if int(s) in device.page_table else 0
                       for s in sequences])
    token_counts = (blocks * block_size - rng.integers(0, block_size, size=rows.size)).astype(np.int32)
    token_counts[:3] = [-5, 0, 10**9]
    indptr, indices, last_page_len = _csr(kernels, device, rows, token_counts, shape)

    tokens = np.clip(token_counts.astype(np.int64), 0, blocks * block_size)
    pages = -(-tokens // block_size)
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(pages)]))
    np.testing.assert_array_equal(last_page_len, np.where(pages > 0, tokens - (pages - 1) * block_size, 0))
    assert ((last_page_len >= 1) & (last_page_len <= block_size))[pages > 0].all()
    for request, sequence in enumerate(sequences):
        if pages[request]:
            expected = device.page_table.get_sequence_blocks(int(sequence))[: pages[request]]
            np.testing.assert_array_equal(indices[indptr[request]:indptr[request + 1]], expected)


def test_csr_indices_never_overrun_capacity(kernels):
    device = random_device(kernels, np.random.default_rng(9), 16)
    rows = np.flatnonzero(device.mirror.row_sequence >= 0).astype(np.int32)
    _, full, _ = _csr(kernels, device, rows, None, "planned")
    _, short, _ = _csr(kernels, device, rows, None, "planned", capacity=full.size // 2)
    np.testing.assert_array_equal(short, full[: full.size // 2])  # canaries check the rest


# ------------------------------------------------------------------ incremental upload


@pytest.mark.parametrize("block_size", [1, 16])
def test_incremental_sync_follows_random_edits(kernels, block_size):
    """Appends, copy-on-write, forks, removals, assign/release/invalidate: after every sync
    the emulated device table equals the page table's block_table row by row."""
    rng = np.random.default_rng(700 + block_size)
    max_rows, max_blocks = 32, 20
    page_table = PageTable(block_size)
    device = EmulatedDevice(kernels, page_table, max_rows, max_blocks)
    live = []
    next_id = 1
    modes = set()
    for step in range(120):
        action = rng.integers(0, 8)
        if action <= 2 and len(live) < max_rows:  # a new sequence
            seq_id = next_id
            next_id += 1
            count = int(rng.integers(0, max_blocks // 2))
            if count:
                page_table.append_blocks([seq_id] * count, rng.integers(0, 10**6, size=count))
            device.mirror.assign([seq_id])
            live.append(seq_id)
        elif action == 3 and live:  # decode step: some sequences gain a block
            grow = [s for s in live if rng.random() < 0.3
                    and (s not in page_table or page_table.num_blocks([s])[0] < max_blocks)]
            if grow:
                page_table.append_blocks(grow, rng.integers(0, 10**6, size=len(grow)))
        elif action == 4 and live:  # copy-on-write of the last block
            seq_id = live[int(rng.integers(len(live)))]
            if seq_id in page_table and page_table.num_blocks([seq_id])[0]:
                last = page_table.num_blocks([seq_id])[0] - 1
                page_table.set_block(seq_id, int(last), int(rng.integers(10**6, 2 * 10**6)))
        elif action == 5 and live:  # a block replaced further in: the rewrite stamp sees it
            seq_id = live[int(rng.integers(len(live)))]
            if seq_id in page_table and page_table.num_blocks([seq_id])[0] > 1:
                index = int(rng.integers(0, page_table.num_blocks([seq_id])[0] - 1))
                page_table.set_block(seq_id, index, int(rng.integers(2 * 10**6, 3 * 10**6)))
                if rng.random() < 0.3:  # invalidate() stays harmless
                    device.mirror.invalidate([seq_id])
        elif action == 6 and live:  # finished: removed and released
            seq_id = live.pop(int(rng.integers(len(live))))
            page_table.remove_sequence(seq_id)
            device.mirror.release([seq_id])
        elif action == 7 and live and len(live) < max_rows:  # fork (beam search, prefix share)
            parent = live[int(rng.integers(len(live)))]
            if parent in page_table:
                page_table.fork_sequence(parent, next_id)
                device.mirror.assign([next_id])
                live.append(next_id)
                next_id += 1
        if step % 3 == 0:
            modes.add(device.sync(full_upload_fraction=0.5 if step % 2 else 1.0).mode)
            table, lengths = device.expected_block_table()
            np.testing.assert_array_equal(device.row_lengths, lengths, err_msg=f"step {step}")
            np.testing.assert_array_equal(device.table, table, err_msg=f"step {step}")
    assert "incremental" in modes


def test_decode_step_sync_moves_under_one_percent(kernels):
    """1,024 sequences, one in sixteen gains a block: the packed update is <= 1% of the table."""
    rng = np.random.default_rng(11)
    num_sequences, max_blocks = 1024, 256
    page_table = PageTable(16)
    lengths = rng.integers(1, 200, size=num_sequences)
    seq_ids = np.arange(num_sequences, dtype=np.int64)
    page_table.append_blocks(np.repeat(seq_ids, lengths), rng.integers(0, 10**6, size=lengths.sum()))
    device = EmulatedDevice(kernels, page_table, num_sequences, max_blocks)
    device.mirror.assign(seq_ids)
    assert device.sync().mode == "full"
    growing = seq_ids[::16]
    page_table.append_blocks(growing, rng.integers(0, 10**6, size=growing.size))
    stats = device.sync()
    assert stats.mode == "incremental"
    assert stats.rows_changed == growing.size
    assert stats.bytes_uploaded <= 0.01 * stats.table_bytes
    table, row_lengths = device.expected_block_table()
    np.testing.assert_array_equal(device.table, table)
    np.testing.assert_array_equal(device.row_lengths, row_lengths)
    assert device.sync().mode == "none"


def test_sync_rejects_too_long_sequence_without_changes(kernels):
    page_table = PageTable(16)
    device = EmulatedDevice(kernels, page_table, 4, 3)
    page_table.append_blocks([5, 5], [1, 2])
    device.mirror.assign([5])
    device.sync()
    page_table.append_blocks([5, 5], [3, 4])
    with pytest.raises(ValueError, match="sequence 5 has 4 blocks"):
        device.sync()
    assert device.row_lengths.tolist() == [2, 0, 0, 0]
    assert device.mirror.device_lengths.tolist() == [2, 0, 0, 0]


def test_mirror_row_bookkeeping_errors():
    mirror = gpu._HostMirror(PageTable(16), 2, 4)
    assert mirror.assign([7, 8]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="only 0 of max_rows=2 are free"):
        mirror.assign([9])
    with pytest.raises(ValueError, match="already has a row"):
        mirror.assign([7])
    with pytest.raises(KeyError, match=r"seq_ids\[1\] = 9 has no row"):
        mirror.release([8, 9])
    assert mirror.rows_for([8, 7]).tolist() == [1, 0]  # the failed release changed nothing
    mirror.release([7])
    assert mirror.assign([9]).tolist() == [0]
    with pytest.raises(TypeError, match="must hold integers"):
        mirror.assign([1.5])


def test_launch_shapes_are_bounded():
    grid, block = gpu.launch_shape_per_item(16 * 2**20)
    assert block == (gpu.THREADS_PER_BLOCK, 1, 1) and 1 <= grid[0] <= 2**16
    grid, _ = gpu.launch_shape_per_request(200_000, 10**7)
    assert grid == (1, 65535, 1)  # requests past 65,535 are walked by the y grid-stride loop
    grid, _ = gpu.launch_shape_per_request(1024, 16384)
    assert grid == (64, 1024, 1)  # 16K-token prefills: a thread per token
    assert gpu.launch_shape_per_request(0, 0)[0] == (1, 1, 1)


# ------------------------------------------------------------------ DeviceBlockTable itself
#
# tests/gpu/ runs DeviceBlockTable on a real device.  Here the same test functions run
# against tests/kernel_emulation/fake_cupy.py, whose "device" is numpy and whose kernels are
# the emulated ones: every line of the CuPy path (argument conversion, launch shapes, the
# staging and upload code, output handling) and the GPU tests themselves run in CI.

GPU_TESTS_PATH = os.path.join(os.path.dirname(__file__), "gpu", "test_device_block_table.py")
GPU_TEST_PARAMETERS = {"block_size": [1, 16], "padding": [0, 100]}


def _gpu_test_cases():
    with open(GPU_TESTS_PATH) as f:
        source = f.read()
    cases = []
    for name, parameters in re.findall(r"^def (test_\w+)\(([^)]*)\)", source, re.MULTILINE):
        names = [p.strip() for p in parameters.split(",") if p.strip()]
        for values in itertools.product(*(GPU_TEST_PARAMETERS[n] for n in names)):
            cases.append(pytest.param(name, dict(zip(names, values)),
                                      id="-".join([name] + [str(v) for v in values])))
    return cases


@pytest.fixture
def fake_cupy(kernels, monkeypatch):
    fake = make_fake_cupy(kernels)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(gpu._device, "_usable_cupy", None)
    gpu._device._raw_module.cache_clear()
    gpu._device._kernel.cache_clear()
    yield fake
    gpu._device._raw_module.cache_clear()
    gpu._device._kernel.cache_clear()


@pytest.mark.parametrize("test_name, arguments", _gpu_test_cases())
def test_gpu_suite_on_emulated_device(fake_cupy, test_name, arguments):
    spec = importlib.util.spec_from_file_location("gpu_tests_on_emulated_device", GPU_TESTS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cupy is fake_cupy
    getattr(module, test_name)(**arguments)


def test_device_block_table_reports_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    monkeypatch.setattr(gpu._device, "_usable_cupy", None)
    assert not gpu.is_available()
    with pytest.raises(gpu.GPUUnavailableError, match="needs CuPy, which is not installed"):
        gpu.DeviceBlockTable(PageTable(16), 4, 4)


def test_importing_gpu_never_imports_cupy(tmp_path):
    """Only a device function imports CuPy: here a "cupy" that counts its imports and fails."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(
        "import sys\n"
        "sys.cupy_imports = getattr(sys, 'cupy_imports', 0) + 1\n"
        "raise ImportError('a stand-in')\n"
    )
    script = (
        "import sys\n"
        "from pagetable import gpu\n"
        "gpu.kernel_signatures(); gpu.launch_shape_per_item(5)\n"
        "import pagetable; gpu._HostMirror(pagetable.PageTable(16), 2, 4).assign([3])\n"
        "assert getattr(sys, 'cupy_imports', 0) == 0, 'cupy imported before a device function'\n"
        "assert not gpu.is_available()\n"
        "assert sys.cupy_imports == 1, 'is_available() did not try the stand-in'\n"
    )
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_block_table_argument_errors(fake_cupy):
    page_table = PageTable(16)
    with pytest.raises(ValueError, match="max_rows must be in"):
        gpu.DeviceBlockTable(page_table, 0, 4)
    with pytest.raises(TypeError, match="max_blocks_per_seq must be an integer"):
        gpu.DeviceBlockTable(page_table, 4, 2.5)
    with pytest.raises(ValueError, match="num_staging_buffers"):
        gpu.DeviceBlockTable(page_table, 4, 4, num_staging_buffers=1)
    device = gpu.DeviceBlockTable(page_table, 4, 4)
    with pytest.raises(ValueError, match="query_start_loc must have"):
        device.slot_mapping_from_batch([0], [0], [0], 4)
    with pytest.raises(TypeError, match="out must be a device array"):
        device.slot_mapping([0], [0], out=np.empty(1, np.int64))


def test_staging_buffers_rotate_and_grow(fake_cupy):
    page_table = PageTable(16)
    device = gpu.DeviceBlockTable(page_table, 64, 256, num_staging_buffers=3)
    seen = []
    for step in range(7):
        page_table.append_blocks(np.arange(step + 1), np.full(step + 1, step))
        if step == 0:
            device.assign(np.arange(64))
        seen.append(id(device._staging[device._next_staging]))
        device.sync()
    assert len(set(seen[:3])) == 3 and seen[3] == seen[0]
    # A big update outgrows the staging buffer and the device buffer: both grow.
    page_table.append_blocks(np.repeat(np.arange(64), 20), np.arange(64 * 20) % 1000)
    device._full_upload_fraction = 1.0
    assert device.sync().mode == "incremental"
    expected, counts = page_table.block_table(np.arange(64))
    np.testing.assert_array_equal(device.table.get()[:, : expected.shape[1]], expected)
    np.testing.assert_array_equal(device.row_lengths.get(), counts)


def test_gpu_bench_runs_on_emulated_device(fake_cupy, tmp_path, capsys):
    """benchmarks/gpu_bench.py at toy sizes: its code paths and result checks run in CI."""
    bench_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "gpu_bench.py")
    spec = importlib.util.spec_from_file_location("gpu_bench_on_emulated_device", bench_path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    status = bench.main([
        "--tokens", "2051", "--requests", "4", "--sync-sequences", "64", "--max-blocks", "64",
        "--repeats", "1", "--sync-steps", "4", "--out", str(tmp_path),
    ])
    assert status == 0
    report = capsys.readouterr().out
    assert "slot_mapping_from_batch (ours)" in report and "sync()" in report
    assert "Triton, one program per request" in report
    assert (tmp_path / "gpu_bench.md").exists() and (tmp_path / "gpu_bench.json").exists()
