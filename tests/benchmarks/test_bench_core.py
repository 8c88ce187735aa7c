"""pytest-benchmark: each PageTable operation beside its baselines, one group per comparison.

Skipped by the ordinary test run (pyproject's addopts has ``--benchmark-skip``); run with::

    pytest tests/benchmarks --benchmark-only --benchmark-json=.benchmarks/ci.json

No test asserts on time.  Each checks that pagetable and its baseline compute the same
thing, so a benchmark can never time a wrong answer.  The workloads and baselines are
those of ``pagetable bench`` and the asv suites (``pagetable.cli.workloads`` and
``pagetable.cli._baselines``).
"""

import numpy as np
import pytest

from pagetable import PageTable
from pagetable.cli import _baselines as bl
from pagetable.cli import workloads

# Short rounds: CI runs the whole file once per submission on two busy cores.
FAST = {"max_time": 0.3, "min_rounds": 5, "warmup": False}


def bench(group):
    return pytest.mark.benchmark(group=group, **FAST)


@pytest.fixture(scope="module", params=[16, 24], ids=lambda size: f"bs{size}")
def slot_case(request):
    workload = workloads.TableWorkload.slot_mapping_table(request.param)
    return workload, workload.build_pagetable(PageTable), workload.build_dense_table()


# ----------------------------------------------------------------- slot_mapping / lookup

SLOT_CASES = [(1 << 20, "grouped"), (8192, "grouped"), (8192, "interleaved")]


@pytest.mark.benchmark(**FAST)
@pytest.mark.parametrize("tokens, order", SLOT_CASES, ids=lambda value: str(value))
class TestSlotMapping:
    @staticmethod
    def _batch(slot_case, tokens, order):
        workload, table, dense = slot_case
        return workload, table, dense, workloads.token_batch(workload, tokens, order == "interleaved")

    @staticmethod
    def _group(slot_case, tokens, order):
        return f"slot_mapping {tokens} tokens bs{slot_case[0].block_size} {order}"

    def test_pagetable(self, benchmark, slot_case, tokens, order):
        workload, table, dense, batch = self._batch(slot_case, tokens, order)
        benchmark.group = self._group(slot_case, tokens, order)
        out = np.empty(tokens, dtype=np.int64)
        result = benchmark(table.slot_mapping, batch.seq_ids, batch.positions, out=out)
        expected = bl.formula_slot_mapping(dense, batch.rows, batch.positions,
                                           workload.block_size, batch.out)
        np.testing.assert_array_equal(result, expected)

    def test_pagetable_row_hints(self, benchmark, slot_case, tokens, order):
        workload, table, dense, batch = self._batch(slot_case, tokens, order)
        benchmark.group = self._group(slot_case, tokens, order)
        out = np.empty(tokens, dtype=np.int64)
        hints = np.ascontiguousarray(table.rows(workload.seq_ids)[batch.rows])
        result = benchmark(table.slot_mapping, batch.seq_ids, batch.positions, out=out, rows=hints)
        expected = bl.formula_slot_mapping(dense, batch.rows, batch.positions,
                                           workload.block_size, batch.out)
        np.testing.assert_array_equal(result, expected)

    def test_vllm_formula(self, benchmark, slot_case, tokens, order):
        workload, table, dense, batch = self._batch(slot_case, tokens, order)
        benchmark.group = self._group(slot_case, tokens, order)
        result = benchmark(bl.formula_slot_mapping, dense, batch.rows, batch.positions,
                           workload.block_size, batch.out)
        np.testing.assert_array_equal(result, table.slot_mapping(batch.seq_ids, batch.positions))

    def test_input_stream_floor(self, benchmark, slot_case, tokens, order):
        workload, table, dense, batch = self._batch(slot_case, tokens, order)
        benchmark.group = self._group(slot_case, tokens, order)
        result = benchmark(bl.input_stream_floor, batch.seq_ids, batch.positions, batch.out)
        np.testing.assert_array_equal(result, batch.seq_ids + batch.positions)

    def test_memcpy_floor(self, benchmark, slot_case, tokens, order):
        workload, table, dense, batch = self._batch(slot_case, tokens, order)
        benchmark.group = self._group(slot_case, tokens, order)
        result = benchmark(bl.memcpy_floor, batch.positions, batch.out)
        np.testing.assert_array_equal(result, batch.positions)


