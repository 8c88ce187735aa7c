"""pytest-benchmark: an engine step with pagetable beside the vLLM and LMDeploy models.

Skipped by the ordinary test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_engine_step.py --benchmark-only

No test asserts on time.  Each checks what the timed calls did: the last step's slots
are distinct and agree with that side's own block table, and every row holds the
blocks its sequence's tokens need.  The sizes are smaller than those of
``benchmarks/bench_engine_step.py`` (the asv suites, whose ``main()`` prints the
ratios) so that CI stays quick.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_engine_step  # noqa: E402
from bench_engine_step import engines, workloads  # noqa: E402

FAST = {"max_time": 0.3, "min_rounds": 3, "warmup": False}
SIDES = bench_engine_step.SIDES
SERVING_STEPS = 60


def described(side, engine, result, decode_ids=None, new_ids=None, new_tokens=None):
    if side == "pagetable":
        return engine.describe(result, decode_ids, new_ids, new_tokens)
    return engine.describe(result)


@pytest.mark.benchmark(group="decode: 16 steps of 256 sequences", **FAST)
@pytest.mark.parametrize("side", SIDES)
def test_decode_steps(benchmark, side):
    batch = workloads.decode_batch(256)

    def setup():
        return (engines.decode_setup(side, batch),), {}

    def run(engine):
        return engine, engines.decode_run(side, engine, batch)

    engine, result = benchmark.pedantic(run, setup=setup, rounds=3)
    lengths = dict(zip(batch.seq_ids.tolist(), (batch.num_tokens + batch.steps).tolist()))
    engines.check_step(described(side, engine, result, batch.seq_ids), batch.block_size, lengths)


@pytest.mark.benchmark(group=f"serving loop: {SERVING_STEPS} steps, 256 running", **FAST)
@pytest.mark.parametrize("side", SIDES)
def test_serving_loop(benchmark, side):
    trace = workloads.serving_trace(SERVING_STEPS)
    python_steps = workloads.serving_python_steps(trace)

    def setup():
        return (engines.serving_setup(side, trace),), {}

    def run(engine):
        return engine, engines.serving_run(side, engine, trace, python_steps)

    engine, result = benchmark.pedantic(run, setup=setup, rounds=3)
    lengths = dict(zip(trace.initial_ids.tolist(), trace.initial_tokens.tolist()))
    for step in trace.steps:
        for seq_id in step.finished.tolist():
            del lengths[seq_id]
        lengths.update(zip(step.new_ids.tolist(), step.new_tokens.tolist()))
        for seq_id in step.decode_ids.tolist():
            lengths[seq_id] += 1
    last = trace.steps[-1]
    step = described(side, engine, result, last.decode_ids, last.new_ids, last.new_tokens)
    engines.check_step(step, trace.block_size, lengths)
    assert sorted(step.row_seq_ids.tolist()) == sorted(lengths)


@pytest.mark.benchmark(group="admit 256 prompts", **FAST)
@pytest.mark.parametrize("side", [*SIDES, "pagetable, add_sequence loop"])
def test_admission(benchmark, side):
    seq_ids, num_tokens = workloads.admission_prompts()
    lists = (seq_ids.tolist(), num_tokens.tolist())
    kind = side.split(",")[0]

    def setup():
        return (engines.admission_setup(kind, num_tokens),), {}

    def run(engine):
        if side == kind:
            engines.admission_run(side, engine, seq_ids, num_tokens, lists)
        else:
            engine.admit_one_by_one(*lists)
        return engine

    engine = benchmark.pedantic(run, setup=setup, rounds=3)
    free = {"pagetable": lambda: engine.kv.num_free_blocks,
            "vLLM": lambda: engine.kv_cache_manager.block_pool.get_num_free_blocks(),
            "LMDeploy": lambda: engine.block_manager.get_num_free_gpu_blocks()}[kind]
    assert free() == 1   # the pool is sized to the prompts, and a spare block


@pytest.mark.benchmark(group="free 256 sequences", **FAST)
@pytest.mark.parametrize("side", SIDES)
def test_free(benchmark, side):
    seq_ids, num_tokens = workloads.admission_prompts()
    seq_list = seq_ids.tolist()

    def setup():
        return (engines.free_setup(side, seq_ids, num_tokens),), {}

    def run(engine):
        engines.free_run(side, engine, seq_ids, seq_list)
        return engine

    engine = benchmark.pedantic(run, setup=setup, rounds=3)
    pool = engines.pool_for(num_tokens, 16)
    free = {"pagetable": lambda: engine.kv.num_free_blocks,
            "vLLM": lambda: engine.kv_cache_manager.block_pool.get_num_free_blocks(),
            "LMDeploy": lambda: engine.block_manager.get_num_free_gpu_blocks()}[side]
    assert free() == pool


@pytest.fixture(scope="module", params=["prefill", "decode"])
def slot_case(request):
    if request.param == "prefill":
        seq_ids, num_tokens = workloads.admission_prompts()
    else:
        batch = workloads.decode_batch(1024)
        seq_ids, num_tokens = batch.seq_ids, batch.num_tokens
    return request.param, engines.slot_mapping_case(seq_ids, num_tokens, decode=request.param == "decode")


@pytest.mark.benchmark(**FAST)
@pytest.mark.parametrize("side", ["pagetable", "pagetable+hints", "vLLM"])
def test_slot_mapping_alone(benchmark, slot_case, side):
    tokens, case = slot_case
    benchmark.group = f"slot mapping alone, {tokens} tokens"
    if side == "vLLM":
        slots = benchmark(case.vllm)
        table, rows = case.vllm_table.block_table, case.req_indices
    else:
        slots = benchmark(case.pagetable, hints=side == "pagetable+hints")
        owners = np.unique(case.seq_ids)          # sorted: a token's row is its rank
        table, _ = case.table.block_table(owners)
        rows = np.searchsorted(owners, case.seq_ids)
    expected = table[rows, case.positions // 16].astype(np.int64) * 16 + case.positions % 16
    np.testing.assert_array_equal(slots, expected)
    assert len(np.unique(slots)) == len(slots)


@pytest.mark.benchmark(group="vLLM's own BlockTable", **FAST)
@pytest.mark.parametrize("tokens", ["prefill", "decode"])
def test_vllm_own_block_table(benchmark, tokens):
    pytest.importorskip("vllm")
    suite = bench_engine_step.VLLMOwnBlockTable()
    try:
        suite.setup(tokens)
    except NotImplementedError as reason:
        pytest.skip(str(reason))
    benchmark(suite.time_compute_slot_mapping, tokens)
