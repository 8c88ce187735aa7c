"""Command line: ``python -m pagetable [demo|simulate|bench] ...``.

* ``demo`` (the default): builds a realistic table, runs the batched lookups an
  engine runs each step, and prints what it did and how long it took.
* ``simulate``: the continuous-batching serving simulation (the main job).
* ``bench``: the side-by-side speed comparison against the baselines.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

COMMANDS = ("demo", "simulate", "bench")


def _best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def demo(argv: list[str] | None = None) -> int:
    """Build a table for a batch of long-tailed sequences and time the per-step calls."""
    from pagetable import PAD_SLOT_ID, PageTable

    parser = argparse.ArgumentParser(prog="python -m pagetable demo", description=demo.__doc__)
    parser.add_argument("--sequences", type=int, default=4096, help="sequences in the table")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sequences <= 0:
        parser.error("--sequences must be positive")

    rng = np.random.default_rng(args.seed)
    bs = args.block_size
    # Token counts: long-tailed, like chat requests (median ~500 tokens).
    tokens = np.clip(np.exp(rng.normal(np.log(500), 1.0, args.sequences)), 1, 32768).astype(np.int64)
    num_blocks = (tokens + bs - 1) // bs
    seq_ids = rng.choice(2**40, size=args.sequences, replace=False).astype(np.int64)
    # Physical blocks handed out in a shuffled order, as a free list would after churn.
    physical = rng.permutation(int(num_blocks.sum())).astype(np.int32)

    table = PageTable(bs)
    start = time.perf_counter()
    table.append_blocks(np.repeat(seq_ids, num_blocks), physical)
    build = time.perf_counter() - start
    print(f"built {table!r:.100}")
    print(f"  {len(table)} sequences, {table.total_blocks} blocks of {bs} tokens in {build * 1e3:.2f} ms")

    # A decode step: one new token per sequence, at its last position.
    decode_pos = tokens - 1
    slots = table.slot_mapping(seq_ids, decode_pos)
    assert (slots != PAD_SLOT_ID).all()
    t_decode = _best_of(lambda: table.slot_mapping(seq_ids, decode_pos))
    print(f"decode step slot mapping: {len(seq_ids)} tokens in {t_decode * 1e6:.1f} us")

    # A prefill chunk: 8,192 tokens from the first few sequences, grouped by sequence.
    owners = np.repeat(seq_ids, tokens)[:8192]
    positions = np.concatenate([np.arange(t) for t in tokens[:64].tolist()])[:8192]
    t_prefill = _best_of(lambda: table.slot_mapping(owners, positions))
    print(f"prefill slot mapping: {owners.shape[0]} tokens in {t_prefill * 1e6:.1f} us")

    batch = seq_ids[:256]
    dense, lengths = table.block_table(batch)
    t_table = _best_of(lambda: table.block_table(batch))
    print(f"block table: {dense.shape[0]} x {dense.shape[1]} in {t_table * 1e6:.1f} us")
    indptr, indices = table.to_csr(batch)
    t_csr = _best_of(lambda: table.to_csr(batch))
    print(f"CSR page list: {indices.shape[0]} pages in {t_csr * 1e6:.1f} us")

    probe = int(seq_ids[0])
    print(f"position 0 of sequence {probe} -> (block, offset) = {table.get_block_for_position(probe, 0)}")
    print("next: `python -m pagetable simulate` runs the serving simulation")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "demo"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    elif argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if command == "simulate":
        from pagetable.simulate import main as simulate_main

        return simulate_main(argv)
    if command == "bench":
        from pagetable.bench import main as bench_main

        return bench_main(argv)
    return demo(argv)


if __name__ == "__main__":
    sys.exit(main())
