"""pytest-benchmark: a decode step's block table, persistent (BatchTable) against rebuilt.

Skipped by the ordinary test run (pyproject's addopts has ``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_batch_table.py --benchmark-only

The workload of ``benchmarks/bench_batch_table.py``.  No test asserts on time; each
checks the persistent table against the rebuilt one after its rounds, so a benchmark
never times a wrong answer.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

# The asv suites' folder, by path: ``benchmarks`` is also this folder's package name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_batch_table import _manager  # noqa: E402

from pagetable import BatchTable  # noqa: E402


@pytest.mark.parametrize("table", ["persistent", "rebuilt"])
def test_decode_step_block_table(benchmark, table):
    kv, ids = _manager(1024, rounds=40)
    bt = BatchTable(kv, ids.size, 512)
    bt.add(ids)
    bt.update()

    def step():
        kv.append_tokens(ids, 1)
        if table == "persistent":
            bt.update()
            return bt.block_table[:ids.size]
        return kv.block_table(ids)

    benchmark.pedantic(step, rounds=40)
    bt.update()
    rebuilt, counts = kv.page_table.block_table(ids)
    np.testing.assert_array_equal(bt.num_blocks, counts)
    np.testing.assert_array_equal(bt.block_table[:, :rebuilt.shape[1]], rebuilt)
