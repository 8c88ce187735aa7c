"""Measure the resident memory a PageTable holds per mapped block (Linux only).

Run as ``python -m pagetable._memory [--mode MODE]`` in a fresh process; prints one JSON
line.  The workload is 10,000 sequences with long-tailed lengths (lognormal, median
32 blocks, capped at 4,096).  ``mode`` says how the table is built:

* ``per-sequence``: one ``append_blocks`` call per sequence (a prefill);
* ``round-robin``: one block at a time to every sequence still growing, as decode
  steps grow a batch (the worst case for relocation);
* ``dict``: the seed's layout, a dict of lists of Python ints, for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def workload_lengths(num_sequences: int = 10_000, median: int = 32, cap: int = 4096, seed: int = 0) -> np.ndarray:
    """Block counts per sequence: lognormal with the given median (sigma 1), capped."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), 1.0, size=num_sequences))
    return np.clip(np.rint(lengths), 1, cap).astype(np.int64)


def measure(mode: str = "per-sequence", num_sequences: int = 10_000) -> dict:
    from pagetable import PageTable

    lengths = workload_lengths(num_sequences)
    total = int(lengths.sum())
    table: object
    _reset_peak()
    rss_before = _status_kib("VmRSS")
    peak_before = _status_kib("VmHWM")
    if mode == "per-sequence":
        table = PageTable()
        start = 0
        for seq_id, length in enumerate(lengths.tolist()):
            table.append_blocks(np.full(length, seq_id), np.arange(start, start + length))
            start += length
    elif mode == "round-robin":
        table = PageTable()
        remaining = lengths.copy()
        next_block = 0
        step = 0
        while True:
            growing = np.flatnonzero(remaining > step)
            if growing.shape[0] == 0:
                break
            table.append_blocks(growing, np.arange(next_block, next_block + growing.shape[0]))
            next_block += growing.shape[0]
            step += 1
    elif mode == "dict":
        table = {}
        start = 0
        for seq_id, length in enumerate(lengths.tolist()):
            table[seq_id] = list(range(start, start + length))
            start += length
    else:
        raise ValueError(f"mode must be per-sequence, round-robin or dict, got {mode!r}")
    rss_after = _status_kib("VmRSS")
    peak_after = _status_kib("VmHWM")
    return {
        "mode": mode,
        "num_sequences": num_sequences,
        "total_blocks": total,
        "bytes_per_block": (rss_after - rss_before) * 1024 / total,
        "peak_bytes_per_block": (peak_after - rss_before) * 1024 / total,
        "peak_before_reset_kib": peak_before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagetable._memory", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="per-sequence", choices=["per-sequence", "round-robin", "dict"])
    parser.add_argument("--num-sequences", type=int, default=10_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.mode, args.num_sequences)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
