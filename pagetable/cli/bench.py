"""``pagetable bench``: pagetable side by side with its baselines, goal by goal.

Every speed goal is a ratio of two timings taken in this process, interleaved
(ours, baseline, ours, baseline, ...) so that load from other processes hits both
alike; each figure is the minimum over the repeats.  The workloads live in
:mod:`pagetable.cli.workloads`, the baselines in :mod:`pagetable.cli._baselines` and
the memory reading in :mod:`pagetable.cli._memory`, the engine models of the step rows in
:mod:`pagetable.cli._engines` (benchmark-only code).

Usage::

    pagetable bench [--quick] [--plot FILE.png] [--json FILE] [--no-memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import _baselines as bl
from . import _engines, _memory, _options, workloads
from ._progress import Progress

HELP = "time pagetable against its baselines and report each speed goal as a ratio"


@dataclass
class Row:
    """One line of the table: ours against one baseline, and the goal it is held to."""

    goal: str              # which speed goal ("1", "2", ...), "" for information only
    operation: str
    size: str
    ours: float            # seconds per call (bytes per block for memory)
    baseline_name: str
    baseline: float
    ratio: float           # baseline / ours: above 1 means ours is faster (smaller)
    target: float | None   # the ratio the goal asks for, None for information only
    target_text: str
    unit: str = "s"

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.unit == "B":     # memory: an upper bound on our bytes per block
            return self.ours < self.target
        return self.ratio >= self.target


# --------------------------------------------------------------------------- timing


def _calibrate(function, min_sample):
    """Calls per sample so that one sample lasts at least ``min_sample`` seconds."""
    function()                                   # warm-up: caches, lazy allocations
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            function()
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample or number >= 1 << 20:
            return number
        number = max(number * 2, int(number * min_sample / max(elapsed, 1e-9)) + 1)


def compare(candidates: dict[str, Callable[[], object]], repeats: int, min_sample: float,
            medians: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per call of each candidate: the minimum over interleaved repeats.

    Parameters
    ----------
    candidates : dict of str to callable
        Zero-argument callables, timed in turn within each repeat.
    repeats : int
        Samples per candidate.
    min_sample : float
        Seconds one sample should last at least (calls are batched to reach it).
        Short samples and many repeats give the minimum more chances to miss the
        other processes on a shared machine.
    medians : dict, optional
        Filled with the median seconds per call of each candidate, for the JSON.
    """
    numbers = {name: _calibrate(function, min_sample) for name, function in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            number = numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                function()
            samples[name].append((time.perf_counter() - start) / number)
    if medians is not None:
        medians.update({name: float(np.median(values)) for name, values in samples.items()})
    return {name: min(values) for name, values in samples.items()}


def compare_fresh(candidates: dict[str, tuple[Callable[[], Any], Callable[[Any], object]]],
                  repeats: int, medians: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per run of each candidate on fresh state: the minimum over interleaved repeats.

    For work that changes its state (engine steps): each candidate is a ``(setup, run)``
    pair; every sample builds its state with ``setup()`` untimed, then times one
    ``run(state)`` with the garbage collector held off (the engines' object graphs would
    otherwise be traced mid-sample).  The collection runs before ``setup``, so that it
    does not leave the state it would walk cold in the caches.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (setup, run) in candidates.items():
            gc.collect()
            state = setup()
            gc.disable()
            try:
                start = time.perf_counter()
                run(state)
                samples[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    if medians is not None:
        medians.update({name: float(np.median(values)) for name, values in samples.items()})
    return {name: min(values) for name, values in samples.items()}


def _check_equal(name, ours, theirs):
    for mine, other in zip(ours if isinstance(ours, tuple) else (ours,),
                           theirs if isinstance(theirs, tuple) else (theirs,)):
        if not np.array_equal(np.asarray(mine), np.asarray(other)):
            raise AssertionError(f"{name}: pagetable and its baseline disagree")


# --------------------------------------------------------------------------- goals


SLOT_CASES = [  # goal, block size, tokens, interleaved, formula target, floor target
    ("1", 16, 1 << 20, False, 8.0, 1 / 1.6),
    ("1", 24, 1 << 20, False, 2.5, None),
    ("", 16, 1 << 20, True, None, None),
    ("", 16, 1 << 16, False, None, None),   # where a parallel path may start to pay
    ("2", 16, 8192, False, 3.0, None),
    ("2", 16, 8192, True, 3.0, None),
    ("", 24, 8192, False, None, None),
]


def _slot_mapping_rows(PageTable, settings, progress):
    rows = []
    tables = {}

    def setup(block_size):
        if block_size not in tables:
            workload = workloads.TableWorkload.slot_mapping_table(block_size)
            tables[block_size] = (workload, workload.build_pagetable(PageTable),
                                  workload.build_dense_table())
        return tables[block_size]

    for goal, block_size, tokens, interleaved, formula_target, floor_target in SLOT_CASES:
        workload, table, dense = setup(block_size)
        batch = workloads.token_batch(workload, tokens, interleaved)
        expected = bl.formula_slot_mapping(dense, batch.rows, batch.positions, block_size,
                                           np.empty(tokens, dtype=np.int64))
        ours_out = np.empty(tokens, dtype=np.int64)
        floor_out = np.empty(tokens, dtype=np.int64)
        big = tokens == 1 << 20 and block_size == 16 and not interleaved
        _check_equal("slot_mapping", table.slot_mapping(batch.seq_ids, batch.positions), expected)
        with_hints = tokens == 8192 and block_size == 16
        if with_hints:
            # Row hints, one per token: what an engine keeps beside its batch, as the
            # formula is handed its dense-table rows.  Results must not change.
            hints = np.ascontiguousarray(table.rows(workload.seq_ids)[batch.rows])
            _check_equal("slot_mapping with row hints",
                         table.slot_mapping(batch.seq_ids, batch.positions, rows=hints), expected)
        candidates = {
            "ours": lambda: table.slot_mapping(batch.seq_ids, batch.positions, out=ours_out),
            "formula": lambda: bl.formula_slot_mapping(dense, batch.rows, batch.positions,
                                                       block_size, batch.out),
            "floor": lambda: bl.memcpy_floor(batch.positions, floor_out),
        }
        if with_hints:
            candidates["hinted"] = lambda: table.slot_mapping(
                batch.seq_ids, batch.positions, out=ours_out, rows=hints)
        if big:
            candidates["input floor"] = lambda: bl.input_stream_floor(
                batch.seq_ids, batch.positions, floor_out)
        times = compare(candidates, settings["repeats"], settings["min_sample"])
        size = f"{tokens:,} tokens, block size {block_size}, {'interleaved' if interleaved else 'grouped'}"
        progress.advance(f"slot_mapping, {size}")
        rows.append(Row(goal, "slot_mapping", size, times["ours"], "vLLM formula",
                        times["formula"], times["formula"] / times["ours"], formula_target,
                        f">= {formula_target:g}x" if formula_target else "-"))
        if with_hints:
            rows.append(Row(goal, "slot_mapping + hints", size, times["hinted"], "vLLM formula",
                            times["formula"], times["formula"] / times["hinted"], formula_target,
                            f">= {formula_target:g}x" if formula_target else "-"))
        if big:
            rows.append(Row(goal, "slot_mapping", size, times["ours"], "memcpy floor",
                            times["floor"], times["floor"] / times["ours"], floor_target,
                            "within 1.6x"))
            rows.append(Row("", "slot_mapping", size, times["ours"],
                            "input floor", times["input floor"],
                            times["input floor"] / times["ours"], None, "-"))
    # lookup returns (block, offset): shown beside the same formula, for information.
    workload, table, dense = setup(16)
    batch = workloads.token_batch(workload, 1 << 20, False)
    _check_equal("lookup", table.lookup(batch.seq_ids, batch.positions),
                 bl.formula_lookup(dense, batch.rows, batch.positions, 16))
    times = compare({
        "ours": lambda: table.lookup(batch.seq_ids, batch.positions),
        "formula": lambda: bl.formula_lookup(dense, batch.rows, batch.positions, 16),
    }, settings["repeats"], settings["min_sample"])
    progress.advance("lookup")
    rows.append(Row("", "lookup", "1,048,576 tokens, block size 16, grouped", times["ours"],
                    "vLLM formula", times["formula"], times["formula"] / times["ours"], None, "-"))
    return rows


def _get_block_rows(PageTable, settings, progress):
    workload = workloads.TableWorkload.slot_mapping_table(16)
    table = workload.build_pagetable(PageTable)
    seed_table = workload.build_dict_of_lists()
    count = settings["queries"]
    seq_ids, positions = workloads.random_queries(workload, count)
    for seq_id, position in zip(seq_ids[:1000], positions[:1000]):
        if table.get_block_for_position(seq_id, position) != seed_table.get_block_for_position(seq_id, position):
            raise AssertionError("get_block_for_position: pagetable and the seed disagree")

    def ours():
        get = table.get_block_for_position
        for seq_id, position in zip(seq_ids, positions):
            get(seq_id, position)

    times = compare({"ours": ours,
                     "seed": lambda: bl.dict_get_block_loop(seed_table, seq_ids, positions)},
                    settings["repeats"], settings["min_sample"])
    progress.advance("get_block_for_position")
    return [Row("3", "get_block_for_position", f"{count:,} calls from a Python loop, time per call",
                times["ours"] / count, "seed dict of lists", times["seed"] / count,
                times["seed"] / times["ours"], 2.5, ">= 2.5x")]


APPEND_ORDERS = (False, True)   # grouped?


def _append_rows(PageTable, settings, progress):
    per_sequence = settings["append_blocks_per_sequence"]
    rows = []
    for grouped in APPEND_ORDERS:
        owners, blocks = workloads.append_stream(1024, per_sequence, grouped=grouped)
        owner_list, block_list = owners.tolist(), blocks.tolist()
        count = len(block_list)

        def batched():
            PageTable(16).append_blocks(owners, blocks)

        def one_by_one():
            table = PageTable(16)
            for seq_id, block_id in zip(owner_list, block_list):
                table.append_block(seq_id, block_id)

        batched_table = PageTable(16)
        batched_table.append_blocks(owners, blocks)
        looped_table = PageTable(16)
        for seq_id, block_id in zip(owner_list, block_list):
            looped_table.append_block(seq_id, block_id)
        seed = bl.setdefault_append_loop(owner_list, block_list)
        for seq_id, expected in seed.items():
            _check_equal("append_blocks", batched_table.get_sequence_blocks(seq_id), expected)
            _check_equal("append_block", looped_table.get_sequence_blocks(seq_id), expected)

        times = compare({
            "batched": batched,
            "loop": one_by_one,
            "setdefault": lambda: bl.setdefault_append_loop(owner_list, block_list),
        }, settings["repeats"], settings["min_sample"])
        size = (f"{count:,} blocks over 1,024 sequences, {'grouped' if grouped else 'round-robin'}, "
                f"time per block")
        progress.advance("append_blocks")
        rows.append(Row("4", "append_blocks", size, times["batched"] / count,
                        "append_block loop", times["loop"] / count,
                        times["loop"] / times["batched"], 10.0, ">= 10x"))
        rows.append(Row("4", "append_block loop", size, times["loop"] / count,
                        "setdefault loop", times["setdefault"] / count,
                        times["setdefault"] / times["loop"], 1.0, "no slower"))
    return rows


def _table_rows(PageTable, settings, progress):
    workload = workloads.TableWorkload.block_table_batch(256)
    table = workload.build_pagetable(PageTable)
    seed_table = workload.build_dict_of_lists()
    seq_ids = workload.seq_ids
    seq_list = seq_ids.tolist()
    _check_equal("block_table", table.block_table(seq_ids), seed_table.block_table(seq_list))
    _check_equal("to_csr", table.to_csr(seq_ids), seed_table.to_csr(seq_list))
    times = compare({
        "block_table": lambda: table.block_table(seq_ids),
        "block_table_seed": lambda: seed_table.block_table(seq_list),
        "to_csr": lambda: table.to_csr(seq_ids),
        "to_csr_seed": lambda: seed_table.to_csr(seq_list),
    }, settings["repeats"], settings["min_sample"])
    progress.advance("block_table, to_csr")
    size = f"256 sequences of up to 2,048 blocks ({workload.total_blocks:,} blocks)"
    return [
        Row("5", name, size, times[name], "numpy from lists", times[name + "_seed"],
            times[name + "_seed"] / times[name], 5.0, ">= 5x")
        for name in ("block_table", "to_csr")
    ]


# Engine steps: pagetable against the engines' own bookkeeping (pagetable/cli/_engines.py).
# (goal, target against the vLLM model, target against the LMDeploy model) per case.
DECODE_CASES = [(256, "", None, None), (1024, "7", 300.0, 100.0)]
SERVING_TARGETS = ("8", 150.0, 50.0)
ADMISSION_TARGET = ("9", 30.0)
SLOT_ALONE_TARGET = ("10", 5.0)
ENGINE_UNITS = len(DECODE_CASES) + 4   # decode cases, serving, admission, free, slot mapping


def _engine_candidates(setup, run):
    return {side: (lambda side=side: setup(side), lambda state, side=side: run(side, state))
            for side in _engines.SIDES}


def _versus(goal, operation, size, times, ours, targets, divide=1):
    """Rows of ``ours`` against each engine model; ``targets``: side -> target or None."""
    rows = []
    for side in _engines.SIDES[1:]:
        target = targets.get(side)
        rows.append(Row(goal if target else "", operation, size, times[ours] / divide,
                        f"{side} model", times[side] / divide, times[side] / times[ours], target,
                        f">= {target:g}x" if target else "-"))
    return rows


def _engine_rows(PageTable, settings, progress):
    repeats = settings["engine_repeats"]
    rows = []
    for num_seqs, goal, vllm_target, lmdeploy_target in DECODE_CASES:
        batch = workloads.decode_batch(num_seqs)
        times = compare_fresh(_engine_candidates(
            lambda side: _engines.decode_setup(side, batch),
            lambda side, engine: _engines.decode_run(side, engine, batch)), repeats)
        progress.advance(f"decode step, {num_seqs} sequences")
        size = (f"decode step, {num_seqs:,} sequences of 1..2,048 tokens, block size 16 "
                f"(mean of {batch.steps} steps)")
        rows += _versus(goal, "decode step", size, times, "pagetable",
                        {"vLLM": vllm_target, "LMDeploy": lmdeploy_target}, batch.steps)

    trace = workloads.serving_trace(settings["serving_steps"])
    python_steps = workloads.serving_python_steps(trace)
    times = compare_fresh(_engine_candidates(
        lambda side: _engines.serving_setup(side, trace),
        lambda side, engine: _engines.serving_run(side, engine, trace, python_steps)), repeats)
    progress.advance("serving loop")
    goal, vllm_target, lmdeploy_target = SERVING_TARGETS
    admitted = sum(len(step.new_ids) for step in trace.steps)
    size = (f"serving loop, {len(trace.steps)} steps, {trace.max_rows} running, "
            f"{admitted} admitted and freed (mean per step)")
    rows += _versus(goal, "serving step", size, times, "pagetable",
                    {"vLLM": vllm_target, "LMDeploy": lmdeploy_target}, len(trace.steps))

    seq_ids, num_tokens = workloads.admission_prompts()
    lists = (seq_ids.tolist(), num_tokens.tolist())
    candidates = _engine_candidates(
        lambda side: _engines.admission_setup(side, num_tokens),
        lambda side, engine: _engines.admission_run(side, engine, seq_ids, num_tokens, lists))
    candidates["add_sequence loop"] = (lambda: _engines.admission_setup("pagetable", num_tokens),
                                       lambda engine: engine.admit_one_by_one(*lists))
    times = compare_fresh(candidates, repeats)
    progress.advance("admission")
    goal, target = ADMISSION_TARGET
    size = f"admit {len(seq_ids)} prompts ({int(num_tokens.sum()):,} tokens), one call per prompt in the models"
    rows += _versus(goal, "add_sequences", size, times, "pagetable", {"vLLM": target})
    rows += _versus("", "add_sequence loop", size, times, "add_sequence loop", {})

    times = compare_fresh(_engine_candidates(
        lambda side: _engines.free_setup(side, seq_ids, num_tokens),
        lambda side, engine: _engines.free_run(side, engine, seq_ids, lists[0])), repeats)
    progress.advance("free")
    rows += _versus("", "free_sequence", f"free {len(seq_ids)} finished sequences", times,
                    "pagetable", {})

    goal, target = SLOT_ALONE_TARGET
    decode = workloads.decode_batch(1024)
    for case, size in (
            (_engines.slot_mapping_case(seq_ids, num_tokens, decode=False),
             f"slot mapping alone, the {int(num_tokens.sum()):,} prompt tokens just admitted"),
            (_engines.slot_mapping_case(decode.seq_ids, decode.num_tokens, decode=True),
             "slot mapping alone, 1,024 decode tokens (one per sequence)")):
        times = compare({"ours": case.pagetable, "hinted": lambda case=case: case.pagetable(True),
                         "vLLM": case.vllm}, settings["repeats"], settings["min_sample"])
        rows.append(Row(goal, "slot_mapping", size, times["ours"], "vLLM slot mapping",
                        times["vLLM"], times["vLLM"] / times["ours"], target, f">= {target:g}x"))
        rows.append(Row(goal, "slot_mapping + hints", size, times["hinted"], "vLLM slot mapping",
                        times["vLLM"], times["vLLM"] / times["hinted"], target, f">= {target:g}x"))
    progress.advance("slot mapping alone")
    return rows


MEMORY_BUILDS = ("grow", "bulk")
MEMORY_UNITS = 2 + len(MEMORY_BUILDS)   # the seed's two readings, then ours per build


def _memory_rows(settings, progress):
    rows = []
    seed_traced = _memory.measure_memory("dict_of_lists", "grow", use_tracemalloc=True)
    progress.advance("memory")
    seed = _memory.measure_memory("dict_of_lists", "grow")
    progress.advance("memory")
    size = (f"bytes per block, 10,000 lognormal sequences ({seed['blocks']:,} blocks); "
            f"seed dict traced: {seed_traced['traced_per_block']:.1f} B")
    for build in MEMORY_BUILDS:
        ours = _memory.measure_memory("pagetable", build)
        progress.advance("memory")
        # The goal counts transients, so the peak is what is held to 10 B/block.
        rows.append(Row("6", f"peak RSS, {build}", size, ours["peak_rss_per_block"],
                        "seed dict, grow", seed["peak_rss_per_block"],
                        seed["peak_rss_per_block"] / max(ours["peak_rss_per_block"], 1e-9),
                        10.0, "< 10 B", unit="B"))
        rows.append(Row("", f"RSS after, {build}", size, ours["rss_per_block"],
                        "seed dict, grow", seed["rss_per_block"],
                        seed["rss_per_block"] / max(ours["rss_per_block"], 1e-9), None, "-",
                        unit="B"))
    return rows


# --------------------------------------------------------------------------- sweep / plot


def sweep(PageTable: type, settings: dict[str, Any], progress: Progress) -> dict[str, dict[str, list[float]]]:
    """Throughput against batch size, for the plot (and the JSON)."""
    workload = workloads.TableWorkload.slot_mapping_table(16)
    table = workload.build_pagetable(PageTable)
    dense = workload.build_dense_table()
    result: dict[str, dict[str, list[float]]] = {
        "slot_mapping": {"tokens": [], "pagetable grouped": [], "pagetable interleaved": [],
                         "vLLM formula": [], "memcpy floor": []},
        "block_table": {"sequences": [], "pagetable block_table": [], "pagetable to_csr": [],
                        "numpy rows from lists": [], "numpy CSR from lists": []}}
    for tokens in settings["sweep_tokens"]:
        grouped = workloads.token_batch(workload, tokens, False)
        mixed = workloads.token_batch(workload, tokens, True)
        out = np.empty(tokens, dtype=np.int64)
        times = compare({
            "pagetable grouped": lambda: table.slot_mapping(grouped.seq_ids, grouped.positions, out=out),
            "pagetable interleaved": lambda: table.slot_mapping(mixed.seq_ids, mixed.positions, out=out),
            "vLLM formula": lambda: bl.formula_slot_mapping(dense, grouped.rows, grouped.positions, 16, grouped.out),
            "memcpy floor": lambda: bl.memcpy_floor(grouped.positions, out),
        }, settings["sweep_repeats"], settings["min_sample"])
        progress.advance("sweep")
        result["slot_mapping"]["tokens"].append(tokens)
        for name, seconds in times.items():
            result["slot_mapping"][name].append(tokens / seconds)
    big = workloads.TableWorkload.block_table_batch(256)
    big_table = big.build_pagetable(PageTable)
    seed_table = big.build_dict_of_lists()
    for count in settings["sweep_sequences"]:
        seq_ids = big.seq_ids[:count]
        seq_list = seq_ids.tolist()
        blocks = int(big.lengths[:count].sum())
        times = compare({
            "pagetable block_table": lambda: big_table.block_table(seq_ids),
            "pagetable to_csr": lambda: big_table.to_csr(seq_ids),
            "numpy rows from lists": lambda: seed_table.block_table(seq_list),
            "numpy CSR from lists": lambda: seed_table.to_csr(seq_list),
        }, settings["sweep_repeats"], settings["min_sample"])
        progress.advance("sweep")
        result["block_table"]["sequences"].append(count)
        for name, seconds in times.items():
            result["block_table"][name].append(blocks / seconds)
    return result


def plot(result, path):
    """Draw throughput against batch size (``check`` has made sure matplotlib imports)."""
    import matplotlib  # type: ignore[import-not-found]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    slot = result["slot_mapping"]
    for name, values in slot.items():
        if name != "tokens":
            left.plot(slot["tokens"], values, marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="tokens per call",
             ylabel="tokens per second", title="slot_mapping, block size 16")
    table = result["block_table"]
    for name, values in table.items():
        if name != "sequences":
            right.plot(table["sequences"], values, marker="o", label=name)
    right.set(xscale="log", yscale="log", xlabel="sequences per call (<= 2,048 blocks each)",
              ylabel="blocks per second", title="block_table / to_csr")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """What the figures came from."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import pagetable
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "pagetable": getattr(pagetable, "__version__", "?"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "platform": platform.platform()}


def _format(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value:.1f} B"
    for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value / 1e-9:.3g} ns"


def format_table(rows: list[Row]) -> str:
    """The table as text, under 100 columns (also the form docs/PERFORMANCE.md quotes).

    Rows of one workload follow the line that names it, so that no column has to hold
    the workload's description.
    """
    header = ("goal", "operation", "pagetable", "baseline", "its time", "ratio", "target", "met?")
    cells = []
    for row in rows:
        met = row.met
        cells.append((row.goal, row.operation, _format(row.ours, row.unit), row.baseline_name,
                      _format(row.baseline, row.unit), f"{row.ratio:.2f}x", row.target_text,
                      "-" if met is None else ("yes" if met else "NO")))
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def join(line: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    out = [join(header), "  ".join("-" * width for width in widths)]
    size = None
    for row, line in zip(rows, cells):
        if row.size != size:
            size = row.size
            out.append(size)
        out.append(join(line))
    return "\n".join(out)


QUICK: dict[str, Any] = {"repeats": 15, "min_sample": 0.002, "queries": 10_000, "append_blocks_per_sequence": 32,
         "engine_repeats": 5, "serving_steps": 100,
         "sweep_tokens": [1 << 10, 1 << 13, 1 << 16, 1 << 20], "sweep_sequences": [4, 16, 64, 256],
         "sweep_repeats": 3}
FULL: dict[str, Any] = {"repeats": 41, "min_sample": 0.005, "queries": 100_000, "append_blocks_per_sequence": 64,
        "engine_repeats": 21, "serving_steps": workloads.SERVING_STEPS,
        "sweep_tokens": [1 << k for k in range(8, 21, 2)], "sweep_sequences": [1, 4, 16, 64, 256],
        "sweep_repeats": 7}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repeats; under a minute")
    parser.add_argument("--plot", metavar="FILE.png", type=_options.output_file,
                        help="draw throughput against batch size (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", type=_options.output_file,
                        help="write every figure as JSON")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory goal (it runs fresh subprocesses)")


def check(args: argparse.Namespace) -> str | None:
    """Refuse ``--plot`` without matplotlib before minutes of timing, not after."""
    return _options.matplotlib_missing() if args.plot else None


SECTIONS = (  # (function, units of progress it reports)
    (_slot_mapping_rows, len(SLOT_CASES) + 1),
    (_get_block_rows, 1),
    (_append_rows, len(APPEND_ORDERS)),
    (_table_rows, 1),
    (_engine_rows, ENGINE_UNITS),
)


def measure(settings: dict[str, Any], memory: bool, with_sweep: bool,
            progress: Progress) -> tuple[list[Row], dict[str, Any] | None]:
    """Every row of the table (and the sweep, when asked), reporting to ``progress``."""
    from pagetable import PageTable

    rows: list[Row] = []
    for section, _ in SECTIONS:
        rows += section(PageTable, settings, progress)
    if memory:
        rows += _memory_rows(settings, progress)
    return rows, sweep(PageTable, settings, progress) if with_sweep else None


def run(args: argparse.Namespace) -> int:
    """Run the comparison; returns the exit status (0 even when a goal is missed)."""
    settings = QUICK if args.quick else FULL
    info = machine()
    print(f"pagetable {info['pagetable']} on {info['cpu']} ({info['cpus']} CPUs), "
          f"Python {info['python']}, numpy {info['numpy']}, OMP_NUM_THREADS={info['OMP_NUM_THREADS']}")
    print("ratio = baseline time / pagetable time (memory: baseline bytes / ours); "
          f"minimum of {settings['repeats']} interleaved repeats\n", flush=True)

    with_sweep = bool(args.plot or args.json)
    units = (sum(count for _, count in SECTIONS) + (0 if args.no_memory else MEMORY_UNITS)
             + (len(settings["sweep_tokens"]) + len(settings["sweep_sequences"]) if with_sweep else 0))
    started = time.perf_counter()
    progress = Progress(units, "timings")
    try:
        rows, sweep_result = measure(settings, not args.no_memory, with_sweep, progress)
    finally:
        progress.close()
    print(format_table(rows))

    result: dict[str, Any] = {"machine": info, "quick": args.quick, "settings": settings,
                              "rows": [dict(asdict(row), met=row.met) for row in rows]}
    if sweep_result is not None:
        result["sweep"] = sweep_result
    if args.plot:
        plot(result["sweep"], args.plot)
        print(f"\nplot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"figures written to {args.json}")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0
