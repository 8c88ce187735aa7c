"""Tokens per second of pagetable.prefix.hash_prompt, per hash algorithm.

Hashes one prompt of ``--tokens`` random token ids (default 100,000) in blocks of
``--block-size`` (default 16), ``--repeats`` times, and prints the best time of each
algorithm as tokens/s and blocks/s, with and without extra keys (a LoRA adapter and a
multimodal item every 500 tokens), and Dynamo's per-block hash beside them.  An
algorithm whose package is missing is reported as such.  Run::

    PYTHONPATH=. python tools/hash_throughput.py [--tokens 100000] [--block-size 16] [--repeats 5]

(``PYTHONPATH=.`` from a checkout with built extensions; not needed where pagetable is
installed.)
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

from pagetable.prefix import ALGORITHMS, ExtraKeys, dynamo_block_hashes, hash_prompt


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 152_000, size=args.tokens).tolist()
    blocks = args.tokens // args.block_size
    extra = ExtraKeys(lora_name="adapter", lora_path="/adapters/adapter",
                      mm=[(f"item-{i}", offset, 100)
                          for i, offset in enumerate(range(0, args.tokens - 100, 500))])

    print(f"hash_prompt: {args.tokens:,} tokens, block size {args.block_size} "
          f"({blocks:,} blocks), best of {args.repeats}; Python {platform.python_version()}")
    print(f"{'algorithm':<14}{'tokens/s':>14}{'blocks/s':>12}{'tokens/s, extra keys':>24}")
    cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        (name,
         functools.partial(hash_prompt, tokens, args.block_size, algorithm=name, seed="0"),
         functools.partial(hash_prompt, tokens, args.block_size, extra, algorithm=name, seed="0"))
        for name in ALGORITHMS
    ]
    cases.append(("dynamo", functools.partial(dynamo_block_hashes, tokens, args.block_size), None))
    for name, plain, with_extra in cases:
        try:
            seconds = best_seconds(plain, args.repeats)
        except ModuleNotFoundError as exc:
            print(f"{name:<14}{'skipped: ' + str(exc)}")
            continue
        extra_rate = "" if with_extra is None else \
            f"{args.tokens / best_seconds(with_extra, args.repeats):>24,.0f}"
        print(f"{name:<14}{args.tokens / seconds:>14,.0f}{blocks / seconds:>12,.0f}{extra_rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
