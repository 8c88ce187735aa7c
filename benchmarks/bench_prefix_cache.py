"""asv suites for prefix caching in the KV-cache manager, beside the reference model.

``manager`` is ``"pagetable"`` (:class:`pagetable.KVCacheManager`) or ``"reference"``
(:class:`pagetable.reference.ReferenceKVCacheManager`), both with
``enable_prefix_caching=True`` and the same state; ``algorithm`` is the block hash.

- ``Admission``: admit 32 prompts of 2,048 tokens with their token ids.  ``"hit"``:
  they share a 1,536-token system prompt that is already cached (each then hashes
  its 128 full blocks, finds 96, takes 32 and registers them); ``"miss"``: unique
  prompts (hash, find nothing, take and register all).  Divide by 65,536 for the
  per-token cost: the issue's "hashing + lookup + registration" figure.
- ``Decode``: 16 decode steps of every running sequence, each passing its token id
  (one block per sequence fills over the 16), against ``caching="off"``, the same
  manager without prefix caching.

``python benchmarks/bench_prefix_cache.py`` runs each suite outside asv, alternating
the sides, and prints the ratios.  Commits without prefix caching skip every suite.
"""

import time

import numpy as np

from pagetable import KVCacheManager

try:
    from pagetable.reference import ReferenceKVCacheManager
    from pagetable import prefix
    KVCacheManager(4, 4, enable_prefix_caching=True)
except (ImportError, TypeError):  # commits before prefix caching
    prefix = None

BLOCK_SIZE = 16
PROMPTS, PROMPT_LEN, SHARED = 32, 2048, 1536
MANAGERS = ["pagetable", "reference"]
ALGORITHMS = ["sha256", "xxhash_cbor"]


def _usable(algorithm):
    if prefix is None:
        raise NotImplementedError("no prefix caching in this commit")
    try:
        prefix.hash_function(algorithm)
    except ImportError as exc:
        raise NotImplementedError(str(exc)) from None


def make(kind, num_blocks, algorithm):
    """A caching manager of ``kind``, or None for the plain manager (``algorithm`` None)."""
    if algorithm is None:
        return KVCacheManager(num_blocks, BLOCK_SIZE)
    cls = KVCacheManager if kind == "pagetable" else ReferenceKVCacheManager
    return cls(num_blocks, BLOCK_SIZE, enable_prefix_caching=True, hash_algorithm=algorithm,
               hash_seed="0")


def prompts(case, seed=0):
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 152_000, SHARED, dtype=np.int32)
    out = []
    for _ in range(PROMPTS):
        tail = rng.integers(0, 152_000, PROMPT_LEN - SHARED, dtype=np.int32)
        out.append(np.concatenate([system, tail]) if case == "hit"
                   else rng.integers(0, 152_000, PROMPT_LEN, dtype=np.int32))
    return system, out


class Admission:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0
    params = (ALGORITHMS, ["hit", "miss"], MANAGERS)
    param_names = ["algorithm", "case", "manager"]

    def setup(self, algorithm, case, kind):
        _usable(algorithm)
        blocks = (PROMPTS + 2) * PROMPT_LEN // BLOCK_SIZE
        self.manager = make(kind, blocks, algorithm)
        system, self.prompts = prompts(case)
        # The system prompt is cached (in a sequence that is then freed), as after
        # the first request of a shared-prefix workload.
        self.manager.add_sequence(10**6, token_ids=np.concatenate([system, [0]]))
        self.manager.free_sequence(10**6)

    def time_add_sequence(self, algorithm, case, kind):
        add = self.manager.add_sequence
        for seq, tokens in enumerate(self.prompts):
            add(seq, token_ids=tokens)


class Decode:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0
    params = (["off", "sha256", "xxhash_cbor"], [256, 1024], MANAGERS)
    param_names = ["caching", "num_seqs", "manager"]
    steps = 16

    def setup(self, caching, num_seqs, kind):
        if caching == "off":
            if kind != "pagetable":
                raise NotImplementedError("the plain reference is bench_manager's")
        else:
            _usable(caching)
        rng = np.random.default_rng(1)
        lengths = np.clip(rng.lognormal(5.4, 0.8, num_seqs), 1, 1024).astype(np.int64)
        self.manager = make(kind, int((-(-lengths // BLOCK_SIZE)).sum()) + 8 * num_seqs,
                            None if caching == "off" else caching)
        for seq, n in enumerate(lengths.tolist()):
            self.manager.add_sequence(seq, token_ids=rng.integers(0, 152_000, n, dtype=np.int32))
        self.ids = np.arange(num_seqs, dtype=np.int64)
        self.tokens = rng.integers(0, 152_000, (self.steps, num_seqs), dtype=np.int32)

    def time_append_tokens(self, caching, num_seqs, kind):
        append, ids = self.manager.append_tokens, self.ids
        for step in range(self.steps):
            append(ids, token_ids=self.tokens[step])


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


def main(rounds=5):
    """The suites outside asv: best of ``rounds``, the sides alternating, with ratios."""
    if prefix is None:
        raise SystemExit("this commit has no prefix caching")
    tokens = PROMPTS * PROMPT_LEN
    print(f"Admission of {PROMPTS} prompts x {PROMPT_LEN} tokens (ns per prompt token)")
    for algorithm in ALGORITHMS:
        for case in ("hit", "miss"):
            ours, ref = _paired(Admission, [(algorithm, case, "pagetable"),
                                            (algorithm, case, "reference")], rounds)
            print(f"  {algorithm:12} {case:5} pagetable {ours / tokens * 1e9:7.1f}   "
                  f"reference {ref / tokens * 1e9:8.1f}   reference/pagetable {ref / ours:6.1f}x")
    print("Decode, 16 steps (ns per sequence per step)")
    for num_seqs in (256, 1024):
        steps = 16 * num_seqs
        off, xx, sha = _paired(Decode, [("off", num_seqs, "pagetable"),
                                        ("xxhash_cbor", num_seqs, "pagetable"),
                                        ("sha256", num_seqs, "pagetable")], rounds)
        (ref,) = _paired(Decode, [("xxhash_cbor", num_seqs, "reference")], 2)
        print(f"  {num_seqs:5} sequences: off {off / steps * 1e9:6.1f}   "
              f"xxhash_cbor {xx / steps * 1e9:6.1f} ({xx / off:4.2f}x off)   "
              f"sha256 {sha / steps * 1e9:6.1f} ({sha / off:4.2f}x off)   "
              f"reference xxhash_cbor {ref / steps * 1e9:8.1f} ({ref / xx:5.1f}x)")


if __name__ == "__main__":
    main()
