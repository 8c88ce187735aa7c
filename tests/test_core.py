"""The Cython PageTable held against the reference model, method by method."""

import copy
import pickle

import numpy as np
import pytest

from conftest import build_random, run_racing, snapshot
from pagetable import PAD_SLOT_ID, PageTable
from pagetable.reference import ReferencePageTable


def random_queries(rng, seq_ids, block_size, n=2000, grouped=True):
    known = seq_ids if len(seq_ids) else np.array([1], dtype=np.int64)
    unknown = rng.integers(0, 2**63 - 1, size=8)
    pool = np.concatenate([known, unknown])
    if grouped:
        runs = rng.choice(pool, size=n // 20 + 1)
        queries = np.repeat(runs, 20)[:n]
    else:
        queries = rng.choice(pool, size=n)
    positions = rng.integers(-3 * block_size, 45 * block_size, size=n)
    positions[:3] = [2**62, 2**63 - 1, -(2**63)]
    return queries.astype(np.int64), positions.astype(np.int64)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "interleaved"])
def test_slot_mapping_matches_reference(block_size, grouped):
    pt, ref, seq_ids, rng = build_random(block_size)
    queries, positions = random_queries(rng, seq_ids, block_size, grouped=grouped)
    got = pt.slot_mapping(queries, positions)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref.slot_mapping(queries, positions))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "interleaved"])
def test_lookup_matches_reference(block_size, grouped):
    pt, ref, seq_ids, rng = build_random(block_size, seed=1)
    queries, positions = random_queries(rng, seq_ids, block_size, grouped=grouped)
    blocks, offsets = pt.lookup(queries, positions)
    ref_blocks, ref_offsets = ref.lookup(queries, positions)
    assert blocks.dtype == np.int32 and offsets.dtype == np.int32
    np.testing.assert_array_equal(blocks, ref_blocks)
    np.testing.assert_array_equal(offsets, ref_offsets)


def test_batched_equals_one_at_a_time(block_size):
    pt, _, seq_ids, rng = build_random(block_size, seed=2)
    queries, positions = random_queries(rng, seq_ids, block_size, n=500, grouped=False)
    positions = np.clip(positions, 0, None)
    slots = pt.slot_mapping(queries, positions)
    for s, p, slot in zip(queries.tolist(), positions.tolist(), slots.tolist()):
        found = pt.get_block_for_position(s, p)
        expected = PAD_SLOT_ID if found is None else found[0] * block_size + found[1]
        assert slot == expected


def test_large_batch_parallel_path_matches_reference():
    # Over the OpenMP threshold, tokens grouped and then shuffled.
    pt, ref, seq_ids, rng = build_random(16, num_sequences=500, max_blocks=60, seed=3)
    lengths = pt.num_blocks(seq_ids)
    queries = np.repeat(seq_ids, lengths * 16)
    positions = np.concatenate([np.arange(n * 16) for n in lengths.tolist()])
    assert queries.shape[0] > 131072   # the parallel threshold in _table.pyx
    expected = ref.slot_mapping(queries[::37], positions[::37])
    got = pt.slot_mapping(queries, positions)
    np.testing.assert_array_equal(got[::37], expected)
    assert (got >= 0).all()
    perm = rng.permutation(queries.shape[0])
    np.testing.assert_array_equal(pt.slot_mapping(queries[perm], positions[perm]), got[perm])


