"""``pagetable demo``: build a realistic table, time the lookups an engine runs each step.

The table holds a batch of long-tailed sequences (chat-like, median about 500 tokens)
whose physical blocks come in a shuffled order, as a free list hands them out after
churn.  Each figure is the best of five calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from . import _options

HELP = "build a table of long-tailed sequences and time the per-step lookups"


def _best_of(function: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # 100,000 sequences of block size 1 is about 80 million blocks (1.5 GB of inputs):
    # the most a demo should ask of a laptop.
    parser.add_argument("--sequences", type=_options.integer(1, 100_000), default=4096,
                        help="sequences in the table, 1..100,000 (default 4096)")
    parser.add_argument("--block-size", type=_options.integer(1, 2**31 - 1), default=16,
                        help="tokens per KV block (default 16)")
    parser.add_argument("--seed", type=_options.seed, default=0, help="workload seed, >= 0 (default 0)")


def run(args: argparse.Namespace) -> int:
    """Build the table and print what each per-step call costs; returns the exit status."""
    from pagetable import PAD_SLOT_ID, PageTable

    rng = np.random.default_rng(args.seed)
    block_size = args.block_size
    tokens = np.clip(np.exp(rng.normal(np.log(500), 1.0, args.sequences)), 1, 32768).astype(np.int64)
    num_blocks = (tokens + block_size - 1) // block_size
    seq_ids = rng.choice(2**40, size=args.sequences, replace=False).astype(np.int64)
    physical = rng.permutation(int(num_blocks.sum())).astype(np.int32)

    table = PageTable(block_size)
    start = time.perf_counter()
    table.append_blocks(np.repeat(seq_ids, num_blocks), physical)
    build = time.perf_counter() - start
    print(f"built {table!r:.100}")
    print(f"  {len(table)} sequences, {table.total_blocks} blocks of {block_size} tokens "
          f"in {build * 1e3:.2f} ms")

    # A decode step: one new token per sequence, at its last position.
    decode_pos = tokens - 1
    slots = table.slot_mapping(seq_ids, decode_pos)
    assert (slots != PAD_SLOT_ID).all()
    t_decode = _best_of(lambda: table.slot_mapping(seq_ids, decode_pos))
    print(f"decode step slot mapping: {len(seq_ids)} tokens in {t_decode * 1e6:.1f} us")

    # A prefill chunk: up to 8,192 tokens of the first 64 sequences, grouped by sequence.
    first = tokens[:64]
    owners = np.repeat(seq_ids[:64], first)[:8192]
    positions = np.concatenate([np.arange(t) for t in first.tolist()])[:8192]
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
    print("next: `pagetable simulate` runs the serving simulation")
    return 0
