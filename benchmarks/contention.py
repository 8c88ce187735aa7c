"""Threads under contention: ``slot_mapping`` of 2**20 grouped tokens beside a busy process.

Run ``python benchmarks/contention.py [--repeats N] [--quiet-only | --busy-only]``.  It
times, interleaved, the default thread setting, one thread (``set_num_threads(1)``)
and the memcpy floor (``np.copyto(out, positions)``), first on the machine as it is
("quiet"), then with a process of its own spinning on one core beside them ("busy"),
and prints medians and minimums with their ratios.  It reports; it never fails on a
time.  asv imports this folder, so nothing runs on import.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

TOKENS = 1 << 20


def _workload():
    import pagetable
    from pagetable.cli.workloads import TableWorkload, token_batch

    workload = TableWorkload.slot_mapping_table(16)
    table = workload.build_pagetable(pagetable.PageTable)
    return table, token_batch(workload, TOKENS)


def _measure(repeats):
    import pagetable

    table, batch = _workload()
    out = np.empty(TOKENS, dtype=np.int64)
    floor_out = np.empty(TOKENS, dtype=np.int64)
    default = pagetable.get_num_threads()

    def run(threads):
        pagetable.set_num_threads(threads)
        table.slot_mapping(batch.seq_ids, batch.positions, out=out)

    candidates = {
        f"default ({default} threads)": lambda: run(default),
        "1 thread": lambda: run(1),
        "memcpy floor": lambda: np.copyto(floor_out, batch.positions),
    }
    # set_num_threads resets what the default setting learnt about the machine; a
    # few calls in a row after it let the default be timed as it runs in a loop.
    per_sample = 8
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, call in candidates.items():
            call()
            started = time.perf_counter()
            for _ in range(per_sample):
                call()
            times[name].append((time.perf_counter() - started) / per_sample)
    pagetable.set_num_threads(default)
    return times


def _report(label, times):
    names = list(times)
    medians = {name: statistics.median(times[name]) for name in names}
    minimums = {name: min(times[name]) for name in names}
    floor = "memcpy floor"
    one = "1 thread"
    print(f"{label}:")
    for name in names:
        print(f"  {name:22s} median {medians[name] * 1e3:7.3f} ms  min {minimums[name] * 1e3:7.3f} ms"
              f"  / floor: median {medians[name] / medians[floor]:.2f}x  min {minimums[name] / minimums[floor]:.2f}x")
    default = names[0]
    print(f"  {default} / 1 thread: median {medians[default] / medians[one]:.2f}x  "
          f"min {minimums[default] / minimums[one]:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet-only", action="store_true")
    group.add_argument("--busy-only", action="store_true")
    args = parser.parse_args(argv)
    # Run as a script, the checkout (an in-place build) is not on the path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"{TOKENS:,} grouped tokens, block size 16; CPUs available: {len(os.sched_getaffinity(0))}")
    if not args.busy_only:
        _report("quiet", _measure(args.repeats))
    if not args.quiet_only:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            _report("one busy process beside it", _measure(args.repeats))
        finally:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