def test_row_hints_give_the_same_results_right_stale_or_wrong(block_size):
    pt, ref, seq_ids, rng = build_random(block_size, seed=11)
    rows = pt.rows(seq_ids)
    assert rows.dtype == np.int32 and len(set(rows.tolist())) == len(seq_ids)
    batch = rng.choice(seq_ids, size=400)
    positions = rng.integers(-2, 40 * block_size, size=400)
    hints = pt.rows(batch)
    expected = ref.slot_mapping(batch, positions)
    np.testing.assert_array_equal(pt.slot_mapping(batch, positions, rows=hints), expected)
    np.testing.assert_array_equal(pt.lookup(batch, positions, rows=hints)[0], ref.lookup(batch, positions)[0])
    # Wrong hints (another row, out of range, negative) are looked up instead.
    for wrong in (np.roll(hints, 1), hints + 10_000, np.full_like(hints, -1), hints[::-1].copy()):
        np.testing.assert_array_equal(pt.slot_mapping(batch, positions, rows=wrong), expected)
    # Stale hints: remove sequences, reuse their rows for new ones.
    gone = seq_ids[: len(seq_ids) // 2]
    for seq in gone.tolist():
        pt.remove_sequence(seq)
        ref.remove_sequence(seq)
    for i, seq in enumerate(gone.tolist()):
        pt.append_block(seq + 10**12, 1000 + i)
        ref.append_block(seq + 10**12, 1000 + i)
    np.testing.assert_array_equal(pt.slot_mapping(batch, positions, rows=hints),
                                  ref.slot_mapping(batch, positions))
    moved = batch + 10**12
    np.testing.assert_array_equal(pt.slot_mapping(moved, positions, rows=hints),
                                  ref.slot_mapping(moved, positions))
    # Hints survive growth and compaction of the pool (rows stay put).
    assert (pt.rows(seq_ids[len(seq_ids) // 2:]) == rows[len(seq_ids) // 2:]).all()


def test_slot_mapping_out_buffer():
    pt, ref, seq_ids, rng = build_random(16, seed=4)
    queries, positions = random_queries(rng, seq_ids, 16, n=300)
    out = np.zeros(300, dtype=np.int64)
    result = pt.slot_mapping(queries, positions, out=out)
    assert result is out
    np.testing.assert_array_equal(out, ref.slot_mapping(queries, positions))


def test_strict_raises_on_first_unmapped_and_leaves_out_alone():
    pt = PageTable()
    pt.append_blocks([1, 1], [4, 5])
    out = np.full(3, 77, dtype=np.int64)
    with pytest.raises(IndexError, match="entry 1"):
        pt.slot_mapping([1, 1, 2], [0, 32, 0], out=out, strict=True)
    assert out.tolist() == [77, 77, 77]
    with pytest.raises(IndexError, match="sequence 2"):
        pt.lookup([1, 2], [0, 0], strict=True)
    with pytest.raises(IndexError):
        pt.lookup([1], [-1], strict=True)
    np.testing.assert_array_equal(pt.slot_mapping([1, 1], [0, 31], strict=True), [64, 95])


def test_block_table_matches_reference(block_size):
    pt, ref, seq_ids, rng = build_random(block_size, seed=5)
    batch = rng.choice(seq_ids, size=30)
    table, num_blocks = pt.block_table(batch)
    ref_table, ref_num = ref.block_table(batch)
    assert table.dtype == np.int32 and num_blocks.dtype == np.int32
    np.testing.assert_array_equal(table, ref_table)
    np.testing.assert_array_equal(num_blocks, ref_num)


def test_block_table_out_buffer_wider_than_needed():
    pt = PageTable()
    pt.append_blocks([1, 1, 2], [7, 8, 9])
    out = np.zeros((2, 5), dtype=np.int32)
    table, num_blocks = pt.block_table([2, 1], out=out)
    assert table is out
    assert out.tolist() == [[9, -1, -1, -1, -1], [7, 8, -1, -1, -1]]
    assert num_blocks.tolist() == [1, 2]
    with pytest.raises(ValueError, match="wide"):
        pt.block_table([1], out=np.zeros((1, 1), dtype=np.int32))


def test_block_table_and_csr_of_empty_batch():
    pt = PageTable()
    table, num_blocks = pt.block_table([])
    assert table.shape == (0, 0) and num_blocks.shape == (0,)
    indptr, indices = pt.to_csr([])
    assert indptr.tolist() == [0] and indices.shape == (0,)
    assert pt.slot_mapping([], []).shape == (0,)


def test_to_csr_matches_reference(block_size):
    pt, ref, seq_ids, rng = build_random(block_size, seed=6)
    batch = rng.choice(seq_ids, size=25)
    indptr, indices = pt.to_csr(batch)
    ref_indptr, ref_indices = ref.to_csr(batch)
    assert indptr.dtype == np.int32 and indices.dtype == np.int32
    np.testing.assert_array_equal(indptr, ref_indptr)
    np.testing.assert_array_equal(indices, ref_indices)


def test_unknown_sequence_in_block_table_and_csr_raises_key_error():
    pt = PageTable()
    pt.append_block(1, 1)
    with pytest.raises(KeyError, match="42"):
        pt.block_table([1, 42])
    with pytest.raises(KeyError, match="42"):
        pt.to_csr([42])
    with pytest.raises(KeyError):
        pt.num_blocks([1, 42])


def test_append_blocks_equals_append_block_loop(block_size):
    rng = np.random.default_rng(7)
    seqs = rng.integers(0, 20, size=3000)
    blocks = rng.integers(0, 2**31 - 1, size=3000)
    fast = PageTable(block_size)
    slow = PageTable(block_size)
    fast.append_blocks(seqs, blocks)
    for s, b in zip(seqs.tolist(), blocks.tolist()):
        slow.append_block(s, b)
    assert fast == slow
    fast._check_invariants()
    slow._check_invariants()


def test_input_dtypes_and_views(block_size):
    pt, ref, seq_ids, rng = build_random(block_size, seed=8)
    queries, positions = random_queries(rng, seq_ids, block_size, n=400)
    positions = np.clip(positions, -100, 2**31 - 1)
    expected = ref.slot_mapping(queries, positions)
    np.testing.assert_array_equal(pt.slot_mapping(queries.tolist(), positions.tolist()), expected)
    np.testing.assert_array_equal(pt.slot_mapping(queries.astype(np.uint64), positions.astype(np.int32)), expected)
    wide_q = np.empty(800, dtype=np.int64)
    wide_q[::2] = queries
    wide_p = np.empty(800, dtype=np.int64)
    wide_p[::2] = positions
    np.testing.assert_array_equal(pt.slot_mapping(wide_q[::2], wide_p[::2]), expected)
    readonly = queries.copy()
    readonly.setflags(write=False)
    np.testing.assert_array_equal(pt.slot_mapping(readonly, positions), expected)
    small = PageTable(block_size)
    small.append_blocks(np.array([3, 3], dtype=np.int8), np.array([1, 2], dtype=np.uint16))
    assert small.get_sequence_blocks(3).tolist() == [1, 2]


def test_get_sequence_blocks_is_a_copy():
    pt = PageTable()
    pt.append_blocks([1, 1], [5, 6])
    blocks = pt.get_sequence_blocks(1)
    blocks[0] = 99
    assert pt.get_sequence_blocks(1).tolist() == [5, 6]
    pt.append_block(1, 7)
    pt.set_block(1, 1, 60)
    assert blocks.tolist() == [99, 6]


def test_python_protocol():
    pt = PageTable(8)
    for seq in [5, 3, 9]:
        pt.append_block(seq, seq * 10)
    assert list(pt) == [5, 3, 9]
    assert 3 in pt and 4 not in pt and -1 not in pt and "x" not in pt and 2**70 not in pt
    assert np.int64(9) in pt
    assert len(pt) == 3 == pt.num_sequences()
    pt.remove_sequence(3)
    pt.append_block(3, 1)
    assert list(pt) == [5, 9, 3]
    for clone in (pt.copy(), copy.copy(pt), copy.deepcopy(pt), pickle.loads(pickle.dumps(pt))):
        assert clone == pt and clone is not pt
        assert list(clone) == list(pt)
        assert clone.block_size == 8
        clone.append_block(5, 1)
        assert clone != pt
    assert PageTable(8) != PageTable(16)
    assert (PageTable() == object()) is False
    assert sorted(pt.sequence_ids().tolist()) == [3, 5, 9]


def test_equality_ignores_insertion_order():
    a, b = PageTable(), PageTable()
    a.append_blocks([1, 2], [10, 20])
    b.append_blocks([2, 1], [20, 10])
    assert a == b


def test_empty_sequences_survive_copy_and_pickle():
    pt = PageTable()
    pt.append_blocks([1, 2], [3, 4])
    # A sequence with no blocks can only come from forking an empty one; build it via fork.
    pt.append_block(7, 1)
    pt.remove_sequence(7)
    assert pt.copy() == pt


def test_fork_and_set_block():
    pt = PageTable()
    pt.append_blocks([1, 1, 1], [4, 5, 6])
    pt.fork_sequence(1, 2)
    assert pt.get_sequence_blocks(2).tolist() == [4, 5, 6]
    assert pt.set_block(2, 2, 9) == 6
    assert pt.get_sequence_blocks(1).tolist() == [4, 5, 6]
    assert pt.get_sequence_blocks(2).tolist() == [4, 5, 9]
    with pytest.raises(ValueError, match="child_id"):
        pt.fork_sequence(1, 2)
    with pytest.raises(KeyError):
        pt.fork_sequence(3, 4)
    with pytest.raises(IndexError, match="block_index"):
        pt.set_block(1, 3, 0)
    with pytest.raises(IndexError):
        pt.set_block(1, -1, 0)
    assert pt.num_blocks([1, 2]).tolist() == [3, 3]
    assert pt.total_blocks == 6
    pt._check_invariants()


def test_huge_and_extreme_ids():
    pt = PageTable()
    top = 2**63 - 1
    pt.append_block(top, 2**31 - 1)
    pt.append_block(0, 0)
    assert pt.get_block_for_position(top, 15) == (2**31 - 1, 15)
    assert pt.slot_mapping([top], [15]).tolist() == [(2**31 - 1) * 16 + 15]
    assert top in pt


def test_largest_block_size_slot_arithmetic_is_exact():
    size = 2**31 - 1
    pt = PageTable(size)
    pt.append_blocks([1, 1], [2**31 - 1, 5])
    pos = size + size - 1
    assert pt.slot_mapping([1], [pos]).tolist() == [5 * size + size - 1]
    assert pt.slot_mapping([1], [size - 1]).tolist() == [(2**31 - 1) * size + size - 1]
    assert pt.lookup([1], [pos])[1].tolist() == [size - 1]


def test_growth_relocation_and_compaction_keep_contents():
    rng = np.random.default_rng(9)
    pt = PageTable()
    ref = ReferencePageTable()
    for step in range(20000):
        seq = int(rng.integers(0, 300))
        if rng.random() < 0.02:
            a = pt.remove_sequence(seq)
            b = ref.remove_sequence(seq)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.tolist() == b.tolist()
        else:
            block = int(rng.integers(0, 1000))
            pt.append_block(seq, block)
            ref.append_block(seq, block)
    pt._check_invariants()
    assert len(pt) == len(ref)
    for seq, blocks in ref.sequences.items():
        assert pt.get_sequence_blocks(seq).tolist() == blocks
    stats = pt._memory_stats()
    assert stats["pool_tail"] - stats["pool_garbage"] <= 2 * pt.total_blocks + 8 * len(pt)


def test_removing_everything_resets_pool():
    pt = PageTable()
    pt.append_blocks(np.arange(1000) % 10, np.arange(1000))
    for s in range(10):
        pt.remove_sequence(s)
    assert len(pt) == 0 and pt.total_blocks == 0
    assert pt._memory_stats()["pool_tail"] == 0
    pt._check_invariants()


def test_many_sequences_hash_index():
    pt = PageTable()
    ids = np.random.default_rng(10).choice(2**62, size=20000, replace=False)
    pt.append_blocks(ids, np.arange(20000))
    np.testing.assert_array_equal(pt.slot_mapping(ids, np.zeros(20000, dtype=np.int64)), np.arange(20000) * 16)
    for s in ids[::2].tolist():
        pt.remove_sequence(s)
    np.testing.assert_array_equal(pt.slot_mapping(ids[1::2], np.zeros(10000, dtype=np.int64)),
                                  np.arange(1, 20000, 2) * 16)
    assert (pt.slot_mapping(ids[::2], np.zeros(10000, dtype=np.int64)) == PAD_SLOT_ID).all()
    pt._check_invariants()


@pytest.mark.parametrize("length", [2**21 - 5, 2**21 + 5], ids=["double-reciprocal", "integer-division"])
def test_non_power_of_two_division_is_exact_at_large_positions(length):
    # limit = length * block_size straddles 2**52, where the kernels switch from a
    # double-precision reciprocal to integer division.
    size = 2**31 - 1
    pt = PageTable(size)
    pt.append_blocks(np.zeros(length, dtype=np.int64), np.arange(length) % 1000)
    rng = np.random.default_rng(11)
    limit = length * size
    positions = np.concatenate([
        rng.integers(0, limit, size=5000),
        np.array([0, size - 1, size, limit - 1, limit, limit + 1, 2**52 - 1, 2**52, 2**52 + 1]),
        (np.arange(1, 200) * size)[:, None].ravel() + np.array([-1, 0, 1]).repeat(199)[:199],
    ]).astype(np.int64)
    seqs = np.zeros_like(positions)
    index = positions // size
    mapped = positions < limit
    expected = np.where(mapped, (np.where(mapped, index, 0) % 1000) * size + positions % size, PAD_SLOT_ID)
    np.testing.assert_array_equal(pt.slot_mapping(seqs, positions), expected)
    blocks, offsets = pt.lookup(seqs, positions)
    np.testing.assert_array_equal(blocks, np.where(mapped, index % 1000, PAD_SLOT_ID))
    np.testing.assert_array_equal(offsets, np.where(mapped, positions % size, PAD_SLOT_ID))


@pytest.mark.parametrize("block_size", [3, 7, 17, 1000, 65537])
def test_non_power_of_two_quotient_at_every_block_edge(block_size):
    pt = PageTable(block_size)
    pt.append_blocks(np.zeros(3000, dtype=np.int64), np.arange(3000))
    edges = (np.arange(1, 3001) * block_size)[:, None] + np.array([-1, 0, 1])
    positions = edges.ravel().astype(np.int64)
    slots = pt.slot_mapping(np.zeros_like(positions), positions)
    expected = np.where(positions < 3000 * block_size, positions, PAD_SLOT_ID)
    np.testing.assert_array_equal(slots, expected)


def test_versions_track_changes():
    pt = PageTable()
    pt.append_blocks([1, 1, 2], [10, 11, 20])
    v0, r0 = pt.versions([1, 2, 3])
    assert v0[2] == -1 and r0[2] == -1 and v0.dtype == np.int64
    pt.append_block(1, 12)
    v1, r1 = pt.versions([1, 2])
    assert v1[0] != v0[0] and v1[1] == v0[1] and r1[0] == r0[0]
    pt.set_block(1, 2, 99)              # the last block: an append-compatible change
    v2, r2 = pt.versions([1])
    assert v2[0] != v1[0] and r2[0] == r1[0]
    pt.set_block(1, 0, 98)              # further in: a mirror must rewrite the row
    v3, r3 = pt.versions([1])
    assert v3[0] != v2[0] and r3[0] != r2[0]
    pt.remove_sequence(2)
    pt.append_block(2, 20)
    v4, r4 = pt.versions([2])
    assert v4[0] != v0[1] and r4[0] != r0[1]
    with pytest.raises(ValueError, match="seq_ids"):
        pt.versions([-1])


def test_concurrent_reads_and_growth_never_crash():
    """Batched reads release the GIL; a writer in another thread must not move the
    storage under them (it gets RuntimeError instead), and nothing crashes."""
    import threading

    pt = PageTable(16)
    pt.append_blocks(np.repeat(np.arange(64), 64), np.arange(64 * 64))
    seqs = np.repeat(np.arange(64, dtype=np.int64), 4096)
    positions = np.tile(np.arange(4096, dtype=np.int64) % 1024, 64)
    expected = pt.slot_mapping(seqs, positions)
    stop = threading.Event()
    refused = []

    def writer():
        next_id = 1000
        while not stop.is_set():
            try:
                # New sequences grow the index, the row arrays and the pool.
                pt.append_blocks(np.full(300, next_id), np.arange(300))
                next_id += 1
            except RuntimeError as error:
                refused.append(str(error))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(20):
            np.testing.assert_array_equal(pt.slot_mapping(seqs, positions), expected)
            pt.block_table(np.arange(64))
            pt.to_csr(np.arange(64))
    finally:
        stop.set()
        thread.join()
    pt._check_invariants()
    assert all("another thread" in message for message in refused)


def test_concurrent_writers_take_turns_or_raise():
    """A change may let other threads run in its middle (allocating or freeing mapped
    memory releases the GIL).  A second change from another thread then raises
    RuntimeError and changes nothing; it never interleaves (this used to crash)."""
    import threading

    pt = PageTable(16)
    ref = ReferencePageTable(16)
    lock = threading.Lock()   # guards the reference only
    refused = []

    def writer(seed):
        rng = np.random.default_rng(seed)
        for step in range(12):
            # Many new ids: the index and row arrays grow into mapped memory.  Each
            # thread has ids of its own, so the order between threads cannot matter.
            seqs = rng.integers(0, 40_000, size=8_000) + seed * 100_000
            blocks = rng.integers(0, 2**31 - 1, size=8_000)
            try:
                if step % 4 == 3:
                    victim = int(seqs[0])
                    removed = pt.remove_sequence(victim)
                    with lock:
                        expected = ref.remove_sequence(victim)
                        assert (removed is None) == (expected is None)
                    continue
                pt.append_blocks(seqs, blocks)
            except RuntimeError as error:
                refused.append(str(error))
                continue
            with lock:
                ref.append_blocks(seqs, blocks)

    run_racing(writer)
    pt._check_invariants()
    assert all("another thread" in message for message in refused)
    assert pt.num_sequences() == len(ref.sequences)
    for seq in list(ref.sequences)[:2000]:
        np.testing.assert_array_equal(pt.get_sequence_blocks(seq), ref.get_sequence_blocks(seq))
