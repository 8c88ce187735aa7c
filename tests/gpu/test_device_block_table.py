"""The CuPy path on a real device, held against the Cython PageTable.

Skips the whole module where CuPy or a GPU device is missing (CI has neither; the kernels'
logic is covered there by tests/test_kernels_emulated.py).  Run on a GPU machine with
``pytest tests/gpu`` or ``tools/gpu_check.sh``.
"""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from pagetable import PAD_SLOT_ID, PageTable  # noqa: E402
from pagetable import gpu  # noqa: E402

if not gpu.is_available():
    pytest.skip("CuPy is installed but no GPU device is usable", allow_module_level=True)

BLOCK_SIZES = [1, 7, 16]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def make_table(block_size, seed, num_sequences=200, max_rows=256, max_blocks=64):
    rng = np.random.default_rng(seed)
    page_table = PageTable(block_size)
    seq_ids = rng.choice(10**12, size=num_sequences, replace=False).astype(np.int64)
    lengths = rng.integers(0, max_blocks + 1, size=num_sequences)
    lengths[:2] = [0, max_blocks]
    page_table.append_blocks(np.repeat(seq_ids, lengths), rng.integers(0, 2**31 - 1, size=lengths.sum()))
    device = gpu.DeviceBlockTable(page_table, max_rows, max_blocks)
    rows = device.assign(seq_ids)
    device.sync()
    return rng, page_table, device, seq_ids, rows


def sequences_of(device, seq_ids, rows, queried_rows):
    """Sequence id of each queried row, or an id the page table does not hold."""
    by_row = np.full(device.max_rows, 2**62, dtype=np.int64)
    by_row[rows] = seq_ids
    queried_rows = np.asarray(queried_rows, dtype=np.int64)
    valid = (queried_rows >= 0) & (queried_rows < device.max_rows)
    result = np.full(queried_rows.size, 2**62, dtype=np.int64)
    result[valid] = by_row[queried_rows[valid]]
    return result


def random_queries(rng, device, count):
    rows = rng.integers(-2, device.max_rows + 2, size=count).astype(np.int32)
    positions = rng.integers(-3, device.max_blocks_per_seq * device.block_size + 5, size=count)
    positions[:3] = [2**62, -(2**62), 0]
    return rows, positions.astype(np.int64)


def expected_table(device, page_table, seq_ids, rows):
    table = np.full((device.max_rows, device.max_blocks_per_seq), PAD_SLOT_ID, dtype=np.int32)
    lengths = np.zeros(device.max_rows, dtype=np.int32)
    live = [i for i, s in enumerate(seq_ids) if int(s) in page_table]
    if live:
        out = np.empty((len(live), device.max_blocks_per_seq), dtype=np.int32)
        dense, counts = page_table.block_table(seq_ids[live], out=out)
        table[rows[live]] = dense
        lengths[rows[live]] = counts
    return table, lengths


def test_is_available_and_kernels_compile():
    assert gpu.is_available()
    module = gpu._raw_module()
    for name in gpu.kernel_signatures():
        module.get_function(name)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_first_sync_uploads_the_table(block_size):
    _, page_table, device, seq_ids, rows = make_table(block_size, 1)
    table, lengths = expected_table(device, page_table, seq_ids, rows)
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(device.table.get(), table)
    np.testing.assert_array_equal(device.row_lengths.get(), lengths)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_lookup_and_slot_mapping(block_size):
    rng, page_table, device, seq_ids, rows = make_table(block_size, 2)
    query_rows, positions = random_queries(rng, device, 5000)
    sequences = sequences_of(device, seq_ids, rows, query_rows)
    block_ids, offsets = device.lookup(cupy.asarray(query_rows), cupy.asarray(positions))
    expected_blocks, expected_offsets = page_table.lookup(sequences, positions)
    np.testing.assert_array_equal(block_ids.get(), expected_blocks)
    np.testing.assert_array_equal(offsets.get(), expected_offsets)
    slots = device.slot_mapping(cupy.asarray(query_rows), cupy.asarray(positions))
    np.testing.assert_array_equal(slots.get(), page_table.slot_mapping(sequences, positions))
    out = cupy.empty(query_rows.size, dtype=cupy.int64)
    assert device.slot_mapping(query_rows, positions, out=out) is out  # host inputs copied


def test_input_conversions():
    rng, page_table, device, seq_ids, rows = make_table(16, 3)
    wide_rows = cupy.asarray([int(rows[0]), 2**40, -5, int(rows[1])], dtype=cupy.int64)
    positions = cupy.asarray([0, 0, 0, 5], dtype=cupy.int32)
    slots = device.slot_mapping(wide_rows, positions).get()
    expected = page_table.slot_mapping([seq_ids[0], 2**62, 2**62, seq_ids[1]], [0, 0, 0, 5])
    np.testing.assert_array_equal(slots, expected)  # 2**40 must not wrap into a valid row
    with pytest.raises(TypeError, match="rows must hold integers"):
        device.slot_mapping(cupy.zeros(3, dtype=cupy.float32), positions[:3])
    with pytest.raises(ValueError, match="same length"):
        device.slot_mapping(wide_rows, positions[:3])
    with pytest.raises(ValueError, match="out must be"):
        device.slot_mapping(wide_rows, positions, out=cupy.empty(4, dtype=cupy.int32))


