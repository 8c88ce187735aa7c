"""asv suites for hybrid models and speculative decoding (docs/HYBRID.md).

- ``GroupDecode``: 16 decode steps of 1,024 sequences (about 660 tokens on average,
  up to 4,000), after one step that releases what the prefills left outside the
  window, ``groups="single"`` (one full-attention ``KVCacheManager``) against
  ``"full+window"`` (a ``HybridKVCacheManager`` of a full-attention group and a
  1,024-token sliding-window group, both of block size 16).  The issue's goal: the
  second at most 2x the first.
- ``Rollback``: 1,024 sequences that each committed 1 + K = 5 tokens roll back 0 .. 4
  of them (speculative decoding's rejected drafts), ``manager`` ``"pagetable"`` or
  ``"reference"``, with prefix caching on (each rollback may drop a hash).  Goal: the
  reference at least 20x slower.

``python benchmarks/bench_hybrid.py`` runs each suite outside asv, alternating the
sides, and prints the ratios.  Commits without groups skip every suite.
"""

import time

import numpy as np

from pagetable import KVCacheManager

try:
    from pagetable import HybridKVCacheManager, KVCacheGroupSpec
    from pagetable.reference import ReferenceKVCacheManager
    KVCacheManager(4, 4).rollback
    ReferenceKVCacheManager(4, 4).rollback
except (ImportError, AttributeError):  # commits before groups and rollback
    HybridKVCacheManager = None

BLOCK_SIZE, WINDOW, NUM_SEQS, STEPS, DRAFTS = 16, 1024, 1024, 16, 4


def _usable():
    if HybridKVCacheManager is None:
        raise NotImplementedError("no KV-cache groups or rollback in this commit")


def _lengths(seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.5, 0.7, NUM_SEQS), 16, 4000).astype(np.int64)


class GroupDecode:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0
    params = (["single", "full+window"],)
    param_names = ["groups"]

    def setup(self, groups):
        _usable()
        lengths = _lengths()
        blocks = int((-(-lengths // BLOCK_SIZE)).sum()) + 4 * NUM_SEQS
        if groups == "single":
            self.manager = KVCacheManager(blocks, BLOCK_SIZE)
        else:
            self.manager = HybridKVCacheManager([
                KVCacheGroupSpec(blocks, BLOCK_SIZE),
                KVCacheGroupSpec(blocks, BLOCK_SIZE, sliding_window=WINDOW)])
        for seq, n in enumerate(lengths.tolist()):
            self.manager.add_sequence(seq, n)
        self.ids = np.arange(NUM_SEQS, dtype=np.int64)
        # The first step after a long prefill releases every block the window has
        # left behind at once; the suite times steady decoding after it.
        self.manager.append_tokens(self.ids, 1)

    def time_append_tokens(self, groups):
        append, ids = self.manager.append_tokens, self.ids
        for _ in range(STEPS):
            append(ids, 1)


class Rollback:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0
    params = (["pagetable", "reference"],)
    param_names = ["manager"]

    def setup(self, kind):
        _usable()
        rng = np.random.default_rng(2)
        lengths = np.clip(rng.lognormal(5.4, 0.8, NUM_SEQS), 1, 1024).astype(np.int64)
        cls = KVCacheManager if kind == "pagetable" else ReferenceKVCacheManager
        self.manager = cls(int((-(-(lengths + DRAFTS + 1) // BLOCK_SIZE)).sum()) + NUM_SEQS,
                           BLOCK_SIZE, enable_prefix_caching=True, hash_seed="0")
        for seq, n in enumerate(lengths.tolist()):
            self.manager.add_sequence(seq, token_ids=rng.integers(0, 152_000, n, dtype=np.int32))
        self.ids = np.arange(NUM_SEQS, dtype=np.int64)
        # Each sequence commits its bonus token and 4 drafts; the target rejects some.
        self.manager.append_tokens(self.ids, DRAFTS + 1,
                                   token_ids=rng.integers(0, 152_000, NUM_SEQS * (DRAFTS + 1), dtype=np.int32))
        self.rejected = rng.integers(0, DRAFTS + 1, NUM_SEQS)

    def time_rollback(self, kind):
        self.manager.rollback(self.ids, self.rejected)


def _once(suite, params):
    bench = suite()
    bench.setup(*params)
    method = getattr(bench, next(name for name in dir(bench) if name.startswith("time_")))
    start = time.perf_counter()
    method(*params)
    return time.perf_counter() - start


def _paired(suite, sides, rounds):
    """Best time of each ``sides`` entry (params), the sides alternating round by round."""
    best = [float("inf")] * len(sides)
    for _ in range(rounds):
        for i, params in enumerate(sides):
            best[i] = min(best[i], _once(suite, params))
    return best


def main(rounds=7):
    """The suites outside asv: best of ``rounds``, the sides alternating, with ratios."""
    _usable()
    single, hybrid = _paired(GroupDecode, [("single",), ("full+window",)], rounds)
    per = STEPS * NUM_SEQS
    print(f"Decode, {STEPS} steps x {NUM_SEQS} sequences (ns per sequence per step)")
    print(f"  one group {single / per * 1e9:6.1f}   full + window groups {hybrid / per * 1e9:6.1f}"
          f"   ratio {hybrid / single:4.2f}x (goal <= 2x)")
    ours, ref = _paired(Rollback, [("pagetable",), ("reference",)], rounds)
    print(f"Rollback of {NUM_SEQS} sequences by 0..{DRAFTS} tokens (prefix caching on)")
    print(f"  pagetable {ours * 1e6:8.1f} us   reference {ref * 1e6:9.1f} us   "
          f"reference/pagetable {ref / ours:6.1f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
