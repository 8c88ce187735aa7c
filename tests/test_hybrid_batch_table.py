"""HybridKVCacheManager.batch_table: one BatchTable per group, rows kept in step."""

import numpy as np
import pytest

import pagetable
from pagetable import HybridKVCacheManager, KVCacheGroupSpec, PAD_SLOT_ID


def hybrid():
    return HybridKVCacheManager([KVCacheGroupSpec(256, 16), KVCacheGroupSpec(64, 8, sliding_window=32)])


def expected(h, bt, group):
    table = bt.groups[group]
    want = np.full(table.block_table.shape, PAD_SLOT_ID, dtype=np.int32)
    for r, seq in enumerate(table.seq_ids.tolist()):
        if seq >= 0 and seq in h:
            # The page table's listing: L blocks are L * k kernel blocks (docs/BATCH_TABLE.md).
            rows, counts = h.managers[group].page_table.block_table(
                [seq], kernel_block_size=table.kernel_block_size)
            want[r, :counts[0]] = rows[0, :counts[0]]
    return want


def test_every_group_follows_its_manager_through_a_serving_loop():
    rng = np.random.default_rng(3)
    h = hybrid()
    bt = h.batch_table(16, [64, 128], kernel_block_size=[8, None])
    assert bt.groups[0].kernel_block_size == 8 and bt.groups[0].width == 128
    live, next_id = [], 0
    for step in range(120):
        if len(live) < 12 and rng.random() < 0.3:
            n = int(rng.integers(1, 60))
            if h.can_admit(n).fits_now:
                h.add_sequences([next_id], num_tokens=[n])
                bt.add([next_id])
                live.append(next_id)
                next_id += 1
        if live and rng.random() < 0.1:
            done = live.pop(int(rng.integers(len(live))))
            h.free_sequence([done])
            bt.remove([done])
            if rng.random() < 0.5:
                bt.condense()
                assert set(np.flatnonzero(bt.seq_ids >= 0).tolist()) == set(range(len(live)))
        growing = [s for s in live if h.seq_lens([s])[0] < 700]
        if growing:
            try:
                h.append_tokens(growing, 1)
            except pagetable.OutOfBlocksError:
                pass
        bt.update()
        for g in range(2):
            np.testing.assert_array_equal(bt.groups[g].block_table, expected(h, bt, g), err_msg=f"step {step}")
        assert bt.groups[0].seq_ids.tolist() == bt.groups[1].seq_ids.tolist()
    assert next_id > 5


def test_a_row_too_long_in_one_group_changes_no_group():
    h = hybrid()
    h.add_sequences([0], num_tokens=[40])
    bt = h.batch_table(2, [8, 6])
    bt.add([0])
    assert bt.update() == (1, 1)
    h.append_tokens([0], 9)           # group 1 (block size 8): 7 entries, more than 6
    before = [t.block_table.copy() for t in bt.groups]
    with pytest.raises(ValueError, match="sequence 0 has"):
        bt.update()
    for table, old in zip(bt.groups, before):
        np.testing.assert_array_equal(table.block_table, old)


def test_per_group_arguments_are_checked():
    h = hybrid()
    with pytest.raises(ValueError, match="max_blocks_per_seq has 3 entries for 2 groups"):
        h.batch_table(4, [8, 8, 8])
    with pytest.raises(ValueError, match="kernel_block_size"):
        h.batch_table(4, 8, kernel_block_size=3)
    bt = h.batch_table(4, 8)
    bt.add([5])
    with pytest.raises(ValueError, match="already has a row"):
        bt.add([5])
    assert 5 in bt and len(bt) == 1 and bt.rows([5]).tolist() == [0]
    with pytest.raises(TypeError, match="batch_table"):
        pagetable.BatchTable(h, 4, 8)


# ---- BatchTable.slot_mapping: the step's slots from rows and positions -------------

@pytest.mark.parametrize("kernel_block_size", [None, 4, 1])
@pytest.mark.parametrize("row_dtype", [np.int32, np.int64])
def test_batch_slot_mapping_equals_the_page_tables(kernel_block_size, row_dtype):
    rng = np.random.default_rng(5)
    kv = pagetable.KVCacheManager(400, 16, sliding_window=40)
    ids = np.arange(12, dtype=np.int64)
    kv.add_sequences(ids, num_tokens=rng.integers(0, 90, ids.size))
    kv.append_tokens(ids, 30)                       # windows release their early blocks
    bt = pagetable.BatchTable(kv, 16, 16, kernel_block_size=kernel_block_size)
    bt.add(ids[::-1])
    bt.remove([3])
    bt.update()
    seqs = rng.choice(ids, 500)
    positions = rng.integers(-3, 140, 500)
    rows = np.where(seqs == 3, 12, 0)               # row 12 is free: all PAD
    rows[seqs != 3] = bt.rows(seqs[seqs != 3])
    expected = kv.page_table.slot_mapping(seqs, positions)
    expected[seqs == 3] = PAD_SLOT_ID
    got = bt.slot_mapping(rows.astype(row_dtype), positions)
    np.testing.assert_array_equal(got, expected)
    out = np.full(500, 7, dtype=np.int64)
    assert bt.slot_mapping(rows.astype(row_dtype), positions, out=out) is out
    np.testing.assert_array_equal(out, expected)
    alias = positions.copy()
    bt.slot_mapping(rows, alias, out=alias)         # out may overlap an input
    np.testing.assert_array_equal(alias, expected)


def test_batch_slot_mapping_argument_errors():
    kv = pagetable.KVCacheManager(16, 16)
    bt = pagetable.BatchTable(kv, 4, 4)
    with pytest.raises(IndexError, match=r"rows\[1\] = 4 is not a row"):
        bt.slot_mapping([0, 4], [0, 0])
    with pytest.raises(IndexError, match=r"rows\[0\] = -1"):
        bt.slot_mapping(np.array([-1], dtype=np.int32), [0])
    with pytest.raises(ValueError, match="same length"):
        bt.slot_mapping([0, 1], [0])
    with pytest.raises(TypeError, match="positions"):
        bt.slot_mapping([0], [0.5])
    with pytest.raises((TypeError, ValueError), match="out"):
        bt.slot_mapping([0], [0], out=np.empty(1, dtype=np.int32))
    assert bt.slot_mapping([], []).shape == (0,)