def test_torch_interop():
    torch = _torch()
    if torch is None:
        pytest.skip("PyTorch with a GPU is not installed")
    _, page_table, device, seq_ids, rows = make_table(16, 4)
    torch_rows = torch.as_tensor(rows[:10], device="cuda")
    torch_positions = torch.arange(10, device="cuda", dtype=torch.int64)
    slots = device.slot_mapping(torch_rows, torch_positions)
    as_torch = torch.from_dlpack(slots)
    expected = page_table.slot_mapping(seq_ids[:10], np.arange(10))
    np.testing.assert_array_equal(as_torch.cpu().numpy(), expected)
    out = torch.empty(10, dtype=torch.int64, device="cuda")
    device.slot_mapping(torch_rows, torch_positions, out=out)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy(), expected)  # written in place, no copy


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("padding", [0, 100])
def test_slot_mapping_from_batch(block_size, padding):
    rng, page_table, device, seq_ids, rows = make_table(block_size, 5)
    num_requests = 64
    batch_rows = rng.integers(-1, device.max_rows + 1, size=num_requests).astype(np.int32)
    query_lengths = rng.integers(0, 4 * block_size + 3, size=num_requests)
    query_lengths[::4] = 1
    query_start_loc = np.concatenate([[0], np.cumsum(query_lengths)]).astype(np.int32)
    first_positions = rng.integers(0, device.max_blocks_per_seq * block_size, size=num_requests)
    total = int(query_start_loc[-1])
    positions_out = cupy.empty(total + padding, dtype=cupy.int64)
    slots = device.slot_mapping_from_batch(
        cupy.asarray(batch_rows), cupy.asarray(query_start_loc), cupy.asarray(first_positions),
        total + padding, positions_out=positions_out, max_query_len=int(query_lengths.max()),
    ).get()
    token_rows = np.repeat(batch_rows, query_lengths)
    token_positions = np.repeat(first_positions, query_lengths) + (
        np.arange(total) - np.repeat(query_start_loc[:-1], query_lengths)
    )
    expected = page_table.slot_mapping(sequences_of(device, seq_ids, rows, token_rows), token_positions)
    np.testing.assert_array_equal(slots[:total], expected)
    assert (slots[total:] == PAD_SLOT_ID).all()
    np.testing.assert_array_equal(positions_out.get()[:total], token_positions)


