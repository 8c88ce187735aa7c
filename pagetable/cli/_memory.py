"""The memory goal: resident bytes a table holds per mapped block, each reading in a fresh process.

The workload is :func:`pagetable.cli.workloads.lognormal_lengths` (10,000 sequences,
median 32 blocks, capped at 4,096), built one of three ways:

* ``grow``: one block at a time to every sequence still growing, as decode steps grow
  a batch (the worst case for relocation);
* ``prefill``: one ``append_blocks`` call per sequence, as prefills arrive;
* ``bulk``: the whole table from one grouped batch.

``measure_memory`` is what ``pagetable bench``, the asv suites and the memory test call;
``python -m pagetable.cli._memory [--table T] [--build B]`` prints one reading as JSON.
Like :mod:`pagetable.cli.workloads` this depends on numpy only (asv loads it by path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from . import workloads

TABLES = ("pagetable", "dict_of_lists")
BUILDS = ("grow", "prefill", "bulk")


def _rss_bytes() -> int:
    """Resident set size now, in bytes (Linux /proc; elsewhere the peak, as a stand-in)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource
    except ImportError:          # Windows: no ru_maxrss
        return 0
    # ru_maxrss survives execve on Linux, so it can hold the parent's peak: an upper bound.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    """Restart the VmHWM peak from the current RSS (Linux >= 4.0); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def build_inputs(build: str) -> tuple[np.ndarray, ...]:
    """The memory workload laid out for ``build``: ``grow`` gets
    ``workloads.grow_inputs``, ``prefill`` and ``bulk`` get ``workloads.bulk_inputs``."""
    lengths = workloads.lognormal_lengths()
    seq_ids = workloads.sequence_ids(len(lengths))
    if build == "grow":
        return workloads.grow_inputs(lengths, seq_ids)
    return workloads.bulk_inputs(lengths, seq_ids)


def build_table(table_kind: str, build: str, inputs: tuple[np.ndarray, ...]) -> Any:
    """Build the ``table_kind`` table (a PageTable, or the seed's dict of lists) from
    ``build_inputs(build)`` and return it."""
    if table_kind not in TABLES or build not in BUILDS:
        raise ValueError(f"table must be one of {TABLES} and build one of {BUILDS}, "
                         f"got {table_kind!r}, {build!r}")
    pagetable = table_kind == "pagetable"
    table: Any
    if pagetable:
        from pagetable import PageTable
        table = PageTable(16)
    else:
        table = {}
    if build == "grow":
        sorted_ids, sorted_lengths, blocks = inputs
        taken = 0
        for step in range(int(sorted_lengths[0])):
            active = int(np.searchsorted(-sorted_lengths, -step, side="left"))
            step_ids = sorted_ids[:active]
            step_blocks = blocks[taken:taken + active]
            taken += active
            if pagetable:
                table.append_blocks(step_ids, step_blocks)
            else:
                for seq_id, block_id in zip(step_ids.tolist(), step_blocks.tolist()):
                    table.setdefault(seq_id, []).append(block_id)
        return table
    owners, blocks, seq_ids, lengths = inputs
    if pagetable and build == "bulk":
        table.append_blocks(owners, blocks)
    elif pagetable:
        start = 0
        for length in lengths.tolist():
            table.append_blocks(owners[start:start + length], blocks[start:start + length])
            start += length
    else:
        start = 0
        block_list = blocks.tolist()
        for seq_id, length in zip(seq_ids.tolist(), lengths.tolist()):
            table[seq_id] = block_list[start:start + length]
            start += length
        del block_list
    return table


def child(table_kind: str, build: str, use_tracemalloc: bool) -> None:
    """Runs in a fresh interpreter: build the table, print bytes per mapped block as JSON.

    The inputs (sequence ids, block ids) are made before the first reading and stay
    alive to the last, so only the table and its build's transients are counted.
    """
    import gc
    if table_kind == "pagetable":
        import pagetable  # noqa: F401  (import cost is not the table's)
    inputs = build_inputs(build)
    lengths = workloads.lognormal_lengths()
    gc.collect()
    if use_tracemalloc:
        import tracemalloc
        tracemalloc.start()
    _reset_peak_rss()
    rss_before = _rss_bytes()
    table = build_table(table_kind, build, inputs)
    gc.collect()
    result: dict[str, Any] = {"table": table_kind, "build": build, "blocks": int(lengths.sum()),
                              "sequences": len(lengths)}
    if use_tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result.update(traced_bytes=current, traced_peak_bytes=peak)
    else:
        rss_after = _rss_bytes()
        result.update(rss_bytes=rss_after - rss_before,
                      peak_rss_bytes=max(_peak_rss_bytes() - rss_before, rss_after - rss_before))
    del table
    print(json.dumps(result))


# The child loads this folder by path, under a private name, as asv loads it from the
# checkout (benchmarks/workloads.py): the code measured is the code that asked, whether
# it was imported as pagetable.cli or loaded from a checkout for an older commit.
_CHILD = """\
import importlib, importlib.util, sys
sys.path[:0] = {path!r}
spec = importlib.util.spec_from_file_location(
    "_pagetable_cli_memory", {init!r}, submodule_search_locations=[{folder!r}])
package = sys.modules["_pagetable_cli_memory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)
importlib.import_module("_pagetable_cli_memory._memory").child({table!r}, {build!r}, {trace!r})
"""


def measure_memory(table_kind: str = "pagetable", build: str = "grow", use_tracemalloc: bool = False,
                   timeout: float = 300) -> dict[str, Any]:
    """Bytes per mapped block of the memory workload, measured in a fresh subprocess.

    ``table_kind`` is ``"pagetable"`` or ``"dict_of_lists"``; ``build`` is one of
    ``BUILDS``.  Returns a dict with ``blocks`` and, per block, ``rss`` and ``peak_rss``
    (RSS run) or ``traced`` and ``traced_peak`` (tracemalloc run).
    """
    if table_kind not in TABLES or build not in BUILDS:
        raise ValueError(f"table must be one of {TABLES} and build one of {BUILDS}, "
                         f"got {table_kind!r}, {build!r}")
    folder = os.path.dirname(os.path.abspath(__file__))
    code = _CHILD.format(path=[p for p in sys.path if p], init=os.path.join(folder, "__init__.py"),
                         folder=folder, table=table_kind, build=build, trace=use_tracemalloc)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=timeout, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{completed.stderr}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    blocks = result["blocks"]
    for key in ("rss_bytes", "peak_rss_bytes", "traced_bytes", "traced_peak_bytes"):
        if key in result:
            result[key.replace("_bytes", "_per_block")] = result[key] / blocks
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagetable.cli._memory",
                                     description="Bytes per mapped block of the memory workload, "
                                                 "measured in a fresh process; prints one JSON line.")
    parser.add_argument("--table", choices=TABLES, default="pagetable")
    parser.add_argument("--build", choices=BUILDS, default="grow")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="count Python allocations (tracemalloc) instead of RSS")
    args = parser.parse_args(argv)
    print(json.dumps(measure_memory(args.table, args.build, args.tracemalloc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
