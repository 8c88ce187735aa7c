"""The engine models of the step benchmarks (``pagetable/cli/_engines.py``) answer as pagetable does.

Block numbering differs from engine to engine, so the models are held to pagetable
structurally: in every step each token has its own slot, the slot is its sequence's
block in that engine's own table plus the offset, and each sequence holds the blocks
its tokens need, the same count on every side.  Two hand-worked examples pin the
models' own numbering (vLLM's free queue order and null block, LMDeploy's free stacks).
"""

import numpy as np
import pytest

from pagetable.cli import _engines as en
from pagetable.cli import workloads

BLOCK_SIZE = 16


def described(side, engine, result, decode_ids=None, new_ids=None, new_tokens=None):
    if side == "pagetable":
        return engine.describe(result, decode_ids, new_ids, new_tokens)
    return engine.describe(result)


# ----------------------------------------------------------------------- by hand


def test_vllm_model_by_hand():
    engine = en.VLLMEngine(9, 4, max_reqs=4, max_blocks_per_req=4, max_tokens=16)
    step = engine.describe(engine.step((), [(10, 5), (20, 3)]))
    # Block 0 is the null block; the queue hands out 1, 2 to request 10, then 3.
    np.testing.assert_array_equal(step.slots, [4, 5, 6, 7, 8, 12, 13, 14])
    np.testing.assert_array_equal(step.table[:, :2], [[1, 2], [3, 0]])
    np.testing.assert_array_equal(step.num_blocks, [2, 1])
    np.testing.assert_array_equal(engine.step().slots, [9, 15])
    step = engine.step()                      # request 20 crosses into a new block: 4
    np.testing.assert_array_equal(step.slots, [10, 16])
    np.testing.assert_array_equal(step.table[:, :2], [[1, 2], [3, 4]])
    # Freeing 10 appends its blocks last first (2, then 1) behind 5..8; its row is
    # filled by moving row 1 down.
    step = engine.describe(engine.step([10], [(30, 9)]))
    np.testing.assert_array_equal(step.row_seq_ids, [30, 20])
    np.testing.assert_array_equal(step.table[0, :3], [5, 6, 7])
    np.testing.assert_array_equal(step.table[1, :2], [3, 4])
    np.testing.assert_array_equal(step.slots, [20, 21, 22, 23, 24, 25, 26, 27, 28, 17])
    queue = engine.kv_cache_manager.block_pool.free_block_queue
    order, block = [], queue.head
    while block is not None:
        order.append(block.block_id)
        block = block.next_free_block
    assert order == [8, 2, 1] and queue.num_free_blocks == 3


def test_lmdeploy_model_by_hand():
    engine = en.LMDeployEngine(8, 4, max_blocks_per_seq=4)
    step = engine.describe(engine.step((), [(10, 5), (20, 3)]))
    np.testing.assert_array_equal(step.slots, [0, 1, 2, 3, 4, 8, 9, 10])
    np.testing.assert_array_equal(step.table, [[0, 1], [2, 0]])     # padded with 0
    np.testing.assert_array_equal(step.num_blocks, [2, 1])
    np.testing.assert_array_equal(engine.step().slots, [5, 11])
    np.testing.assert_array_equal(engine.step().slots, [6, 12])     # 20 takes block 3
    # Freeing 10 pushes blocks 0 and 1 back on top of both free stacks.
    step = engine.describe(engine.step([10], [(30, 9)]))
    np.testing.assert_array_equal(step.row_seq_ids, [20, 30])
    np.testing.assert_array_equal(step.table, [[2, 3, 0], [0, 1, 4]])
    np.testing.assert_array_equal(step.slots, [13, 0, 1, 2, 3, 4, 5, 6, 7, 16])
    assert engine.block_manager.get_num_free_gpu_blocks() == 3


def test_free_queue_removes_from_anywhere():
    blocks = [en.KVCacheBlock(i) for i in range(5)]
    queue = en.FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[4])
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    order, block = [], queue.head
    while block is not None:
        order.append(block.block_id)
        block = block.next_free_block
    assert order == [1, 3, 2] and queue.num_free_blocks == 3 and queue.tail is blocks[2]
    for _ in range(3):
        queue.popleft()
    assert queue.head is None and queue.tail is None
    with pytest.raises(ValueError):
        queue.popleft()


def test_vllm_block_table_rows():
    table = en.VLLMBlockTable(4, max_num_reqs=3, max_num_blocks_per_req=3)
    table.add_row([7, 8], 0)
    table.add_row([9], 1)
    table.append_row([5], 1)
    table.swap_row(0, 1)
    np.testing.assert_array_equal(table.block_table[:2, :2], [[9, 5], [7, 8]])
    table.move_row(1, 2)
    table.clear_row(1)
    np.testing.assert_array_equal(table.num_blocks_per_row, [2, 0, 2])
    np.testing.assert_array_equal(table.block_table[2, :2], [7, 8])
    out = np.empty(3, dtype=np.int64)
    table.compute_slot_mapping(np.array([0, 2, 2]), np.array([5, 0, 7]), out)
    np.testing.assert_array_equal(out, [5 * 4 + 1, 7 * 4, 8 * 4 + 3])


# ----------------------------------------------------------------------- against pagetable


