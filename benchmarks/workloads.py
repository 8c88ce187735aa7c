"""Workloads and baselines for the asv suites, plus per-process caches of built tables.

The generators and baselines themselves live in ``pagetable/cli/`` (``workloads.py``,
``_baselines.py``, ``_memory.py``, ``_engines.py``: benchmark-only code, one copy shared with
pytest-benchmark, the memory test and ``pagetable bench``).  That folder is loaded here
by path from this checkout, under a private name, not imported from the installed
package, so that ``asv continuous main HEAD`` times every commit on the same workloads
even when the commit under test predates the folder.
"""

import functools
import importlib
import importlib.util
import pathlib
import sys

_NAME = "_pagetable_cli_checkout"
_FOLDER = pathlib.Path(__file__).resolve().parent.parent / "pagetable" / "cli"

if _NAME not in sys.modules and (_FOLDER / "workloads.py").exists():
    _spec = importlib.util.spec_from_file_location(
        _NAME, _FOLDER / "__init__.py", submodule_search_locations=[str(_FOLDER)])
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
    _PACKAGE = _NAME
elif _NAME in sys.modules:
    _PACKAGE = _NAME
else:  # benchmarks copied away from the checkout: use the installed package's copy
    _PACKAGE = "pagetable.cli"

workloads = importlib.import_module(_PACKAGE + ".workloads")
baselines = importlib.import_module(_PACKAGE + "._baselines")
memory = importlib.import_module(_PACKAGE + "._memory")
try:
    engines = importlib.import_module(_PACKAGE + "._engines")
except ImportError:  # an installed package from before the engine models
    engines = None


def page_table_class():
    from pagetable import PageTable
    return PageTable


# asv re-runs ``setup`` before every timed call; these caches keep that cheap for the
# read-only suites.  Anything a benchmark mutates is built fresh, never taken from here.

@functools.lru_cache(maxsize=None)
def slot_table(block_size):
    """(workload, PageTable, vLLM dense table) for the 1,024-sequence slot-mapping table."""
    workload = workloads.TableWorkload.slot_mapping_table(block_size)
    return workload, workload.build_pagetable(page_table_class()), workload.build_dense_table()


@functools.lru_cache(maxsize=None)
def slot_seed_table(block_size):
    """The same table in the seed's dict-of-lists layout."""
    return slot_table(block_size)[0].build_dict_of_lists()


@functools.lru_cache(maxsize=None)
def tokens(block_size, num_tokens, order):
    """A token batch over ``slot_table(block_size)``; order is "grouped" or "interleaved"."""
    return workloads.token_batch(slot_table(block_size)[0], num_tokens, order == "interleaved")


@functools.lru_cache(maxsize=None)
def queries(block_size, count):
    """Python lists of (sequence id, position) for the Python-loop suites."""
    return workloads.random_queries(slot_table(block_size)[0], count)


@functools.lru_cache(maxsize=None)
def table_batch(num_sequences):
    """(workload, PageTable, dict of lists) of sequences with up to 2,048 blocks."""
    workload = workloads.TableWorkload.block_table_batch(num_sequences)
    return workload, workload.build_pagetable(page_table_class()), workload.build_dict_of_lists()


@functools.lru_cache(maxsize=None)
def lognormal_workload(num_sequences):
    """Long-tailed sequences (median 32 blocks, capped at 4,096), as in the memory goal."""
    return workloads.TableWorkload.make(workloads.lognormal_lengths(num_sequences))


@functools.lru_cache(maxsize=None)
def append_stream(num_blocks, order="interleaved"):
    """(owners, blocks) as arrays and as Python lists, over up to 1,024 sequences.

    "interleaved": round-robin, one block per sequence per step (decode);
    "grouped": each sequence's blocks together (prefill).
    """
    per_sequence = max(num_blocks // 1024, 1)
    owners, blocks = workloads.append_stream(min(num_blocks, 1024), per_sequence,
                                             grouped=order == "grouped")
    return owners, blocks, owners.tolist(), blocks.tolist()