def test_slot_mapping_from_batch_replays_in_a_graph():
    """Fixed-size buffers, no host reads: the call can be captured once and replayed."""
    _, page_table, device, seq_ids, rows = make_table(16, 6)
    stream = cupy.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        pytest.skip("this CuPy cannot capture graphs")
    batch_rows = cupy.asarray(rows[:4])
    query_start_loc = cupy.asarray([0, 3, 4, 9, 10], dtype=cupy.int32)
    first_positions = cupy.asarray([0, 5, 17, 2], dtype=cupy.int64)
    out = cupy.empty(32, dtype=cupy.int64)
    # Compile and load the kernel before capturing: module loading cannot be captured.
    device.slot_mapping_from_batch(batch_rows, query_start_loc, first_positions, out=out)
    cupy.cuda.get_current_stream().synchronize()
    with stream:
        stream.begin_capture()
        device.slot_mapping_from_batch(batch_rows, query_start_loc, first_positions,
                                       out=out, max_query_len=16)
        graph = stream.end_capture()
    for first in ([0, 5, 17, 2], [1, 0, 3, 4]):
        with stream:  # the copy and the replay on one stream, in order
            first_positions.set(np.asarray(first, dtype=np.int64))
        graph.launch(stream)
        stream.synchronize()
        token_positions = np.repeat(first, [3, 1, 5, 1]) + np.array([0, 1, 2, 0, 0, 1, 2, 3, 4, 0])
        expected = page_table.slot_mapping(np.repeat(seq_ids[:4], [3, 1, 5, 1]), token_positions)
        result = out.get()
        np.testing.assert_array_equal(result[:10], expected)
        assert (result[10:] == PAD_SLOT_ID).all()


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_table_and_csr(block_size):
    rng, page_table, device, seq_ids, rows = make_table(block_size, 7)
    present = np.array([i for i, s in enumerate(seq_ids) if int(s) in page_table])
    order = rng.permutation(present)[:50]  # block_table / to_csr raise for unknown ids
    batch_rows = cupy.asarray(rows[order])
    table, num_blocks = device.block_table(batch_rows)
    out = np.empty((order.size, device.max_blocks_per_seq), dtype=np.int32)
    expected_table, expected_counts = page_table.block_table(seq_ids[order], out=out)
    np.testing.assert_array_equal(table.get(), expected_table)
    np.testing.assert_array_equal(num_blocks.get(), expected_counts)

    indptr, indices, last = device.to_csr(batch_rows)
    expected_indptr, expected_indices = page_table.to_csr(seq_ids[order])
    np.testing.assert_array_equal(indptr.get(), expected_indptr)
    np.testing.assert_array_equal(indices.get(), expected_indices)
    assert last is None

    blocks = page_table.num_blocks(seq_ids[order]).astype(np.int64)
    tokens = np.maximum(blocks * block_size - rng.integers(0, block_size, size=order.size), 0)
    buffer = cupy.full(int(blocks.sum()) + 10, 12345, dtype=cupy.int32)
    indptr, indices, last = device.to_csr(batch_rows, cupy.asarray(tokens, dtype=cupy.int32),
                                          indices_out=buffer)
    pages = -(-tokens // block_size)
    np.testing.assert_array_equal(indptr.get(), np.concatenate([[0], np.cumsum(pages)]))
    np.testing.assert_array_equal(last.get(), np.where(pages > 0, tokens - (pages - 1) * block_size, 0))
    assert indices is buffer


def test_incremental_sync_follows_edits_across_streams():
    """Many syncs queued back to back, each followed by a query on the caller's stream:
    every query must see its own step's table (staging rotation and stream ordering)."""
    rng = np.random.default_rng(8)
    page_table = PageTable(16)
    seq_ids = np.arange(300, dtype=np.int64)
    lengths = rng.integers(1, 40, size=seq_ids.size)
    page_table.append_blocks(np.repeat(seq_ids, lengths), rng.integers(0, 10**6, size=lengths.sum()))
    device = gpu.DeviceBlockTable(page_table, 512, 128)
    rows = device.assign(seq_ids)
    device.sync()
    compute = cupy.cuda.Stream(non_blocking=True)
    snapshots, expected = [], []
    positions = cupy.asarray((page_table.num_blocks(seq_ids).astype(np.int64) - 1) * 16)
    cupy.cuda.get_current_stream().synchronize()  # compute does not wait for the null stream
    with compute:
        for step in range(40):
            growing = seq_ids[step % 16::16]
            page_table.append_blocks(growing, rng.integers(0, 10**6, size=growing.size))
            if step % 5 == 0:  # copy-on-write of a last block
                last = int(page_table.num_blocks([seq_ids[step]])[0]) - 1
                page_table.set_block(int(seq_ids[step]), last, 10**7 + step)
            stats = device.sync()
            assert stats.mode == "incremental"
            assert stats.bytes_uploaded <= 0.01 * stats.table_bytes
            last_positions = (page_table.num_blocks(seq_ids).astype(np.int64) - 1) * 16
            positions.set(last_positions)
            snapshots.append(device.slot_mapping(cupy.asarray(rows), positions))
            expected.append(page_table.slot_mapping(seq_ids, last_positions))
    compute.synchronize()
    for step, (got, want) in enumerate(zip(snapshots, expected)):
        np.testing.assert_array_equal(got.get(), want, err_msg=f"step {step}")
    table, row_lengths = expected_table(device, page_table, seq_ids, rows)
    np.testing.assert_array_equal(device.table.get(), table)
    np.testing.assert_array_equal(device.row_lengths.get(), row_lengths)


def test_release_reassign_and_invalidate():
    _, page_table, device, seq_ids, rows = make_table(16, 9)
    released = seq_ids[:20]
    device.release(released)
    for seq_id in released:
        page_table.remove_sequence(int(seq_id))
    page_table.append_blocks([777] * 5, [1, 2, 3, 4, 5])
    new_row = device.assign([777])
    edited = next(i for i in range(20, seq_ids.size) if page_table.num_blocks([seq_ids[i]])[0] > 1)
    page_table.set_block(int(seq_ids[edited]), 0, 424242)
    device.invalidate([seq_ids[edited]])
    device.sync()
    table = device.table.get()
    assert table[new_row[0]].tolist()[:6] == [1, 2, 3, 4, 5, PAD_SLOT_ID]
    assert table[rows[edited], 0] == 424242
    freed = [r for r in rows[:20] if r != new_row[0]]
    assert (table[freed] == PAD_SLOT_ID).all()
    assert (device.row_lengths.get()[freed] == 0).all()
    with pytest.raises(KeyError):
        device.rows_for([seq_ids[0]])


def test_full_upload_when_most_rows_change():
    rng, page_table, device, seq_ids, rows = make_table(16, 10)
    live = [s for s in seq_ids
            if s not in page_table or page_table.num_blocks([s])[0] < device.max_blocks_per_seq]
    page_table.append_blocks(live, rng.integers(0, 10**6, size=len(live)))
    device._full_upload_fraction = 0.001
    stats = device.sync()
    assert stats.mode == "full"
    table, lengths = expected_table(device, page_table, seq_ids, rows)
    np.testing.assert_array_equal(device.table.get(), table)
    np.testing.assert_array_equal(device.row_lengths.get(), lengths)