LOOKUP = bench("lookup 1048576 tokens bs16 grouped")


@pytest.fixture(scope="module")
def lookup_case():
    workload = workloads.TableWorkload.slot_mapping_table(16)
    batch = workloads.token_batch(workload, 1 << 20)
    return workload.build_pagetable(PageTable), workload.build_dense_table(), batch


@LOOKUP
def test_lookup_pagetable(benchmark, lookup_case):
    table, dense, batch = lookup_case
    blocks, offsets = benchmark(table.lookup, batch.seq_ids, batch.positions)
    expected_blocks, expected_offsets = bl.formula_lookup(dense, batch.rows, batch.positions, 16)
    np.testing.assert_array_equal(blocks, expected_blocks)
    np.testing.assert_array_equal(offsets, expected_offsets)


@LOOKUP
def test_lookup_vllm_formula(benchmark, lookup_case):
    table, dense, batch = lookup_case
    benchmark(bl.formula_lookup, dense, batch.rows, batch.positions, 16)


# ----------------------------------------------------------------- Python-loop operations


@pytest.fixture(scope="module")
def loop_case():
    workload = workloads.TableWorkload.slot_mapping_table(16)
    seq_ids, positions = workloads.random_queries(workload, 10_000)
    return (workload.build_pagetable(PageTable), workload.build_dict_of_lists(),
            seq_ids, positions)


GET_BLOCK = bench("get_block_for_position 10000 calls from a Python loop")


def _pagetable_get_loop(table, seq_ids, positions):
    get = table.get_block_for_position
    return [get(seq_id, position) for seq_id, position in zip(seq_ids, positions)]


@GET_BLOCK
def test_get_block_for_position_pagetable(benchmark, loop_case):
    table, seed_table, seq_ids, positions = loop_case
    result = benchmark(_pagetable_get_loop, table, seq_ids, positions)
    assert result == _pagetable_get_loop(seed_table, seq_ids, positions)


@GET_BLOCK
def test_get_block_for_position_dict_of_lists(benchmark, loop_case):
    table, seed_table, seq_ids, positions = loop_case
    benchmark(_pagetable_get_loop, seed_table, seq_ids, positions)


APPEND = bench("append 32768 blocks over 1024 sequences")


@pytest.fixture(scope="module")
def append_case():
    owners, blocks = workloads.append_stream(1024, 32)
    return owners, blocks, owners.tolist(), blocks.tolist()


def _append_blocks(owners, blocks):
    table = PageTable(16)
    table.append_blocks(owners, blocks)
    return table


def _append_block_loop(owner_list, block_list):
    table = PageTable(16)
    for seq_id, block_id in zip(owner_list, block_list):
        table.append_block(seq_id, block_id)
    return table


def _same_as_dict(table, expected):
    assert len(table) == len(expected)
    for seq_id, blocks in expected.items():
        np.testing.assert_array_equal(table.get_sequence_blocks(seq_id), blocks)


@APPEND
def test_append_blocks_pagetable(benchmark, append_case):
    owners, blocks, owner_list, block_list = append_case
    table = benchmark(_append_blocks, owners, blocks)
    _same_as_dict(table, bl.setdefault_append_loop(owner_list, block_list))


@APPEND
def test_append_block_loop_pagetable(benchmark, append_case):
    owners, blocks, owner_list, block_list = append_case
    table = benchmark(_append_block_loop, owner_list, block_list)
    _same_as_dict(table, bl.setdefault_append_loop(owner_list, block_list))