def _replay(trace, sides):
    """Every step of ``trace`` on every side, checked; yields nothing, raises on a mismatch."""
    engines = {side: en.serving_setup(side, trace) for side in sides}
    lengths = dict(zip(trace.initial_ids.tolist(), trace.initial_tokens.tolist()))
    python_steps = workloads.serving_python_steps(trace)
    for step, (finished, new) in zip(trace.steps, python_steps):
        for seq_id in finished:
            del lengths[seq_id]
        lengths.update(new)
        for seq_id in step.decode_ids.tolist():
            lengths[seq_id] += 1
        counts = []
        for side, engine in engines.items():
            if side == "pagetable":
                result = engine.step(step.decode_ids, step.finished, step.new_ids, step.new_tokens)
            else:
                result = engine.step(finished, new)
            described_step = described(side, engine, result, step.decode_ids, step.new_ids, step.new_tokens)
            counts.append(en.check_step(described_step, trace.block_size, lengths))
            tokens = sorted(zip(described_step.token_seq_ids.tolist(), described_step.positions.tolist()))
            if side == sides[0]:
                expected_tokens = tokens
            assert tokens == expected_tokens, side
        assert all(count == counts[0] for count in counts), "sides disagree on blocks per sequence"
        assert sorted(counts[0]) == sorted(lengths)
    return engines


def test_the_serving_loop_agrees_with_pagetable():
    trace = workloads.serving_trace(steps=80, running=24)
    assert sum(len(step.finished) for step in trace.steps) > 10      # the loop does churn
    _replay(trace, en.SIDES)


def test_pagetable_without_a_batch_table_agrees(monkeypatch):
    """The fallback for commits before BatchTable: the table rebuilt each step."""
    trace = workloads.serving_trace(steps=40, running=16)
    real = en.build

    def without_batch_table(side, *args):
        engine = real(side, *args)
        if side == "pagetable":
            engine.bt = None
        return engine

    monkeypatch.setattr(en, "build", without_batch_table)
    _replay(trace, ["pagetable", "vLLM"])


@pytest.mark.parametrize("side", en.SIDES)
def test_decode_steps(side):
    batch = workloads.decode_batch(64, steps=20)
    engine = en.decode_setup(side, batch)
    result = en.decode_run(side, engine, batch)
    lengths = dict(zip(batch.seq_ids.tolist(), (batch.num_tokens + batch.steps).tolist()))
    step = described(side, engine, result, batch.seq_ids)
    counts = en.check_step(step, batch.block_size, lengths)
    assert len(step.slots) == len(batch.seq_ids) and len(counts) == len(batch.seq_ids)


@pytest.mark.parametrize("side", en.SIDES)
def test_admission_and_free_return_every_block(side):
    seq_ids, num_tokens = workloads.admission_prompts(32)
    engine = en.admission_setup(side, num_tokens)
    en.admission_run(side, engine, seq_ids, num_tokens)
    free = {"pagetable": lambda: engine.kv.num_free_blocks,
            "vLLM": lambda: engine.kv_cache_manager.block_pool.get_num_free_blocks(),
            "LMDeploy": lambda: engine.block_manager.get_num_free_gpu_blocks()}[side]
    assert free() == 1
    en.free_run(side, engine, seq_ids)
    assert free() == en.pool_for(num_tokens, BLOCK_SIZE)


def test_admission_one_by_one_matches_the_batched_call():
    seq_ids, num_tokens = workloads.admission_prompts(32)
    batched = en.admission_setup("pagetable", num_tokens)
    en.admission_run("pagetable", batched, seq_ids, num_tokens)
    looped = en.admission_setup("pagetable", num_tokens)
    looped.admit_one_by_one(seq_ids.tolist(), num_tokens.tolist())
    np.testing.assert_array_equal(batched.kv.seq_lens(seq_ids), looped.kv.seq_lens(seq_ids))
    np.testing.assert_array_equal(batched.kv.seq_lens(seq_ids), num_tokens)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_slot_mapping_alone_is_the_same_map(decode):
    seq_ids, num_tokens = workloads.admission_prompts(40)
    case = en.slot_mapping_case(seq_ids, num_tokens, decode=decode)
    ours = case.pagetable().copy()
    np.testing.assert_array_equal(case.pagetable(hints=True), ours)
    theirs = case.vllm().copy()
    assert len(np.unique(ours)) == len(np.unique(theirs)) == len(ours)
    # Same offsets in the block, and the same token -> block partition on both sides.
    np.testing.assert_array_equal(ours % BLOCK_SIZE, theirs % BLOCK_SIZE)
    pairs = set(zip((ours // BLOCK_SIZE).tolist(), (theirs // BLOCK_SIZE).tolist()))
    assert len(pairs) == len(np.unique(ours // BLOCK_SIZE)) == len(np.unique(theirs // BLOCK_SIZE))


def test_models_refuse_what_does_not_fit():
    with pytest.raises(MemoryError):
        en.VLLMEngine(3, 4, 2, 4, 16).step((), [(1, 9)])
    with pytest.raises(MemoryError):
        en.LMDeployEngine(2, 4, 4).step((), [(1, 9)])
    with pytest.raises(ValueError):
        en.VLLMEngine(9, 4, 2, 2, 16).step((), [(1, 9)])
