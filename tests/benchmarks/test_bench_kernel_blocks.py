"""pytest-benchmark: block_table with and without kernel_block_size, one group per export.

Skipped by the ordinary test run (pyproject's addopts has ``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_kernel_blocks.py --benchmark-only

1,024 sequences of about 2,000 tokens in a manager of block size 64, exported for a
kernel of block size 16 beside the plain export (the workload of
``benchmarks/bench_kernel_blocks.py``).  No test asserts on time; each checks the
kernel-block table against the plain one, so a benchmark never times a wrong answer.
"""

import numpy as np
import pytest

import sys
from pathlib import Path

# The asv suites' folder, by path: ``benchmarks`` is also this folder's package name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_kernel_blocks import BLOCK_SIZE, KERNEL_BLOCK_SIZE, long_context_batch  # noqa: E402

FAST = {"max_time": 0.3, "min_rounds": 5, "warmup": False}
SPLIT = BLOCK_SIZE // KERNEL_BLOCK_SIZE


@pytest.fixture(scope="module")
def batch():
    return long_context_batch(1024)


def expected_kernel_table(manager, ids):
    plain = manager.block_table(ids)
    lengths = manager.seq_lens(ids).astype(np.int64)
    kernel = plain[:, :, None] * SPLIT + np.arange(SPLIT, dtype=np.int32)
    kernel = np.where(plain[:, :, None] == -1, -1, kernel).reshape(len(ids), -1)
    counts = -(-lengths // KERNEL_BLOCK_SIZE)
    kernel = kernel[:, :counts.max()].copy()
    kernel[np.arange(kernel.shape[1]) >= counts[:, None]] = -1
    return kernel


@pytest.mark.benchmark(group="manager block_table 1024 x 2000 tokens B64", **FAST)
@pytest.mark.parametrize("kernel_block_size", [None, KERNEL_BLOCK_SIZE], ids=["plain", "b16"])
def test_manager_block_table(benchmark, batch, kernel_block_size):
    manager, ids = batch
    result = benchmark(manager.block_table, ids, kernel_block_size=kernel_block_size)
    if kernel_block_size is None:
        assert result.shape == (len(ids), -(-int(manager.seq_lens(ids).max()) // BLOCK_SIZE))
    else:
        np.testing.assert_array_equal(result, expected_kernel_table(manager, ids))


@pytest.mark.benchmark(group="table block_table 1024 x 32 blocks", **FAST)
@pytest.mark.parametrize("kernel_block_size", [None, KERNEL_BLOCK_SIZE], ids=["plain", "b16"])
def test_table_block_table(benchmark, batch, kernel_block_size):
    manager, ids = batch
    table = manager.page_table
    result, lengths = benchmark(table.block_table, ids, kernel_block_size=kernel_block_size)
    plain, plain_lengths = table.block_table(ids)
    split = 1 if kernel_block_size is None else SPLIT
    np.testing.assert_array_equal(lengths, plain_lengths * split)
    np.testing.assert_array_equal(result[:, ::split], np.where(plain == -1, -1, plain * split))
