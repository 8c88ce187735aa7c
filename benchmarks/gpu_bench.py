"""GPU benchmarks of pagetable.gpu against its baselines, printed as one table.

Run on a machine with CuPy and a GPU (``tools/gpu_check.sh`` runs it after the GPU tests)::

    python benchmarks/gpu_bench.py [--tokens 16777216] [--out DIR]

What it measures, against the goals of the GPU issue:

* slot mapping of 16M (row, position) pairs, and of a 1,024-request batch description
  expanded on the device, each as effective bandwidth (bytes read plus written) relative to
  a device-to-device copy measured in the same run (goal: >= 70%);
* the same formulas written as CuPy array expressions (goal: ours >= 3x faster), and,
  where Triton and PyTorch import, vLLM's formulation as a Triton kernel with one program
  per request (goal: ours no slower);
* ``DeviceBlockTable.sync()`` for 1,024 sequences when one in sixteen gains a block,
  against re-uploading the whole table (goal: <= 1% of the table's bytes, >= 10x faster).

Results go to stdout and, when ``--out`` (default ``$OUT``) names a folder, to
``gpu_bench.json`` and ``gpu_bench.md`` there.  Timings of device work use CUDA/HIP events;
``sync`` timings are host wall-clock up to the upload's completion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

GOAL_BANDWIDTH_FRACTION = 0.70
GOAL_SPEEDUP_OVER_CUPY = 3.0
GOAL_SYNC_BYTES_FRACTION = 0.01
GOAL_SYNC_SPEEDUP = 10.0


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 * 2**20, help="tokens per slot mapping")
    parser.add_argument("--requests", type=int, default=1024, help="requests in the batch")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sync-sequences", type=int, default=1024)
    parser.add_argument("--max-blocks", type=int, default=2048,
                        help="columns of the device table (2048 blocks of 16 = 32K tokens)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--sync-steps", type=int, default=64, help="decode steps timed for sync")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton baseline")
    parser.add_argument("--out", default=os.environ.get("OUT") or None,
                        help="folder for gpu_bench.json and gpu_bench.md (default: $OUT)")
    arguments = parser.parse_args(argv)
    if arguments.tokens < arguments.requests or arguments.requests < 1:
        parser.error("need --tokens >= --requests >= 1")
    return arguments


def device_seconds(cupy, function, repeats, warmup=2):
    """Mean seconds per call of ``function``'s device work, timed with events."""
    for _ in range(warmup):
        function()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats


# ------------------------------------------------------------------ workloads


