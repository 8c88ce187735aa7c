"""Kernel block sizes and decode-context-parallel slot mappings (docs/HYBRID.md).

Every kernel-block export is held against the same export of a table built directly at
the kernel block size ``b``: manager block ``m`` is there the ``k = B // b`` blocks
``m*k .. m*k + k - 1``.  The DCP slot mapping is held against two plain models written
here: each rank storing its tokens in position order, and a kernel-block engine
indexing a rank-local kernel block table.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagetable import PAD_SLOT_ID, KVCacheManager, PageTable


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# (B, b) pairs: powers of two (the specialised splits k = 2, 4, 8, 16), odd and
# composite block sizes (the general loop), and b == B (k == 1).
TABLE_CASES = [(B, b) for B in (1, 3, 16, 24, 64) for b in divisors(B)]
MANAGER_CASES = [(B, b) for B in (1, 6, 16, 32, 64) for b in divisors(B)]


def case_id(case):
    return f"B{case[0]}-b{case[1]}"


# ------------------------------------------------------------------ models


def kernel_row(blocks, k, count=None):
    """A row of blocks as kernel blocks: m -> m*k .. m*k + k - 1, PAD -> k PADs."""
    row = [PAD_SLOT_ID if m == PAD_SLOT_ID else m * k + j for m in blocks for j in range(k)]
    return row if count is None else row[:count]


def table_at_kernel_size(rows, b, k):
    """A PageTable of block size ``b`` holding ``rows`` ({seq: kernel blocks}), built directly."""
    table = PageTable.with_block_size(b)
    for seq, row in rows.items():
        if row:
            table.append_blocks(np.full(len(row), seq), row)
    return table


def random_table(B, seed, num_sequences=30, max_blocks=12, high=1 << 20):
    rng = np.random.default_rng(seed)
    table = PageTable(B)
    rows = {}
    for seq in rng.choice(1 << 40, size=num_sequences, replace=False).tolist():
        length = int(rng.integers(1, max_blocks + 1))
        blocks = rng.integers(0, high, size=length).tolist()
        table.append_blocks(np.full(length, seq), blocks)
        rows[seq] = blocks
    return table, rows, rng


def random_manager(B, seed, num_sequences=24, max_tokens=200):
    """A manager after prefills, decode steps, forks and frees (shared and moved blocks)."""
    rng = np.random.default_rng(seed)
    manager = KVCacheManager(num_sequences * 2 * (max_tokens // B + 4) + 16, B)
    for seq in range(num_sequences):
        manager.add_sequence(seq, int(rng.integers(0, max_tokens)))
    live = list(range(num_sequences))
    for parent in live[:4]:
        manager.fork(parent, 1000 + parent)
    live += [1000 + parent for parent in live[:4]]
    for _ in range(3):
        manager.append_tokens(live, rng.integers(0, B + 2, size=len(live)))
    manager.free_sequence(live[5:8])
    live = live[:5] + live[8:]
    manager.add_sequence(500, 0)               # a sequence holding no token
    live.append(500)
    rng.shuffle(live)
    return manager, np.array(live, dtype=np.int64)


# ------------------------------------------------------------------ PageTable


@pytest.mark.parametrize("case", TABLE_CASES, ids=case_id)
def test_table_exports_equal_a_table_built_at_the_kernel_block_size(case):
    B, b = case
    k = B // b
    table, rows, rng = random_table(B, seed=B * 100 + b)
    direct = table_at_kernel_size({s: kernel_row(r, k) for s, r in rows.items()}, b, k)
    batch = list(rows)
    rng.shuffle(batch)
    batch = batch[:20] + batch[:3]          # repeats are allowed
    got, got_lengths = table.block_table(batch, kernel_block_size=b)
    want, want_lengths = direct.block_table(batch)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_lengths, want_lengths)
    assert got.dtype == np.int32 and got_lengths.dtype == np.int32
    indptr, indices = table.to_csr(batch, kernel_block_size=b)
    want_indptr, want_indices = direct.to_csr(batch)
    np.testing.assert_array_equal(indptr, want_indptr)
    np.testing.assert_array_equal(indices, want_indices)
    assert indptr.dtype == np.int32 and indices.dtype == np.int32
    # Slots need no conversion: m*B + o == (m*k + o//b)*b + o%b.
    seqs = np.repeat(batch, 5)
    positions = rng.integers(0, 12 * B, size=seqs.size)
    np.testing.assert_array_equal(table.slot_mapping(seqs, positions),
                                  direct.slot_mapping(seqs, positions))


@pytest.mark.parametrize("case", TABLE_CASES, ids=case_id)
def test_table_block_table_into_out_pads_the_extra_width(case):
    B, b = case
    k = B // b
    table, rows, _ = random_table(B, seed=7 + B + b, num_sequences=6)
    batch = list(rows)
    width = max(len(r) for r in rows.values()) * k
    out = np.full((len(batch), width + 3), 12345, dtype=np.int32)
    result, lengths = table.block_table(batch, out=out, kernel_block_size=b)
    assert result is out
    for i, seq in enumerate(batch):
        row = kernel_row(rows[seq], k)
        assert out[i, :len(row)].tolist() == row
        assert (out[i, len(row):] == PAD_SLOT_ID).all()
        assert lengths[i] == len(row)
    narrow = np.full((len(batch), width - 1), 7, dtype=np.int32)
    with pytest.raises(ValueError, match=f"has {width} {'kernel ' if k > 1 else ''}blocks"):
        table.block_table(batch, out=narrow, kernel_block_size=b)
    assert (narrow == 7).all()


def test_table_plain_exports_are_unchanged_without_kernel_block_size():
    table, rows, _ = random_table(16, seed=3)
    batch = list(rows)
    got, lengths = table.block_table(batch)
    for i, seq in enumerate(batch):
        assert got[i, :lengths[i]].tolist() == rows[seq]
    indptr, indices = table.to_csr(batch)
    assert indices.tolist() == [m for seq in batch for m in rows[seq]]
    same, _ = table.block_table(batch, kernel_block_size=None)
    np.testing.assert_array_equal(same, got)


def test_table_empty_batch_and_rows():
    table = PageTable(16)
    table.append_blocks([5, 5], [1, 2])
    got, lengths = table.block_table([], kernel_block_size=4)
    assert got.shape == (0, 0) and lengths.shape == (0,)
    indptr, indices = table.to_csr([], kernel_block_size=4)
    assert indptr.tolist() == [0] and indices.size == 0
    indptr, indices = table.to_csr([5, 5], kernel_block_size=8)
    assert indptr.tolist() == [0, 4, 8]
    assert indices.tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


def test_table_cannot_hold_a_padded_entry():
    # PAD on the table side cannot be tested: set_block and append_blocks take block
    # ids 0 .. 2**31 - 1 only.  The manager's released entries (sliding windows) are
    # tested below once they exist.
    table = PageTable(16)
    table.append_blocks([1], [4])
    with pytest.raises(ValueError):
        table.set_block(1, 0, PAD_SLOT_ID)
    assert table.get_sequence_blocks(1).tolist() == [4]


def test_table_kernel_block_id_past_int32_raises_and_writes_nothing():
    table = PageTable(16)
    table.append_blocks([1, 2, 2], [3, 5, 2**31 // 4])     # 2**29 * 4 + 3 > INT32_MAX
    out = np.full((2, 8), 9, dtype=np.int32)
    with pytest.raises(OverflowError, match="seq_ids\\[1\\]"):
        table.block_table([1, 2], out=out, kernel_block_size=4)
    assert (out == 9).all()
    with pytest.raises(OverflowError, match="int32"):
        table.to_csr([1, 2], kernel_block_size=4)
    # The largest block that still fits.
    table.append_blocks([3], [2**31 // 4 - 1])
    assert table.to_csr([3], kernel_block_size=4)[1].tolist() == [2**31 - 4 + j for j in range(4)]
    # k == 1 never overflows.
    assert table.block_table([2], kernel_block_size=16)[0].tolist() == [[5, 2**31 // 4]]


BAD_KERNEL_SIZES = [(0, ValueError), (-4, ValueError), (3, ValueError), (32, ValueError),
                    (2**70, ValueError), (True, TypeError), (4.0, TypeError), ("4", TypeError)]


@pytest.mark.parametrize("bad, exc", BAD_KERNEL_SIZES, ids=repr)
def test_table_bad_kernel_block_size_raises_and_changes_nothing(bad, exc):
    table, rows, _ = random_table(16, seed=11, num_sequences=4)
    before = table.copy()
    batch = list(rows)
    out = np.full((len(batch), 64), 5, dtype=np.int32)
    with pytest.raises(exc, match="kernel_block_size"):
        table.block_table(batch, out=out, kernel_block_size=bad)
    with pytest.raises(exc, match="kernel_block_size"):
        table.to_csr(batch, kernel_block_size=bad)
    assert (out == 5).all()
    assert table == before
    assert all(table.get_sequence_blocks(s).tolist() == r for s, r in rows.items())


def test_table_numpy_integer_kernel_block_size_is_accepted():
    table, rows, _ = random_table(16, seed=2, num_sequences=3)
    batch = list(rows)
    np.testing.assert_array_equal(table.block_table(batch, kernel_block_size=np.int64(4))[0],
                                  table.block_table(batch, kernel_block_size=4)[0])


# ------------------------------------------------------------------ KVCacheManager


def manager_direct_table(manager, ids, b):
    """The manager's rows at block size ``b``: ceil(c / b) kernel blocks per sequence."""
    k = manager.block_size // b
    rows = {}
    for seq, c in zip(ids.tolist(), manager.seq_lens(ids).tolist()):
        blocks = manager.page_table.get_sequence_blocks(seq).tolist()
        rows[seq] = kernel_row(blocks, k, -(-c // b))
    return table_at_kernel_size(rows, b, k)


def direct_block_table(direct, batch):
    """``direct.block_table(batch)``, where a sequence without blocks (0 tokens) is a PAD row."""
    held = [seq for seq in batch if seq in direct]
    rows, counts = direct.block_table(held)
    table = np.full((len(batch), rows.shape[1]), PAD_SLOT_ID, dtype=np.int32)
    table[[i for i, seq in enumerate(batch) if seq in direct]] = rows
    return table


@pytest.mark.parametrize("case", MANAGER_CASES, ids=case_id)
def test_manager_exports_equal_a_table_built_at_the_kernel_block_size(case):
    B, b = case
    manager, ids = random_manager(B, seed=B * 31 + b)
    batch = np.concatenate([ids, ids[:2]])            # repeats are allowed
    lengths = manager.seq_lens(batch).astype(np.int64)
    assert (lengths == 0).any() and (B == 1 or (lengths % B != 0).any())   # edge cases occur
    direct = manager_direct_table(manager, batch, b)
    table = manager.block_table(batch, kernel_block_size=b)
    np.testing.assert_array_equal(table, direct_block_table(direct, batch.tolist()))
    assert table.dtype == np.int32
    counts = -(-lengths // b)
    assert table.shape == (batch.size, counts.max())
    indptr, indices, last = manager.flashinfer_layout(batch, kernel_block_size=b)
    want_indptr, want_indices = direct.to_csr([seq for seq in batch.tolist() if seq in direct])
    np.testing.assert_array_equal(np.diff(indptr), counts)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(last, np.where(lengths > 0, (lengths - 1) % b + 1, 0))
    assert indptr.dtype == indices.dtype == last.dtype == np.int32
    # The kernel's view of each token is the manager's slot.
    for i, seq in enumerate(batch.tolist()):
        c = int(lengths[i])
        kernel = [int(table[i, p // b]) * b + p % b for p in range(c)]
        assert manager.slot_mapping([seq], c).tolist() == kernel


def test_manager_exports_match_a_manager_built_at_the_kernel_block_size():
    # The same sequences in a manager of block size b: the same page counts, last page
    # lengths and padding (block ids differ: each pool hands out its own).
    B, b = 64, 16
    big, small = KVCacheManager(64, B), KVCacheManager(256, b)
    lengths = [1, 16, 17, 63, 64, 65, 200, 0]
    for seq, c in enumerate(lengths):
        big.add_sequence(seq, c)
        small.add_sequence(seq, c)
    ids = list(range(len(lengths)))
    big_layout = big.flashinfer_layout(ids, kernel_block_size=b)
    small_layout = small.flashinfer_layout(ids)
    np.testing.assert_array_equal(big_layout[0], small_layout[0])
    np.testing.assert_array_equal(big_layout[2], small_layout[2])
    np.testing.assert_array_equal(big.block_table(ids, kernel_block_size=b) == PAD_SLOT_ID,
                                  small.block_table(ids) == PAD_SLOT_ID)


def test_manager_plain_exports_are_unchanged_without_kernel_block_size():
    manager, ids = random_manager(16, seed=5)
    table = manager.block_table(ids)
    for i, seq in enumerate(ids.tolist()):
        blocks = manager.page_table.get_sequence_blocks(seq).tolist()
        assert table[i, :len(blocks)].tolist() == blocks
        assert (table[i, len(blocks):] == PAD_SLOT_ID).all()
    np.testing.assert_array_equal(manager.block_table(ids, kernel_block_size=None), table)
    plain = manager.flashinfer_layout(ids)
    for got, want in zip(manager.flashinfer_layout(ids, kernel_block_size=None), plain):
        np.testing.assert_array_equal(got, want)
    # b == B lists the same blocks.
    np.testing.assert_array_equal(manager.block_table(ids, kernel_block_size=16), table)


@pytest.mark.parametrize("bad, exc", BAD_KERNEL_SIZES, ids=repr)
def test_manager_bad_kernel_block_size_raises_and_changes_nothing(bad, exc):
    manager, ids = random_manager(16, seed=9)
    state = manager.copy()
    for call in (lambda: manager.block_table(ids, kernel_block_size=bad),
                 lambda: manager.flashinfer_layout(ids, kernel_block_size=bad),
                 lambda: manager.slot_mapping(ids, kernel_block_size=bad)):
        with pytest.raises(exc, match="kernel_block_size"):
            call()
    assert manager == state
    manager.check()


def test_manager_unknown_sequence_raises_with_kernel_block_size():
    manager, ids = random_manager(16, seed=1)
    for call in (manager.block_table, manager.flashinfer_layout):
        with pytest.raises(KeyError):
            call([int(ids[0]), 99999], kernel_block_size=4)
    with pytest.raises(KeyError):
        manager.slot_mapping([99999])


def _sliding_window_manager(B):
    try:
        return KVCacheManager(64, B, sliding_window=2 * B)
    except TypeError:
        pytest.skip("KVCacheManager has no sliding_window yet: released (PAD) entries "
                    "cannot be made on the manager side")


@pytest.mark.parametrize("case", [(16, 4), (16, 16), (32, 8), (24, 6)], ids=case_id)
def test_manager_released_entries_become_k_padded_kernel_blocks(case):
    B, b = case
    k = B // b
    manager = _sliding_window_manager(B)
    manager.add_sequence(0, 3 * B)
    manager.append_tokens([0], 2 * B)         # releases the blocks before the window
    blocks = manager.page_table.get_sequence_blocks(0).tolist()
    assert PAD_SLOT_ID in blocks
    c = int(manager.seq_lens([0])[0])
    want = kernel_row(blocks, k, -(-c // b))
    assert manager.block_table([0], kernel_block_size=b)[0].tolist() == want
    indptr, indices, _ = manager.flashinfer_layout([0], kernel_block_size=b)
    assert indices.tolist() == want
    slots = manager.slot_mapping([0], c)
    for p in range(c):
        assert (slots[p] == PAD_SLOT_ID) == (blocks[p // B] == PAD_SLOT_ID)


# ------------------------------------------------------------------ decode context parallel


def rank_model(blocks, c, B, world, interleave, rank):
    """Slots of positions 0 .. c-1 as rank ``rank`` stores them (PAD elsewhere).

    The rank keeps its tokens in position order; its ``j``-th token (rank-local
    position ``j``) sits at local offset ``j % (B / W)`` of the rank's share of the
    manager block of position ``p``.
    """
    local = B // world
    slots, j = [], 0
    for p in range(c):
        if (p // interleave) % world != rank:
            slots.append(PAD_SLOT_ID)
            continue
        m = blocks[p // B]
        assert j // local == p // B           # each block gives every rank B / W tokens
        slots.append(PAD_SLOT_ID if m == PAD_SLOT_ID else m * local + j % local)
        j += 1
    return slots


def kernel_engine_model(blocks, c, B, world, interleave, rank, b, column_block_size=None):
    """Slots as a kernel-block engine computes them on rank ``rank``.

    The rank's kernel block table lists manager block ``m`` as ``m*k .. m*k + k - 1``
    with ``k = B / W / b``; rank-local position ``j`` is at
    ``table[j // b] * b + j % b``.  ``column_block_size`` replaces ``b`` in the column
    index only: vLLM #51031 indexed the kernel table with the manager's per-rank
    block size ``B / W`` there.
    """
    k = B // world // b
    table = kernel_row(blocks, k)
    column = b if column_block_size is None else column_block_size
    slots, j = [], 0
    for p in range(c):
        if (p // interleave) % world != rank:
            slots.append(PAD_SLOT_ID)
            continue
        entry = table[j // column]
        slots.append(PAD_SLOT_ID if entry == PAD_SLOT_ID else entry * b + j % b)
        j += 1
    return slots


def dcp_manager(B, seed=0):
    rng = np.random.default_rng(seed)
    manager = KVCacheManager(200, B)
    lengths = [1, B - 1, B, B + 1, 3 * B + B // 2] + rng.integers(1, 5 * B, size=3).tolist()
    for seq, c in enumerate(lengths):
        manager.add_sequence(seq, c)
    # Shuffle the pool a little: free one and grow the rest, so blocks are not in order.
    manager.free_sequence([1])
    ids = [0, 2, 3, 4, 5, 6, 7]
    manager.append_tokens(ids, rng.integers(0, B, size=len(ids)))
    return manager, np.array(ids, dtype=np.int64)


DCP_GRID = [(B, world, interleave)
            for B in (16, 32, 64) for world in (1, 2, 4, 8) for interleave in (1, 2, 4, 8, 16)
            if B % (world * interleave) == 0]


@pytest.mark.parametrize("B, world, interleave", DCP_GRID,
                         ids=[f"B{B}-W{w}-I{i}" for B, w, i in DCP_GRID])
def test_dcp_slot_mapping_matches_both_models(B, world, interleave):
    manager, ids = dcp_manager(B, seed=B + world + interleave)
    lengths = manager.seq_lens(ids).tolist()
    rows = {seq: manager.page_table.get_sequence_blocks(seq).tolist() for seq in ids.tolist()}
    for rank in range(world):
        got_all = {}
        for b in divisors(B // world):
            got = manager.slot_mapping(ids, np.array(lengths), dcp_world_size=world,
                                       dcp_rank=rank, interleave=interleave, kernel_block_size=b)
            assert got.dtype == np.int64
            at = 0
            for seq, c in zip(ids.tolist(), lengths):
                want = rank_model(rows[seq], c, B, world, interleave, rank)
                engine = kernel_engine_model(rows[seq], c, B, world, interleave, rank, b)
                assert want == engine
                assert got[at:at + c].tolist() == want
                at += c
            got_all[b] = got
        # kernel_block_size is checked only: every b gives the same slots.
        for got in got_all.values():
            np.testing.assert_array_equal(got, got_all[1])
    # Every token is on exactly one rank, and no two tokens of the batch share a slot
    # on a rank.
    per_rank = [manager.slot_mapping(ids, np.array(lengths), dcp_world_size=world, dcp_rank=r,
                                     interleave=interleave) for r in range(world)]
    stacked = np.stack(per_rank)
    assert ((stacked != PAD_SLOT_ID).sum(axis=0) == 1).all()
    for slots in per_rank:
        mine = slots[slots != PAD_SLOT_ID]
        assert np.unique(mine).size == mine.size
        assert mine.max(initial=0) < manager.num_blocks * (B // world)


def test_dcp_regression_vllm_51031_kernel_table_indexed_with_kernel_block_size():
    # B = 64 over 2 ranks, kernel blocks of 16: each rank holds 32 tokens of a block,
    # as 2 kernel blocks.  Indexing the kernel table with 32 (the manager's per-rank
    # block size) instead of 16 sends the rank's tokens 16 .. 31 of every block to the
    # wrong kernel block.
    B, world, b = 64, 2, 16
    manager = KVCacheManager(32, B)
    manager.add_sequence(0, 7)                 # takes block 0
    manager.add_sequence(1, 3 * B)             # blocks 1, 2, 3
    c = 3 * B
    blocks = manager.page_table.get_sequence_blocks(1).tolist()
    for rank in range(world):
        ours = manager.slot_mapping([1], c, dcp_world_size=world, dcp_rank=rank,
                                    kernel_block_size=b).tolist()
        right = kernel_engine_model(blocks, c, B, world, 1, rank, b)
        wrong = kernel_engine_model(blocks, c, B, world, 1, rank, b, column_block_size=B // world)
        assert ours == right == rank_model(blocks, c, B, world, 1, rank)
        assert ours != wrong
        # The rank's first b tokens agree (column 0 either way); its next ones do not.
        mine = [p for p in range(c) if ours[p] != PAD_SLOT_ID]
        assert [ours[p] for p in mine[:b]] == [wrong[p] for p in mine[:b]]
        assert ours[mine[b]] != wrong[mine[b]]
        # With kernel blocks as large as the rank's share of a block the two agree.
        assert manager.slot_mapping([1], c, dcp_world_size=world, dcp_rank=rank,
                                    kernel_block_size=B // world).tolist() == \
            kernel_engine_model(blocks, c, B, world, 1, rank, B // world, column_block_size=B // world)


@pytest.mark.parametrize("B", [16, 24, 64])
def test_slot_mapping_without_dcp_equals_the_slots_append_tokens_returned(B):
    rng = np.random.default_rng(B)
    manager = KVCacheManager(400, B)
    ids = list(range(6))
    for seq in ids:
        c = int(rng.integers(0, 3 * B))
        written = manager.add_sequence(seq, c).slots
        np.testing.assert_array_equal(manager.slot_mapping([seq], c), written)
    manager.fork(0, 100)                       # the next step copies 0's shared last block
    ids.append(100)
    for _ in range(4):
        counts = rng.integers(0, B + 3, size=len(ids))
        step = manager.append_tokens(ids, counts).slots
        got = manager.slot_mapping(ids, counts)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, step)
    for seq in ids:
        c = int(manager.seq_lens([seq])[0])
        blocks = manager.page_table.get_sequence_blocks(seq).tolist()
        assert manager.slot_mapping([seq], c).tolist() == [blocks[p // B] * B + p % B
                                                           for p in range(c)]
    assert manager.slot_mapping(ids, 0).size == 0
    assert manager.slot_mapping([], 1).size == 0
    assert manager.slot_mapping(ids).tolist() == [int(manager.slot_mapping([s], 1)[0]) for s in ids]


@pytest.mark.parametrize("kwargs, name", [
    (dict(dcp_world_size=0), "dcp_world_size"),
    (dict(dcp_world_size=-2), "dcp_world_size"),
    (dict(dcp_world_size=True), "dcp_world_size"),
    (dict(dcp_world_size=2, dcp_rank=2), "dcp_rank"),
    (dict(dcp_world_size=2, dcp_rank=-1), "dcp_rank"),
    (dict(dcp_rank=1), "dcp_rank"),
    (dict(dcp_rank=1.0), "dcp_rank"),
    (dict(interleave=0), "interleave"),
    (dict(interleave="2"), "interleave"),
    (dict(dcp_world_size=3), "dcp_world_size \\* interleave"),
    (dict(dcp_world_size=4, interleave=8), "dcp_world_size \\* interleave"),
    (dict(interleave=32), "dcp_world_size \\* interleave"),
    (dict(dcp_world_size=2, kernel_block_size=16), "kernel_block_size"),
    (dict(dcp_world_size=4, kernel_block_size=3), "kernel_block_size"),
    (dict(num_tokens=-1), "num_tokens"),
    (dict(num_tokens=10**30), "num_tokens"),
    (dict(num_tokens=[1, 1]), "num_tokens"),
    (dict(num_tokens=[1, -1, 0]), "num_tokens"),
    (dict(num_tokens=[0, 0, 1000]), "num_tokens\\[2\\]"),
    (dict(num_tokens=1.5), "num_tokens"),
])
def test_dcp_bad_arguments_raise_naming_them_and_change_nothing(kwargs, name):
    B = 16
    manager = KVCacheManager(64, B)
    for seq, c in enumerate([5, 20, 33]):
        manager.add_sequence(seq, c)
    before = manager.copy()
    num_tokens = kwargs.pop("num_tokens", 1)
    with pytest.raises((ValueError, TypeError, OverflowError), match=name):
        manager.slot_mapping([0, 1, 2], num_tokens, **kwargs)
    assert manager == before
    manager.check()


def test_slot_mapping_counts_are_read_once():
    # The counts array is the caller's; the result depends only on the values at call time.
    manager = KVCacheManager(64, 16)
    manager.add_sequence(0, 20)
    counts = np.array([3])
    got = manager.slot_mapping([0], counts)
    counts[0] = 20
    assert got.tolist() == [17, 18, 19]


@st.composite
def dcp_cases(draw):
    B = draw(st.sampled_from([8, 16, 24, 32, 64]))
    world = draw(st.sampled_from([w for w in (1, 2, 3, 4, 8) if B % w == 0]))
    interleave = draw(st.sampled_from([i for i in divisors(B // world)]))
    rank = draw(st.integers(0, world - 1))
    b = draw(st.sampled_from(divisors(B // world)))
    lengths = draw(st.lists(st.integers(0, 4 * B), min_size=1, max_size=6))
    fractions = draw(st.lists(st.floats(0, 1), min_size=len(lengths), max_size=len(lengths)))
    order = draw(st.permutations(range(len(lengths))))
    return B, world, interleave, rank, b, lengths, fractions, order


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dcp_cases())
def test_dcp_property_slot_mapping_is_the_rank_model(case):
    B, world, interleave, rank, b, lengths, fractions, order = case
    manager = KVCacheManager(sum(-(-c // B) for c in lengths) + 1, B)
    for seq in order:                      # the pool is handed out in another order
        manager.add_sequence(seq, lengths[seq])
    ids = list(range(len(lengths)))
    counts = [int(f * c) for f, c in zip(fractions, lengths)]
    got = manager.slot_mapping(ids, counts, dcp_world_size=world, dcp_rank=rank,
                               interleave=interleave, kernel_block_size=b).tolist()
    want = []
    for seq, c, n in zip(ids, lengths, counts):
        blocks = manager.page_table.get_sequence_blocks(seq).tolist()
        model = rank_model(blocks, c, B, world, interleave, rank)
        assert model == kernel_engine_model(blocks, c, B, world, interleave, rank, b)
        want += model[c - n:]
    assert got == want


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(B, b) for B in (2, 6, 16, 64) for b in divisors(B)]),
       st.lists(st.lists(st.integers(0, 2**20), max_size=8), min_size=1, max_size=6))
def test_kernel_export_property(case, rows):
    B, b = case
    k = B // b
    table = PageTable(B)
    held = {}
    for seq, row in enumerate(rows):
        if row:
            table.append_blocks([seq] * len(row), row)
            held[seq] = row
    if not held:
        return
    direct = table_at_kernel_size({s: kernel_row(r, k) for s, r in held.items()}, b, k)
    batch = list(held)[::-1]
    for got, want in zip(table.block_table(batch, kernel_block_size=b), direct.block_table(batch)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(table.to_csr(batch, kernel_block_size=b), direct.to_csr(batch)):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------ reserved lookahead blocks (HYBRID.md)

@pytest.mark.parametrize("block_size, kernel", [(16, 4), (32, 16), (8, 8)])
def test_kernel_exports_list_the_reserved_draft_positions(block_size, kernel):
    """Reserved draft blocks are listed in the dense tables (a drafter writes there),
    as many kernel blocks as a manager at the kernel block size needs for them;
    FlashInfer's pages are those of the committed tokens (its page count and last
    page length give the length)."""
    rng = np.random.default_rng(3)
    big = KVCacheManager(400, block_size)
    small = KVCacheManager(400 * (block_size // kernel), kernel)
    lengths = rng.integers(1, 60, 6)
    for seq, n in enumerate(lengths.tolist()):
        big.add_sequence(seq, n)
        small.add_sequence(seq, n)
    ids = np.arange(6)
    for step in range(5):
        drafts = int(rng.integers(0, 7))
        a = big.append_tokens(ids, 1, num_lookahead=drafts)
        small.append_tokens(ids, 1, num_lookahead=drafts)
        dense = big.block_table(ids, kernel_block_size=kernel)
        native = small.block_table(ids)
        # The manager at the kernel size holds ceil((c + K) / b) blocks: the same count.
        assert dense.shape[1] == max(-(-(int(c) + drafts) // kernel) for c in big.seq_lens(ids))
        for i, seq in enumerate(ids):
            count = -(-(int(big.seq_lens([seq])[0]) + drafts) // kernel)
            row = dense[i, :count]
            assert (row >= 0).all() and (dense[i, count:] == -1).all()
            # Every lookahead slot lies in a kernel block the dense table lists.
            la = a.lookahead_slots[i * drafts:(i + 1) * drafts]
            assert set((la // kernel).tolist()) <= set(row.tolist())
        # A manager at the kernel size keeps blocks an earlier, longer lookahead
        # reserved; the split lists exactly the kernel blocks this call's drafts need.
        assert native.shape[1] >= dense.shape[1]
        indptr, indices, last = big.flashinfer_layout(ids, kernel_block_size=kernel)
        lens = big.seq_lens(ids)
        np.testing.assert_array_equal(np.diff(indptr), -(-lens // kernel))
        np.testing.assert_array_equal((np.diff(indptr) - 1) * kernel + last, lens)
        plain_indptr, _, plain_last = big.flashinfer_layout(ids)
        np.testing.assert_array_equal((np.diff(plain_indptr) - 1) * block_size + plain_last, lens)
        big.check()
    big.rollback(ids, 1)
    assert big.block_table(ids, kernel_block_size=kernel).shape[1] == max(
        -(-int(c) // kernel) for c in big.seq_lens(ids))
