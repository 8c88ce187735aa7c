"""pytest-benchmark: prefix caching in the manager beside the same manager without it.

Skipped by the ordinary test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_prefix.py --benchmark-only

No test asserts on time.  Each checks what the timed calls did (the hits found, the
blocks registered), so a benchmark never times a wrong answer.  The state is that of
``benchmarks/bench_prefix_cache.py`` (the asv suites).
"""

import numpy as np
import pytest

from pagetable import KVCacheManager

pytest.importorskip("xxhash")

FAST = {"max_time": 0.3, "min_rounds": 5, "warmup": False}
BLOCK_SIZE, SHARED, PROMPT_LEN, PROMPTS = 16, 1536, 2048, 16


def _prompts(case):
    rng = np.random.default_rng(0)
    system = rng.integers(0, 152_000, SHARED, dtype=np.int32)
    if case == "hit":
        return system, [np.concatenate([system, rng.integers(0, 152_000, PROMPT_LEN - SHARED,
                                                            dtype=np.int32)]) for _ in range(PROMPTS)]
    return system, [rng.integers(0, 152_000, PROMPT_LEN, dtype=np.int32) for _ in range(PROMPTS)]


@pytest.mark.benchmark(group="prefix admission, 16 prompts x 2048 tokens", **FAST)
@pytest.mark.parametrize("algorithm", ["sha256", "xxhash_cbor"])
@pytest.mark.parametrize("case", ["hit", "miss"])
def test_admission(benchmark, algorithm, case):
    system, prompts = _prompts(case)

    def setup():
        kv = KVCacheManager((PROMPTS + 2) * PROMPT_LEN // BLOCK_SIZE, BLOCK_SIZE,
                            enable_prefix_caching=True, hash_algorithm=algorithm, hash_seed="0")
        kv.add_sequence(10**6, token_ids=np.concatenate([system, [0]]))
        kv.free_sequence(10**6)
        return (kv,), {}

    def admit(kv):
        return [kv.add_sequence(seq, token_ids=tokens).num_cached_tokens
                for seq, tokens in enumerate(prompts)]

    hits = benchmark.pedantic(admit, setup=setup, rounds=5)
    assert hits == [SHARED if case == "hit" else 0] * PROMPTS


@pytest.mark.benchmark(group="decode 16 steps x 256 sequences, with and without caching", **FAST)
@pytest.mark.parametrize("caching", ["off", "xxhash_cbor", "sha256"])
def test_decode(benchmark, caching):
    rng = np.random.default_rng(1)
    num_seqs, steps = 256, 16
    lengths = rng.integers(1, 1024, num_seqs)
    tokens = rng.integers(0, 152_000, (steps, num_seqs), dtype=np.int32)

    def setup():
        options = {} if caching == "off" else {
            "enable_prefix_caching": True, "hash_algorithm": caching, "hash_seed": "0"}
        kv = KVCacheManager(int((-(-lengths // BLOCK_SIZE)).sum()) + 4 * num_seqs, BLOCK_SIZE,
                            **options)
        for seq, n in enumerate(lengths.tolist()):
            kv.add_sequence(seq, token_ids=rng.integers(0, 152_000, n, dtype=np.int32))
        return (kv,), {}

    def decode(kv):
        ids = np.arange(num_seqs)
        for step in range(steps):
            kv.append_tokens(ids, token_ids=tokens[step])
        return kv

    kv = benchmark.pedantic(decode, setup=setup, rounds=5)
    assert kv.seq_lens(np.arange(num_seqs)).tolist() == (lengths + steps).tolist()
    if caching != "off":
        assert kv.num_cached_blocks == int(((lengths + steps) // BLOCK_SIZE).sum())