def build_slot_workload(cupy, gpu, PageTable, arguments, rng):
    """A device table whose ``requests`` sequences hold every token of the batch."""
    block_size = arguments.block_size
    num_requests = arguments.requests
    tokens_per_request = arguments.tokens // num_requests
    blocks_needed = -(-2 * tokens_per_request // block_size)  # room for a start offset
    page_table = PageTable(block_size)
    seq_ids = np.arange(num_requests, dtype=np.int64)
    page_table.append_blocks(
        np.repeat(seq_ids, blocks_needed),
        rng.integers(0, 2**31 - 1, size=num_requests * blocks_needed),
    )
    device = gpu.DeviceBlockTable(page_table, num_requests, blocks_needed)
    rows = device.assign(seq_ids)
    device.sync()

    query_lengths = np.full(num_requests, tokens_per_request, dtype=np.int64)
    query_lengths[: arguments.tokens - tokens_per_request * num_requests] += 1
    query_start_loc = np.concatenate([[0], np.cumsum(query_lengths)]).astype(np.int32)
    first_positions = rng.integers(0, tokens_per_request, size=num_requests).astype(np.int64)
    token_rows = np.repeat(rows, query_lengths)
    token_positions = np.repeat(first_positions, query_lengths) + (
        np.arange(arguments.tokens) - np.repeat(query_start_loc[:-1], query_lengths)
    )
    return {
        "page_table": page_table,
        "device": device,
        "rows": cupy.asarray(rows),
        "query_start_loc": cupy.asarray(query_start_loc),
        "first_positions": cupy.asarray(first_positions),
        "max_query_len": int(query_lengths.max()),
        "token_rows": cupy.asarray(token_rows.astype(np.int32)),
        "token_positions": cupy.asarray(token_positions.astype(np.int64)),
        "expected": page_table.slot_mapping(np.repeat(seq_ids, query_lengths), token_positions),
    }


def cupy_pairs_formula(cupy, device, rows, positions, out):
    """The pairs kernel's formula, bounds checks included, as CuPy array expressions."""
    block_size = device.block_size
    valid = (rows >= 0) & (rows < device.max_rows) & (positions >= 0)
    safe_rows = cupy.where(valid, rows, 0)
    logical_blocks = positions // block_size
    valid &= logical_blocks < device.row_lengths[safe_rows]
    safe_blocks = cupy.where(valid, logical_blocks, 0)
    block_ids = device.table[safe_rows, safe_blocks].astype(cupy.int64)
    out[...] = cupy.where(valid, block_ids * block_size + positions % block_size, -1)


def cupy_batch_formula(cupy, device, rows, query_start_loc, first_positions, out):
    """The batch kernel's formula as CuPy array expressions (per-token arrays built)."""
    num_requests = rows.size
    token = cupy.arange(out.size, dtype=cupy.int64)
    request = cupy.searchsorted(query_start_loc[1:], token, side="right")
    in_batch = (request < num_requests) & (token >= query_start_loc[0])
    request = cupy.minimum(request, num_requests - 1)
    positions = first_positions[request] + token - query_start_loc[request]
    cupy_pairs_formula(cupy, device, rows[request], positions, out)
    out[...] = cupy.where(in_batch, out, -1)


def make_triton_baseline():
    """vLLM's formulation: one Triton program per request walks its tokens in tiles."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def slot_mapping_per_request(
        table_pointer, table_stride, row_lengths_pointer, rows_pointer, query_start_loc_pointer,
        first_positions_pointer, out_pointer, num_requests, out_length,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    ):
        request = tl.program_id(0)
        if request == num_requests:  # the extra program pads the tail
            batch_end = tl.load(query_start_loc_pointer + num_requests)
            for tile_start in range(batch_end, out_length, TILE):
                offsets = tile_start + tl.arange(0, TILE)
                tl.store(out_pointer + offsets, tl.full((TILE,), -1, tl.int64), mask=offsets < out_length)
        else:
            query_start = tl.load(query_start_loc_pointer + request)
            query_end = tl.load(query_start_loc_pointer + request + 1)
            row = tl.load(rows_pointer + request).to(tl.int64)
            first_position = tl.load(first_positions_pointer + request)
            mapped_blocks = tl.load(row_lengths_pointer + row)
            for tile_start in range(0, query_end - query_start, TILE):
                offsets = tile_start + tl.arange(0, TILE)
                in_query = offsets < query_end - query_start
                positions = first_position + offsets
                logical_blocks = positions // BLOCK_SIZE
                mapped = in_query & (logical_blocks < mapped_blocks)
                block_ids = tl.load(table_pointer + row * table_stride + logical_blocks,
                                    mask=mapped, other=0).to(tl.int64)
                slots = tl.where(mapped, block_ids * BLOCK_SIZE + positions % BLOCK_SIZE, -1)
                tl.store(out_pointer + query_start + offsets, slots, mask=in_query)

    def run(device, rows, query_start_loc, first_positions, out):
        as_torch = torch.from_dlpack
        table = as_torch(device.table)
        slot_mapping_per_request[(rows.size + 1,)](
            table, table.stride(0), as_torch(device.row_lengths), as_torch(rows),
            as_torch(query_start_loc), as_torch(first_positions), as_torch(out),
            rows.size, out.size, BLOCK_SIZE=device.block_size, TILE=1024,
        )

    return run


# ------------------------------------------------------------------ measurements


def measure_slot_mapping(cupy, gpu, PageTable, arguments, rng, rows_out):
    workload = build_slot_workload(cupy, gpu, PageTable, arguments, rng)
    device = workload["device"]
    num_tokens = arguments.tokens
    padded = num_tokens + 4096  # the batch output carries padding, as a captured graph's would
    out = cupy.empty(num_tokens, dtype=cupy.int64)
    batch_out = cupy.empty(padded, dtype=cupy.int64)

    # Device-to-device copy of a buffer the size of the pairs kernel's traffic.
    copy_bytes = num_tokens * 20
    source = cupy.empty(copy_bytes // 2, dtype=cupy.uint8)
    target = cupy.empty(copy_bytes // 2, dtype=cupy.uint8)
    copy_seconds = device_seconds(
        cupy, lambda: target.data.copy_from_device_async(source.data, source.nbytes), arguments.repeats
    )
    copy_bandwidth = 2 * source.nbytes / copy_seconds
    rows_out.append({"name": "device-to-device copy (read + write)", "seconds": copy_seconds,
                     "bytes": 2 * source.nbytes, "bandwidth": copy_bandwidth})

    def add(name, seconds, traffic, baseline_of=None):
        row = {"name": name, "seconds": seconds, "bytes": traffic,
               "bandwidth": traffic / seconds, "fraction_of_copy": traffic / seconds / copy_bandwidth}
        if baseline_of is not None:
            row["ours_speedup"] = seconds / baseline_of
        rows_out.append(row)
        return row

    rows, positions = workload["token_rows"], workload["token_positions"]
    pairs_seconds = device_seconds(
        cupy, lambda: device.slot_mapping(rows, positions, out=out), arguments.repeats
    )
    np.testing.assert_array_equal(out.get(), workload["expected"])
    pairs = add("slot_mapping pairs (ours)", pairs_seconds, num_tokens * (4 + 8 + 8))
    pairs["goal"] = f">= {GOAL_BANDWIDTH_FRACTION:.0%} of copy"
    pairs["met"] = bool(pairs["fraction_of_copy"] >= GOAL_BANDWIDTH_FRACTION)

    formula_seconds = device_seconds(
        cupy, lambda: cupy_pairs_formula(cupy, device, rows, positions, out), max(arguments.repeats // 4, 1)
    )
    np.testing.assert_array_equal(out.get(), workload["expected"])
    formula = add("  baseline: same formula as CuPy expressions", formula_seconds,
                  num_tokens * 20, baseline_of=pairs_seconds)
    formula["goal"] = f"ours >= {GOAL_SPEEDUP_OVER_CUPY:g}x faster"
    formula["met"] = bool(formula["ours_speedup"] >= GOAL_SPEEDUP_OVER_CUPY)

    batch_arguments = (workload["rows"], workload["query_start_loc"], workload["first_positions"])

    def ours_batch():
        device.slot_mapping_from_batch(*batch_arguments, out=batch_out,
                                       max_query_len=workload["max_query_len"])

    batch_seconds = device_seconds(cupy, ours_batch, arguments.repeats)
    result = batch_out.get()
    np.testing.assert_array_equal(result[:num_tokens], workload["expected"])
    assert (result[num_tokens:] == -1).all()
    batch = add("slot_mapping_from_batch (ours)", batch_seconds, padded * 8)
    batch["goal"] = f">= {GOAL_BANDWIDTH_FRACTION:.0%} of copy"
    batch["met"] = bool(batch["fraction_of_copy"] >= GOAL_BANDWIDTH_FRACTION)

    formula_seconds = device_seconds(
        cupy, lambda: cupy_batch_formula(cupy, device, *batch_arguments, batch_out),
        max(arguments.repeats // 4, 1),
    )
    np.testing.assert_array_equal(batch_out.get()[:num_tokens], workload["expected"])
    formula = add("  baseline: same formula as CuPy expressions", formula_seconds, padded * 8,
                  baseline_of=batch_seconds)
    formula["goal"] = f"ours >= {GOAL_SPEEDUP_OVER_CUPY:g}x faster"
    formula["met"] = bool(formula["ours_speedup"] >= GOAL_SPEEDUP_OVER_CUPY)

    if arguments.no_triton:
        rows_out.append({"name": "  baseline: Triton, one program per request", "note": "skipped (--no-triton)"})
        return
    try:
        triton_run = make_triton_baseline()
        triton_seconds = device_seconds(
            cupy, lambda: triton_run(device, *batch_arguments, batch_out), arguments.repeats
        )
        np.testing.assert_array_equal(batch_out.get()[:num_tokens], workload["expected"])
    except Exception as error:  # Triton or PyTorch missing, unusable, or the baseline wrong
        message = " ".join(f"{type(error).__name__}: {error}".split())[:160]
        rows_out.append({"name": "  baseline: Triton, one program per request",
                         "note": f"skipped: {message}"})
        return
    triton = add("  baseline: Triton, one program per request", triton_seconds, padded * 8,
                 baseline_of=batch_seconds)
    triton["goal"] = "ours no slower"
    triton["met"] = bool(triton["ours_speedup"] >= 1.0)


def measure_sync(cupy, gpu, PageTable, arguments, rng, rows_out):
    """A decode step: 1 in 16 sequences gains a block; sync versus whole-table uploads."""
    num_sequences, max_blocks = arguments.sync_sequences, arguments.max_blocks
    page_table = PageTable(arguments.block_size)
    seq_ids = np.arange(num_sequences, dtype=np.int64)
    lengths = rng.integers(max_blocks // 4, max_blocks // 2, size=num_sequences)
    page_table.append_blocks(np.repeat(seq_ids, lengths), rng.integers(0, 2**31 - 1, size=lengths.sum()))
    device = gpu.DeviceBlockTable(page_table, num_sequences, max_blocks)
    device.assign(seq_ids)
    device.sync()
    stream = cupy.cuda.get_current_stream()
    steps = arguments.sync_steps

    def decode_step(step):
        growing = seq_ids[step % 16::16]
        page_table.append_blocks(growing, rng.integers(0, 2**31 - 1, size=growing.size))

    incremental, fractions = [], []
    for step in range(steps + 3):
        decode_step(step)
        start = time.perf_counter()
        stats = device.sync()
        stream.synchronize()
        if step >= 3:
            incremental.append(time.perf_counter() - start)
            fractions.append(stats.bytes_uploaded / stats.table_bytes)
        assert stats.mode == "incremental", stats
    incremental_seconds = statistics.median(incremental)

    # Check once that the incremental table is right before timing the baselines.
    host_table = np.empty((num_sequences, max_blocks), dtype=np.int32)
    expected, counts = page_table.block_table(seq_ids, out=host_table)
    np.testing.assert_array_equal(device.table.get(), expected)
    np.testing.assert_array_equal(device.row_lengths.get(), counts)

    # Baseline 1: rebuild the dense table on the host and copy all of it (pageable memory).
    device_table = cupy.empty((num_sequences, max_blocks), dtype=cupy.int32)
    rebuild = []
    for step in range(steps // 4 + 2):
        decode_step(step)
        start = time.perf_counter()
        page_table.block_table(seq_ids, out=host_table)
        device_table.set(host_table)
        stream.synchronize()
        rebuild.append(time.perf_counter() - start)
    rebuild_seconds = statistics.median(rebuild[2:])

    # Baseline 2: the host keeps its dense table current (vLLM's CPU block table) and copies
    # the whole of it from pinned memory each step: the cheapest full re-upload.
    pinned = cupy.cuda.alloc_pinned_memory(host_table.nbytes)
    pinned_table = np.frombuffer(pinned, dtype=np.int32, count=host_table.size)
    pinned_table[:] = host_table.ravel()
    copy_only = []
    for _ in range(steps // 4 + 2):
        start = time.perf_counter()
        device_table.data.copy_from_host_async(pinned.ptr, host_table.nbytes, stream)
        stream.synchronize()
        copy_only.append(time.perf_counter() - start)
    copy_only_seconds = statistics.median(copy_only[2:])

    table_bytes = device.last_sync.table_bytes
    worst_fraction = max(fractions)
    ours = {"name": f"sync(), {num_sequences} seqs, 1 in 16 gains a block (ours)",
            "seconds": incremental_seconds, "bytes": worst_fraction * table_bytes,
            "bytes_fraction": worst_fraction,
            "goal": f"<= {GOAL_SYNC_BYTES_FRACTION:.0%} of table bytes",
            "met": bool(worst_fraction <= GOAL_SYNC_BYTES_FRACTION)}
    rows_out.append(ours)
    for name, seconds in (("  baseline: rebuild dense table + full copy", rebuild_seconds),
                          ("  baseline: full copy from a pinned host table", copy_only_seconds)):
        rows_out.append({"name": name, "seconds": seconds, "bytes": table_bytes,
                         "ours_speedup": seconds / incremental_seconds,
                         "goal": f"ours >= {GOAL_SYNC_SPEEDUP:g}x faster",
                         "met": bool(seconds / incremental_seconds >= GOAL_SYNC_SPEEDUP)})


# ------------------------------------------------------------------ report


def format_table(device_name, rows):
    lines = [f"pagetable GPU benchmarks on {device_name}", ""]
    header = f"{'measurement':<58} {'time':>11} {'GB/s':>8} {'% copy':>7} {'ours x':>7}  goal"
    lines += [header, "-" * len(header)]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['name']:<58} {row['note']}")
            continue
        seconds = row["seconds"]
        time_text = f"{seconds * 1e6:,.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.2f} ms"
        bandwidth = f"{row['bandwidth'] / 1e9:,.0f}" if "bandwidth" in row else ""
        fraction = f"{row['fraction_of_copy']:.0%}" if "fraction_of_copy" in row else ""
        if "bytes_fraction" in row:
            fraction = f"{row['bytes_fraction']:.3%}"
        speedup = f"{row['ours_speedup']:.1f}" if "ours_speedup" in row else ""
        goal = ""
        if "goal" in row:
            goal = f"{row['goal']}: {'met' if row['met'] else 'NOT met'}"
        lines.append(f"{row['name']:<58} {time_text:>11} {bandwidth:>8} {fraction:>7} {speedup:>7}  {goal}")
    lines.append("")
    lines.append("% copy: bytes read + written per second over the device-to-device copy's; "
                 "for sync(), bytes uploaded over the table's bytes.  ours x: baseline time / ours.")
    return "\n".join(lines)


def main(argv=None):
    arguments = parse_arguments(argv)
    import cupy

    from pagetable import PageTable
    from pagetable import gpu

    if not gpu.is_available():
        print("gpu_bench: no GPU device usable through CuPy; nothing to measure", file=sys.stderr)
        return 2
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    device_name = properties["name"]
    device_name = device_name.decode() if isinstance(device_name, bytes) else str(device_name)
    rng = np.random.default_rng(0)
    rows = []
    measure_slot_mapping(cupy, gpu, PageTable, arguments, rng, rows)
    measure_sync(cupy, gpu, PageTable, arguments, rng, rows)
    report = format_table(device_name, rows)
    print(report)
    if arguments.out:
        os.makedirs(arguments.out, exist_ok=True)
        with open(os.path.join(arguments.out, "gpu_bench.md"), "w") as f:
            f.write("```\n" + report + "\n```\n")
        with open(os.path.join(arguments.out, "gpu_bench.json"), "w") as f:
            json.dump({"device": device_name, "python": platform.python_version(),
                       "cupy": cupy.__version__, "arguments": vars(arguments), "results": rows},
                      f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
