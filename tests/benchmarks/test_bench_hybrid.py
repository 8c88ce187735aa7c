"""pytest-benchmark: a two-group decode step beside one group, and rollback beside the reference.

Skipped by the ordinary test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_hybrid.py --benchmark-only

No test asserts on time.  Each checks what the timed calls did (the lengths reached,
the blocks released or returned), so a benchmark never times a wrong answer.  The
state is that of ``benchmarks/bench_hybrid.py`` (the asv suites), whose ``main()``
prints the ratios the issue asks for.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_hybrid  # noqa: E402

FAST = {"max_time": 0.3, "min_rounds": 3, "warmup": False}


@pytest.mark.benchmark(group="decode 16 steps x 1024 sequences, one group or two", **FAST)
@pytest.mark.parametrize("groups", ["single", "full+window"])
def test_group_decode(benchmark, groups):
    def setup():
        suite = bench_hybrid.GroupDecode()
        suite.setup(groups)
        return (suite,), {}

    def run(suite):
        suite.time_append_tokens(groups)
        return suite

    suite = benchmark.pedantic(run, setup=setup, rounds=3)
    lengths = bench_hybrid._lengths() + 1 + bench_hybrid.STEPS
    np.testing.assert_array_equal(suite.manager.seq_lens(suite.ids), lengths)
    suite.manager.check()
    if groups != "single":
        # The window group let go of what left its window; the full group kept all.
        window = suite.manager.block_table(suite.ids, group=1)
        assert (window == -1).sum() > 0


@pytest.mark.benchmark(group="rollback of 1024 sequences by 0..4 tokens", **FAST)
@pytest.mark.parametrize("kind", ["pagetable", "reference"])
def test_rollback(benchmark, kind):
    def setup():
        suite = bench_hybrid.Rollback()
        suite.setup(kind)
        return (suite,), {}

    def run(suite):
        before = suite.manager.seq_lens(suite.ids)
        suite.time_rollback(kind)
        return suite, before

    suite, before = benchmark.pedantic(run, setup=setup, rounds=3)
    np.testing.assert_array_equal(suite.manager.seq_lens(suite.ids), before - suite.rejected)
    suite.manager.check()