@APPEND
def test_append_dict_setdefault_loop(benchmark, append_case):
    owners, blocks, owner_list, block_list = append_case
    benchmark(bl.setdefault_append_loop, owner_list, block_list)


@pytest.fixture(scope="module")
def lognormal_case():
    workload = workloads.TableWorkload.make(workloads.lognormal_lengths(2048))
    return workload, workload.seq_ids.tolist()


SEQUENCE_BLOCKS = bench("get_sequence_blocks 2048 sequences from a Python loop")


def _get_all(table, seq_list):
    get = table.get_sequence_blocks
    return [get(seq_id) for seq_id in seq_list]


@SEQUENCE_BLOCKS
def test_get_sequence_blocks_pagetable(benchmark, lognormal_case):
    workload, seq_list = lognormal_case
    result = benchmark(_get_all, workload.build_pagetable(PageTable), seq_list)
    for mine, seed in zip(result, _get_all(workload.build_dict_of_lists(), seq_list)):
        np.testing.assert_array_equal(mine, seed)


@SEQUENCE_BLOCKS
def test_get_sequence_blocks_dict_of_lists(benchmark, lognormal_case):
    workload, seq_list = lognormal_case
    benchmark(_get_all, workload.build_dict_of_lists(), seq_list)


REMOVE = bench("remove_sequence 2048 sequences from a Python loop")


def _remove_all(table, seq_list):
    remove = table.remove_sequence
    return [remove(seq_id) for seq_id in seq_list]


@REMOVE
def test_remove_sequence_pagetable(benchmark, lognormal_case):
    workload, seq_list = lognormal_case
    result = benchmark.pedantic(
        _remove_all, setup=lambda: ((workload.build_pagetable(PageTable), seq_list), {}),
        rounds=5)
    for mine, seed in zip(result, _remove_all(workload.build_dict_of_lists(), seq_list)):
        np.testing.assert_array_equal(mine, seed)


@REMOVE
def test_remove_sequence_dict_of_lists(benchmark, lognormal_case):
    workload, seq_list = lognormal_case
    benchmark.pedantic(_remove_all, setup=lambda: ((workload.build_dict_of_lists(), seq_list), {}),
                       rounds=5)


# ----------------------------------------------------------------- block_table / to_csr


@pytest.fixture(scope="module")
def table_case():
    workload = workloads.TableWorkload.block_table_batch(256)
    return (workload.build_pagetable(PageTable), workload.build_dict_of_lists(),
            workload.seq_ids, workload.seq_ids.tolist())


BLOCK_TABLE = bench("block_table 256 sequences of up to 2048 blocks")
TO_CSR = bench("to_csr 256 sequences of up to 2048 blocks")


@BLOCK_TABLE
def test_block_table_pagetable(benchmark, table_case):
    table, seed_table, seq_ids, seq_list = table_case
    dense, num_blocks = benchmark(table.block_table, seq_ids)
    expected_dense, expected_num_blocks = seed_table.block_table(seq_list)
    np.testing.assert_array_equal(dense, expected_dense)
    np.testing.assert_array_equal(num_blocks, expected_num_blocks)


@BLOCK_TABLE
def test_block_table_numpy_rows_from_lists(benchmark, table_case):
    table, seed_table, seq_ids, seq_list = table_case
    benchmark(seed_table.block_table, seq_list)


@TO_CSR
def test_to_csr_pagetable(benchmark, table_case):
    table, seed_table, seq_ids, seq_list = table_case
    indptr, indices = benchmark(table.to_csr, seq_ids)
    expected_indptr, expected_indices = seed_table.to_csr(seq_list)
    np.testing.assert_array_equal(indptr, expected_indptr)
    np.testing.assert_array_equal(indices, expected_indices)


@TO_CSR
def test_to_csr_numpy_rows_from_lists(benchmark, table_case):
    table, seed_table, seq_ids, seq_list = table_case
    benchmark(seed_table.to_csr, seq_list)
