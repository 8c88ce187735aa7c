"""Paired A/B timings of two builds of pagetable, run alternately in fresh processes.

    python tools/ab_compare.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 8]

Each checkout must be built in place (``python setup.py build_ext --inplace``).
Every round runs each workload once per build, old then new, each in its own process
(PYTHONPATH pointing at the build), and the report gives the median of each side and
the range of the per-round ratios: on a shared machine whose speed drifts, a ratio of
two runs taken seconds apart is the figure to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Each workload prints the seconds its timed part took.
WORKLOAD = r'''
import sys, time
import numpy as np
from pagetable import KVCacheManager, PageTable
kind = sys.argv[1]
round_robin = np.tile(np.arange(1024, dtype=np.int64), 64)
grouped = np.repeat(np.arange(1024, dtype=np.int64), 64)
blocks = np.arange(round_robin.shape[0], dtype=np.int32)
def manager():
    kv = KVCacheManager(4096 * 32, 16)
    for i in range(4096):
        kv.add_sequence(i, 200)
    return kv, np.arange(4096)
if kind == "append_blocks round-robin":
    t0 = time.perf_counter()
    for _ in range(600): PageTable(16).append_blocks(round_robin, blocks)
elif kind == "append_blocks grouped":
    t0 = time.perf_counter()
    for _ in range(1000): PageTable(16).append_blocks(grouped, blocks)
elif kind == "decode, 4,096 sequences, 90 steps":
    kv, ids = manager()
    t0 = time.perf_counter()
    for _ in range(90): kv.append_tokens(ids, 1)          # within each row's room
elif kind == "decode with growth, 300 steps":
    kv, ids = manager()
    t0 = time.perf_counter()
    for _ in range(300): kv.append_tokens(ids, 1)         # rows move and compact
elif kind == "free_sequence, 4,096 sequences x 60":
    kv, ids = manager()
    copies = [kv.copy() for _ in range(60)]
    t0 = time.perf_counter()
    for m in copies: m.free_sequence(ids)
elif kind == "can_append, 4,096 sequences x 200":
    kv, ids = manager()
    t0 = time.perf_counter()
    for _ in range(200): kv.can_append(ids, 1)
elif kind == "slot_mapping 8,192 interleaved x 2,000":
    pt = PageTable(16); pt.append_blocks(grouped, blocks)
    seqs = np.random.default_rng(1).integers(0, 1024, 8192)
    pos = np.random.default_rng(2).integers(0, 1024, 8192)
    t0 = time.perf_counter()
    for _ in range(2000): pt.slot_mapping(seqs, pos)
print(time.perf_counter() - t0)
'''

KINDS = ["append_blocks round-robin", "append_blocks grouped",
         "decode, 4,096 sequences, 90 steps", "decode with growth, 300 steps",
         "free_sequence, 4,096 sequences x 60", "can_append, 4,096 sequences x 200",
         "slot_mapping 8,192 interleaved x 2,000"]


def run(build: str, kind: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(build), OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKLOAD, kind], env=env, cwd="/",
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    raw = {}
    print("| workload | old, median | new, median | new / old, per round |")
    print("|---|---|---|---|")
    for kind in KINDS:
        old, new = [], []
        for _ in range(args.rounds):
            old.append(run(args.old, kind))
            new.append(run(args.new, kind))
        ratios = sorted(n / o for o, n in zip(old, new))
        raw[kind] = {"old": old, "new": new}
        print(f"| {kind} | {statistics.median(old) * 1e3:.1f} ms | "
              f"{statistics.median(new) * 1e3:.1f} ms | "
              f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
