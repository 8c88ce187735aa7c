"""Workloads and baselines for the asv suites, plus per-process caches of built tables.

The generators and baselines themselves live in ``pagetable/_bench_baselines.py``
(benchmark-only code, one copy shared with pytest-benchmark and
``python -m pagetable bench``).  That file is loaded here by path from this checkout,
not imported from the installed package, so that ``asv continuous main HEAD`` times
every commit on the same workloads even when the commit under test predates the file.
"""

import functools
import importlib.util
import pathlib
import sys

_NAME = "_pagetable_bench_baselines"
_PATH = pathlib.Path(__file__).resolve().parent.parent / "pagetable" / "_bench_baselines.py"

if _NAME in sys.modules:
    baselines = sys.modules[_NAME]
elif _PATH.exists():
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    baselines = sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(baselines)
else:  # benchmarks copied away from the checkout: use the installed package's copy
    from pagetable import _bench_baselines as baselines


def page_table_class():
    from pagetable import PageTable
    return PageTable


# asv re-runs ``setup`` before every timed call; these caches keep that cheap for the
# read-only suites.  Anything a benchmark mutates is built fresh, never taken from here.

@functools.lru_cache(maxsize=None)
def slot_table(block_size):
    """(workload, PageTable, vLLM dense table) for the 1,024-sequence slot-mapping table."""
    workload = baselines.TableWorkload.slot_mapping_table(block_size)
    return workload, workload.build_pagetable(page_table_class()), workload.build_dense_table()


@functools.lru_cache(maxsize=None)
def slot_seed_table(block_size):
    """The same table in the seed's dict-of-lists layout."""
    return slot_table(block_size)[0].build_dict_of_lists()


@functools.lru_cache(maxsize=None)
def tokens(block_size, num_tokens, order):
    """A token batch over ``slot_table(block_size)``; order is "grouped" or "interleaved"."""
    return baselines.token_batch(slot_table(block_size)[0], num_tokens, order == "interleaved")


@functools.lru_cache(maxsize=None)
def queries(block_size, count):
    """Python lists of (sequence id, position) for the Python-loop suites."""
    return baselines.random_queries(slot_table(block_size)[0], count)


@functools.lru_cache(maxsize=None)
def table_batch(num_sequences):
    """(workload, PageTable, dict of lists) of sequences with up to 2,048 blocks."""
    workload = baselines.TableWorkload.block_table_batch(num_sequences)
    return workload, workload.build_pagetable(page_table_class()), workload.build_dict_of_lists()


@functools.lru_cache(maxsize=None)
def lognormal_workload(num_sequences):
    """Long-tailed sequences (median 32 blocks, capped at 4,096), as in the memory goal."""
    return baselines.TableWorkload.make(baselines.lognormal_lengths(num_sequences))


@functools.lru_cache(maxsize=None)
def append_stream(num_blocks, order="interleaved"):
    """(owners, blocks) as arrays and as Python lists, over up to 1,024 sequences.

    "interleaved": round-robin, one block per sequence per step (decode);
    "grouped": each sequence's blocks together (prefill).
    """
    per_sequence = max(num_blocks // 1024, 1)
    owners, blocks = baselines.append_stream(min(num_blocks, 1024), per_sequence,
                                             grouped=order == "grouped")
    return owners, blocks, owners.tolist(), blocks.tolist()
