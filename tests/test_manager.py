"""KVCacheManager: growth, copy-on-write, freeing, layouts and the error contract.

Every test runs on the Cython manager and on the pure-Python reference, and a few
hold the two against each other on random workloads.
"""

import numpy as np
import pytest

from conftest import run_racing
from pagetable import AppendResult, KVCacheManager, OutOfBlocksError
from pagetable.reference import ReferenceKVCacheManager

BLOCK_SIZES = [1, 3, 16]
OUT_OF_BLOCKS = OutOfBlocksError


@pytest.fixture(params=[KVCacheManager, ReferenceKVCacheManager], ids=["cython", "reference"])
def make(request):
    return request.param


def snapshot(manager, seq_ids):
    """Everything observable about a manager holding ``seq_ids``."""
    indptr, indices, last = manager.flashinfer_layout(seq_ids)
    return (
        manager.num_free_blocks,
        manager.allocator.refcount(np.arange(manager.allocator.num_blocks)).tolist(),
        manager.seq_lens(seq_ids).tolist(),
        manager.block_table(seq_ids).tolist(),
        indptr.tolist(), indices.tolist(), last.tolist(),
        sorted(int(s) for s in seq_ids if s in manager),
    )


def expected_slots(manager, seq_id, start, stop):
    table = manager.block_table([seq_id])[0]
    bs = manager.block_size
    return [int(table[p // bs]) * bs + p % bs for p in range(start, stop)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_add_sequence_maps_every_token(make, block_size):
    manager = make(64, block_size)
    result = manager.add_sequence(7, 2 * block_size + 1)
    assert result.slots.dtype == np.int64 and result.copy_src.dtype == np.int32
    assert result.copy_dst.dtype == np.int32 and result.copy_src.size == 0
    assert result.slots.tolist() == list(range(2 * block_size + 1))  # blocks 0, 1, 2
    assert manager.seq_lens([7]).tolist() == [2 * block_size + 1]
    assert manager.block_table([7]).tolist() == [[0, 1, 2]]
    assert manager.num_free_blocks == 61
    assert manager.usage == pytest.approx(3 / 64)
    assert 7 in manager and 8 not in manager and len(manager) == 1
    manager.check()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_steps_cross_block_boundaries(make, block_size):
    manager = make(64, block_size)
    manager.add_sequence(1, block_size - 1)
    manager.add_sequence(2, 1)
    for step in range(3 * block_size):
        before = manager.seq_lens([1, 2]).tolist()
        result = manager.append_tokens([1, 2])
        assert result.slots.tolist() == (
            expected_slots(manager, 1, before[0], before[0] + 1)
            + expected_slots(manager, 2, before[1], before[1] + 1)
        )
        assert result.copy_src.size == 0
        manager.check()
    assert manager.seq_lens([1, 2]).tolist() == [4 * block_size - 1, 3 * block_size + 1]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_append_many_tokens_per_sequence(make, block_size):
    manager = make(64, block_size)
    manager.add_sequence(1, 0)
    manager.add_sequence(2, 2)
    result = manager.append_tokens(np.array([2, 1], dtype=np.uint16), np.array([block_size + 2, 0])[::1])
    assert result.slots.tolist() == expected_slots(manager, 2, 2, block_size + 4)
    assert manager.seq_lens([1, 2]).tolist() == [0, block_size + 4]
    manager.append_tokens(np.array([1, 2])[::-1], np.int32(2))       # a view, a numpy scalar
    manager.append_tokens((1,), np.array(1))                          # a 0-d array is a scalar
    assert manager.seq_lens(np.array([1, 2], dtype=">i8")).tolist() == manager.seq_lens([1, 2]).tolist()
    assert manager.seq_lens([1, 2]).tolist() == [3, block_size + 6]
    manager.check()


@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_fork_copies_shared_partial_block_once(make, block_size):
    manager = make(64, block_size)
    manager.add_sequence(10, block_size + 1)           # one full block, one partial
    parent_blocks = manager.block_table([10])[0].tolist()
    manager.fork(10, 11)
    manager.fork(10, 12)
    assert manager.allocator.refcount(parent_blocks).tolist() == [3, 3]
    assert manager.num_free_blocks == 62
    manager.check()
    # The child appends first: it moves to a fresh block and reports the copy.
    result = manager.append_tokens([11])
    assert result.copy_src.tolist() == [parent_blocks[1]]
    fresh = result.copy_dst.tolist()
    assert manager.block_table([11])[0].tolist() == [parent_blocks[0]] + fresh
    assert result.slots.tolist() == [fresh[0] * block_size + 1]
    # Parent and the other child still share; the parent and child 12 append together:
    # the first in input order copies, the second then owns the block and writes in place.
    result = manager.append_tokens([12, 10])
    assert result.copy_src.tolist() == [parent_blocks[1]]
    assert manager.block_table([10])[0].tolist() == parent_blocks
    assert result.slots.tolist()[1] == parent_blocks[1] * block_size + 1
    assert manager.allocator.refcount(parent_blocks).tolist() == [3, 1]
    manager.check()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_full_shared_blocks_are_never_copied(make, block_size):
    manager = make(64, block_size)
    manager.add_sequence(1, 2 * block_size)
    manager.fork(1, 2)
    result = manager.append_tokens([1, 2], 1)
    assert result.copy_src.size == 0
    tables = manager.block_table([1, 2]).tolist()
    assert tables[0][:2] == tables[1][:2] and tables[0][2] != tables[1][2]
    manager.check()


def test_fork_of_empty_sequence_and_zero_token_layout(make):
    manager = make(8, 4)
    manager.add_sequence(1, 0)
    manager.fork(1, 2)
    indptr, indices, last = manager.flashinfer_layout([1, 2])
    assert indptr.tolist() == [0, 0, 0] and indices.size == 0 and last.tolist() == [0, 0]
    assert manager.block_table([1, 2]).shape == (2, 0)
    result = manager.append_tokens([2], 5)
    assert result.slots.tolist() == [0, 1, 2, 3, 4]
    manager.check()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_flashinfer_layout_matches_flashinfer_formula(make, block_size):
    manager = make(200, block_size)
    lengths = [1, block_size, block_size + 1, 5 * block_size - 1, 7]
    for seq, n in enumerate(lengths):
        manager.add_sequence(seq, n)
    order = [3, 0, 4, 1, 2]
    indptr, indices, last = manager.flashinfer_layout(order)
    assert indptr.dtype == indices.dtype == last.dtype == np.int32
    pages = [-(-lengths[s] // block_size) for s in order]
    assert indptr.tolist() == np.concatenate([[0], np.cumsum(pages)]).tolist()
    assert last.tolist() == [(lengths[s] - 1) % block_size + 1 for s in order]
    table = manager.block_table(order)
    for i in range(len(order)):
        assert indices[indptr[i]:indptr[i + 1]].tolist() == table[i, :pages[i]].tolist()
        assert (table[i, pages[i]:] == -1).all()


@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_out_of_blocks_changes_nothing(make, block_size):
    manager = make(6, block_size)
    manager.add_sequence(1, 3 * block_size - 1)
    manager.fork(1, 2)
    manager.add_sequence(3, 2 * block_size)
    ids = [1, 2, 3]
    before = snapshot(manager, ids)
    # 1 needs a copy (shared partial block), 3 a new block, 2 then writes in place: 2 > 1 free.
    assert manager.num_free_blocks == 1
    assert not manager.can_append(ids)
    with pytest.raises(OUT_OF_BLOCKS) as info:
        manager.append_tokens(ids)
    assert info.value.requested == 2 and info.value.available == 1
    assert snapshot(manager, ids) == before
    with pytest.raises(OUT_OF_BLOCKS):
        manager.add_sequence(4, 2 * block_size)
    with pytest.raises(OUT_OF_BLOCKS):
        manager.add_sequence(4, 2**62)
    with pytest.raises(OUT_OF_BLOCKS):
        manager.append_tokens([3], 2**62)
    assert snapshot(manager, ids) == before
    assert manager.can_append([1, 2])          # one copy, then in place
    manager.append_tokens([1, 2])
    manager.check()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_free_everything_leaks_nothing(make, block_size):
    manager = make(100, block_size)
    for seq in range(5):
        manager.add_sequence(seq, seq * block_size + 1)
    manager.fork(4, 5)
    manager.fork(5, 6)
    manager.append_tokens([5, 6, 0], [3, 1, block_size])
    manager.free_sequence(3)
    manager.free_sequence(np.int64(6))
    manager.free_sequence([0, 5, 1])
    manager.check()
    manager.free_sequence((2, 4))
    assert manager.num_free_blocks == manager.num_blocks == 100
    assert len(manager) == 0 and manager.usage == 0.0
    manager.check()


def test_result_and_error_types():
    manager = KVCacheManager(4, 4)
    assert isinstance(manager.add_sequence(0, 1), AppendResult)
    assert issubclass(OutOfBlocksError, RuntimeError)
    assert not issubclass(OutOfBlocksError, MemoryError)
    assert "AppendResult" in repr(manager.append_tokens([0]))
    assert "KVCacheManager" in repr(manager)


def test_page_table_property_mirrors_the_manager():
    manager = KVCacheManager(32, 4)
    manager.add_sequence(5, 9)
    manager.fork(5, 6)
    table = manager.page_table
    assert table.block_size == 4
    assert table.get_sequence_blocks(6).tolist() == manager.block_table([6])[0].tolist()
    assert manager.allocator.num_free == manager.num_free_blocks == 29


def test_copy_on_write_is_recorded_in_the_table_versions():
    manager = KVCacheManager(16, 4)
    manager.add_sequence(1, 5)
    manager.fork(1, 2)
    before = manager.page_table.versions([1, 2])[0].tolist()
    result = manager.append_tokens([2])
    assert result.copy_src.size == 1
    after = manager.page_table.versions([1, 2])[0].tolist()
    assert after[0] == before[0] and after[1] != before[1]


def test_check_catches_corruption():
    manager = KVCacheManager(16, 4)
    manager.add_sequence(1, 5)
    manager.check()
    # The table and the pool refuse changes from outside the manager; a private
    # switch lets this test corrupt them on purpose.
    with pytest.raises(RuntimeError, match="belongs to a KVCacheManager"):
        manager.allocator.incref([0])
    manager.allocator._set_owned(False)
    manager.allocator.incref([0])
    with pytest.raises(AssertionError, match="block 0 has refcount 2"):
        manager.check()
    with pytest.raises(RuntimeError, match="changed from outside the manager"):
        manager.append_tokens([1])
    manager.allocator.free([0])
    manager.page_table._set_owned(False)
    manager.page_table.append_block(1, 9)
    with pytest.raises(AssertionError, match="block 9 has refcount 0 but 1 table entries"):
        manager.check()


def bad_calls():
    """(description, call, exception, name the message must mention)."""
    return [
        ("unknown append", lambda m: m.append_tokens([1, 99]), KeyError, "seq_ids"),
        ("unknown seq_lens", lambda m: m.seq_lens([99]), KeyError, "seq_ids"),
        ("unknown table", lambda m: m.block_table([1, 99]), KeyError, "99"),
        ("unknown layout", lambda m: m.flashinfer_layout([99]), KeyError, "seq_ids"),
        ("unknown free", lambda m: m.free_sequence([1, 99]), KeyError, "seq_ids"),
        ("unknown free one", lambda m: m.free_sequence(99), KeyError, "seq_ids"),
        ("unknown fork", lambda m: m.fork(99, 100), KeyError, "parent_id"),
        ("unknown can_append", lambda m: m.can_append([99]), KeyError, "seq_ids"),
        ("existing add", lambda m: m.add_sequence(1, 3), ValueError, "seq_id"),
        ("existing fork child", lambda m: m.fork(1, 2), ValueError, "child_id"),
        ("fork onto itself", lambda m: m.fork(1, 1), ValueError, "child_id"),
        ("negative tokens", lambda m: m.add_sequence(5, -1), ValueError, "num_tokens"),
        ("float tokens", lambda m: m.add_sequence(5, 2.0), TypeError, "num_tokens"),
        ("negative seq id", lambda m: m.add_sequence(-5, 1), ValueError, "seq_id"),
        ("huge seq id", lambda m: m.add_sequence(2**63, 1), OverflowError, "seq_id"),
        ("string seq id", lambda m: m.add_sequence("5", 1), TypeError, "seq_id"),
        ("bool seq id", lambda m: m.add_sequence(True, 1), TypeError, "seq_id"),
        ("float fork child", lambda m: m.fork(1, 3.0), TypeError, "child_id"),
        ("negative append", lambda m: m.append_tokens([1, 2], [1, -1]), ValueError, "num_new_tokens"),
        ("negative scalar append", lambda m: m.append_tokens([1], -2), ValueError, "num_new_tokens"),
        ("float append", lambda m: m.append_tokens([1], 1.5), TypeError, "num_new_tokens"),
        ("float counts", lambda m: m.append_tokens([1], [1.5]), TypeError, "num_new_tokens"),
        ("0-d float count", lambda m: m.append_tokens([1], np.array(1.0)), TypeError, "num_new_tokens"),
        ("bool count", lambda m: m.append_tokens([1], True), TypeError, "num_new_tokens"),
        ("2-D counts", lambda m: m.append_tokens([1], [[1]]), ValueError, "num_new_tokens"),
        ("length mismatch", lambda m: m.append_tokens([1, 2], [1]), ValueError, "num_new_tokens"),
        ("duplicate append", lambda m: m.append_tokens([1, 2, 1]), ValueError, "seq_ids"),
        ("duplicate free", lambda m: m.free_sequence([2, 2]), ValueError, "seq_ids"),
        ("float ids", lambda m: m.append_tokens([1.0]), TypeError, "seq_ids"),
        ("2-D ids", lambda m: m.seq_lens([[1]]), ValueError, "seq_ids"),
        ("bool ids", lambda m: m.block_table([True]), TypeError, "seq_ids"),
        ("negative ids", lambda m: m.flashinfer_layout([-1]), ValueError, "seq_ids"),
        ("huge ids", lambda m: m.append_tokens([2**64]), OverflowError, "seq_ids"),
    ]


@pytest.mark.parametrize("description, call, exc, name", bad_calls(), ids=[c[0] for c in bad_calls()])
def test_bad_input_changes_nothing(make, description, call, exc, name):
    manager = make(32, 4)
    manager.add_sequence(1, 5)
    manager.fork(1, 2)
    manager.add_sequence(3, 8)
    ids = [1, 2, 3]
    before = snapshot(manager, ids)
    with pytest.raises(exc) as info:
        call(manager)
    assert name in str(info.value)
    assert snapshot(manager, ids) == before
    manager.check()


@pytest.mark.parametrize("args, exc", [((0,), ValueError), ((4, 0), ValueError), ((4, 1.5), TypeError),
                                       (("4",), TypeError), ((2**30, 16), ValueError)])
def test_bad_constructor_arguments(make, args, exc):
    with pytest.raises(exc, match="num_blocks|block_size"):
        make(*args)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_random_workload_matches_reference(block_size, seed):
    rng = np.random.default_rng(seed)
    fast, ref = KVCacheManager(120, block_size), ReferenceKVCacheManager(120, block_size)
    live, next_id = [], 0
    for _ in range(300):
        op = rng.integers(4)
        outcomes = []
        if op == 0 or not live:
            n = int(rng.integers(0, 4 * block_size))
            for m in (fast, ref):
                try:
                    r = m.add_sequence(next_id, n)
                    outcomes.append(r.slots.tolist())
                except OUT_OF_BLOCKS:
                    outcomes.append("out")
            if outcomes[0] != "out":
                live.append(next_id)
            next_id += 1
        elif op == 1:
            ids = rng.permutation(live)[: int(rng.integers(1, len(live) + 1))]
            counts = rng.integers(0, 2 * block_size, size=len(ids))
            for m in (fast, ref):
                try:
                    r = m.append_tokens(ids, counts)
                    outcomes.append((r.slots.tolist(), r.copy_src.tolist(), r.copy_dst.tolist()))
                except OUT_OF_BLOCKS:
                    outcomes.append("out")
        elif op == 2:
            parent = int(rng.choice(live))
            for m in (fast, ref):
                m.fork(parent, next_id)
            live.append(next_id)
            next_id += 1
        else:
            ids = rng.permutation(live)[: int(rng.integers(1, min(3, len(live)) + 1))]
            for m in (fast, ref):
                m.free_sequence(ids)
            live = [s for s in live if s not in set(ids.tolist())]
        assert outcomes[:1] == outcomes[1:]
        assert snapshot(fast, live) == snapshot(ref, live)
        fast.check()
        ref.check()
    fast.free_sequence(live)
    assert fast.num_free_blocks == 120


@pytest.mark.parametrize("extra", [[], ["--n", "3", "--workload", "alpaca", "--num-blocks", "300"]])
def test_simulate_runs_checked_against_the_reference(tmp_path, capsys, extra):
    import json

    from pagetable.cli import main

    out = tmp_path / "figures.json"
    assert main(["simulate", "--steps", "60", "--rate", "2", "--quiet", "--json", str(out)] + extra) == 0
    figures = json.loads(out.read_text())
    assert figures["checked_equal"] and figures["steps"] == 60 and figures["tokens"] > 0
    assert 0.5 < figures["kv_utilisation_mean"] <= 1.0
    printed = capsys.readouterr().out
    assert "table work / step" in printed and "no leak" in printed
    if extra:
        assert figures["blocks_saved_by_sharing_max"] > 0 and figures["copies"] > 0


def test_simulate_rejects_bad_options(capsys):
    from pagetable.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--block-size", "0"])
    assert "--block-size" in capsys.readouterr().err


def test_reference_shares_the_exception_and_result_types():
    reference = ReferenceKVCacheManager(2, 4)
    assert isinstance(reference.add_sequence(0, 3), AppendResult)
    with pytest.raises(OutOfBlocksError):
        reference.add_sequence(1, 9)


def test_docstring_examples():
    import doctest

    import pagetable._manager

    failures, attempted = doctest.testmod(pagetable._manager, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0


def test_concurrent_changes_take_turns_or_raise():
    """A manager change may let other threads run in its middle (its table allocates
    and frees mapped memory).  A change from another thread then raises RuntimeError
    and changes nothing; nothing interleaves and nothing crashes."""
    kv = KVCacheManager(num_blocks=200_000, block_size=16)
    refused = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        live = []
        next_id = seed * 1_000_000
        for _ in range(150):
            try:
                action = rng.integers(0, 4)
                if action == 0 or not live:
                    for _ in range(40):   # many sequences: the table grows into mapped memory
                        kv.add_sequence(next_id, int(rng.integers(1, 200)))
                        live.append(next_id)
                        next_id += 1
                elif action == 1:
                    kv.append_tokens(live, 1)
                elif action == 2:
                    victims = live[: len(live) // 3]
                    kv.free_sequence(victims)
                    live = live[len(live) // 3:]
                else:
                    kv.fork(live[0], next_id)
                    live.append(next_id)
                    next_id += 1
            except OutOfBlocksError:    # a RuntimeError too: catch it first
                pass
            except RuntimeError as error:
                refused.append(str(error))

    run_racing(worker)
    kv.check()
    assert all("another thread" in message for message in refused)
