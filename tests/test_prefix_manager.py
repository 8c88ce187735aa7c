"""KVCacheManager with prefix caching: the compiled hashing path against vLLM 0.33.0's
known answers, and the manager's cache API, errors and saved state.

The vectors in tests/data/vllm_hash_vectors.json were produced by vLLM 0.33.0's own
functions (``tools/make_hash_vectors.py``, see tests/test_prefix_hashing.py); here
every chain is fed to a manager, and the hash it records for each block of the
sequence must be the vector's, byte for byte.  The rules beyond hashing (hits,
eviction order, events) are held against the reference model in
tests/test_prefix_reference.py and tests/test_prefix_state_machine.py.
"""

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pagetable import CorruptStateError, KVCacheManager, OutOfBlocksError, load
from pagetable.prefix import ExtraKeys, PrefixCacheStats, hash_prompt

VECTORS = json.loads((Path(__file__).parent / "data" / "vllm_hash_vectors.json").read_text())


def needs(algorithm):
    if algorithm.startswith("xxhash"):
        pytest.importorskip("xxhash")
    if algorithm.endswith("cbor"):
        pytest.importorskip("cbor2")


def extra_keys_of(extra):
    if extra is None:
        return None
    lora = extra.get("lora") or {}
    return ExtraKeys(lora_name=lora.get("name"), lora_path=lora.get("path"),
                     lora_id=lora.get("id"), mm=[tuple(item) for item in extra.get("mm", [])],
                     cache_salt=extra.get("cache_salt"))


def caching(num_blocks=64, block_size=4, **options):
    options.setdefault("hash_seed", "0")
    return KVCacheManager(num_blocks, block_size, enable_prefix_caching=True, **options)


# ------------------------------------------------------------ the vLLM vectors

@pytest.mark.parametrize("case", VECTORS["chains"],
                         ids=lambda c: f"{c['algorithm']}-{c['block_size']}-{c.get('name')}")
@pytest.mark.parametrize("how", ["prompt", "decode"])
def test_recorded_block_hashes_are_vllms(case, how):
    """Every full block's recorded hash is vLLM's, whether it filled at admission or
    token by token in decode steps (the second hashes from the token store)."""
    needs(case["algorithm"])
    tokens, block_size = case["token_ids"], case["block_size"]
    keys = extra_keys_of(case["extra"])
    kv = KVCacheManager(2 * len(tokens) // block_size + 4, block_size, enable_prefix_caching=True,
                        hash_algorithm=case["algorithm"], hash_seed=case["none_hash_seed"])
    if how == "prompt":
        kv.add_sequence(0, token_ids=tokens, extra_keys=keys)
    else:
        kv.add_sequence(0, token_ids=tokens[:1], extra_keys=keys)
        for token in tokens[1:]:
            kv.append_tokens([0], token_ids=[token])
    table = kv.block_table([0])[0]
    recorded = [kv._block_hash(int(table[k])).hex() for k in range(len(tokens) // block_size)]
    assert recorded == case["hashes"]
    kv.check()


@pytest.mark.parametrize("case", [c for c in VECTORS["none_hash"] if c["pythonhashseed"] is None],
                         ids=lambda c: f"{c['algorithm']}-{c['seed']}")
def test_none_hash_is_vllms(case):
    needs(case["algorithm"])
    kv = caching(hash_algorithm=case["algorithm"], hash_seed=case["seed"])
    assert kv.none_hash.hex() == case["digest"]


def test_default_seed_of_sha256_is_vllms(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    case = next(c for c in VECTORS["none_hash"]
                if c["algorithm"] == "sha256" and c["pythonhashseed"] is None
                and c["seed"] == "vllm-none-hash")
    kv = KVCacheManager(4, 4, enable_prefix_caching=True)
    assert kv.hash_algorithm == "sha256" and kv.none_hash.hex() == case["digest"]


# ------------------------------------------------------------------- behaviour

def test_a_shared_prompt_hits_and_only_the_rest_is_computed():
    kv = caching(16, 4)
    system = list(range(100, 110))                      # 2 full blocks + 2 tokens
    first = kv.add_sequence(0, token_ids=system + [1, 2])
    assert first.num_cached_tokens == 0 and first.slots.tolist() == list(range(12))
    second = kv.add_sequence(1, token_ids=system + [7])
    assert second.num_cached_tokens == 8
    table = kv.block_table([0, 1])
    assert table[1, :2].tolist() == table[0, :2].tolist()      # the shared blocks
    assert table[1, 2] not in table[0]
    assert second.slots.tolist() == [table[1, 2] * 4 + i for i in range(3)]
    stats = kv.prefix_cache_stats
    assert stats == PrefixCacheStats(requests=2, queries=23, hits=8, evictions=0)
    assert stats.hit_rate == pytest.approx(8 / 23)
    kv.check()


def test_the_last_token_is_always_computed():
    kv = caching(16, 4)
    prompt = list(range(8))
    kv.add_sequence(0, token_ids=prompt)
    again = kv.add_sequence(1, token_ids=prompt)
    assert again.num_cached_tokens == 4 and again.slots.size == 4
    assert kv.count_cached_tokens(prompt) == 4
    assert kv.count_cached_tokens(prompt + [9]) == 8
    assert kv.count_cached_tokens([]) == 0


def test_count_cached_tokens_changes_nothing():
    kv = caching(16, 4)
    kv.add_sequence(0, token_ids=list(range(9)))
    kv.free_sequence(0)
    before = kv._state()
    assert kv.count_cached_tokens(list(range(9))) == 8
    after = kv._state()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert kv.prefix_cache_stats.requests == 1


def test_freed_blocks_stay_cached_until_evicted_tail_first():
    kv = caching(4, 2)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5, 6, 7])      # 4 blocks, 3 full
    blocks = kv.block_table([0])[0].tolist()
    kv.free_sequence(0)
    assert kv.num_free_blocks == 4 and kv.num_cached_blocks == 3
    # The partial block went to the free stack; the cached ones wait, tail first.
    fresh = kv.add_sequence(1, token_ids=[9, 9, 9])
    table = kv.block_table([1])[0].tolist()
    assert table[0] == blocks[3]                     # the never-cached block first
    assert table[1] == blocks[2]                     # then the sequence's tail
    # One evicted, one registered: the new sequence's full block [9, 9].
    assert kv.prefix_cache_stats.evictions == 1 and kv.num_cached_blocks == 3
    assert fresh.num_cached_tokens == 0
    assert kv.count_cached_tokens([1, 2, 3, 4, 5]) == 4
    kv.check()


def test_a_hit_revives_a_cached_free_block():
    kv = caching(4, 2)
    kv.add_sequence(0, token_ids=[1, 2, 3])
    head = int(kv.block_table([0])[0, 0])
    kv.free_sequence(0)
    assert kv.num_free_blocks == 4
    again = kv.add_sequence(1, token_ids=[1, 2, 5])
    assert again.num_cached_tokens == 2 and int(kv.block_table([1])[0, 0]) == head
    assert kv.num_free_blocks == 2
    kv.check()


def test_out_of_blocks_counts_hits_on_cached_free_blocks_as_taken():
    kv = caching(4, 2)
    kv.add_sequence(9, token_ids=[8])                 # holds one block throughout
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5])     # 3 blocks: the rest of the pool
    kv.free_sequence(0)
    assert kv.num_free_blocks == 3
    # Reusing the 2 cached-free blocks leaves 1 to take; the prompt needs 2 more.
    with pytest.raises(OutOfBlocksError) as caught:
        kv.add_sequence(1, token_ids=[1, 2, 3, 4, 5, 6, 7])
    assert (caught.value.requested, caught.value.available) == (2, 1)
    assert len(kv) == 1 and kv.num_cached_blocks == 2 and kv.num_free_blocks == 3
    kv.check()


def test_extra_keys_separate_the_cache():
    kv = caching(32, 4)
    prompt = list(range(9))
    kv.add_sequence(0, token_ids=prompt, extra_keys=ExtraKeys(lora_name="a", lora_path="/a"))
    assert kv.count_cached_tokens(prompt) == 0
    assert kv.count_cached_tokens(prompt, ExtraKeys(lora_name="a", lora_path="/a")) == 8
    assert kv.count_cached_tokens(prompt, ExtraKeys(lora_name="a", lora_path="/b")) == 0
    salted = ExtraKeys(cache_salt="user-1")
    kv.add_sequence(1, token_ids=prompt, extra_keys=salted)
    assert kv.count_cached_tokens(prompt, ExtraKeys(cache_salt="user-2")) == 0
    assert kv.count_cached_tokens(prompt, salted) == 8


def test_fork_and_copy_on_write_carry_token_ids():
    kv = caching(16, 4)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5, 6])
    kv.fork(0, 1)
    step = kv.append_tokens([0, 1], token_ids=[7, 70])
    assert step.copy_src.size == 1
    kv.append_tokens([0, 1], token_ids=[8, 80])              # both blocks fill
    kv.check()
    table = kv.block_table([0, 1])
    assert kv._block_hash(int(table[0, 1])) == hash_prompt([1, 2, 3, 4, 5, 6, 7, 8], 4, seed="0")[1]
    assert kv._block_hash(int(table[1, 1])) == hash_prompt([1, 2, 3, 4, 5, 6, 70, 80], 4, seed="0")[1]
    assert kv.count_cached_tokens([1, 2, 3, 4, 5, 6, 70, 80, 0]) == 8


def test_a_block_filled_twice_is_registered_once():
    kv = caching(16, 4)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5])
    kv.add_sequence(1, token_ids=[9, 1, 2, 3, 4])     # no hit: block 0 differs
    kv.add_sequence(2, token_ids=[1, 2, 3])           # partial: nothing registered
    kv.append_tokens([2], token_ids=[4])              # same content as sequence 0's block 0
    assert kv.num_cached_blocks == 2
    table = kv.block_table([0, 2])
    assert table[0, 0] != table[1, 0]
    assert kv._block_hash(int(table[0, 0])) == kv._block_hash(int(table[1, 0]))
    kv.free_sequence([0, 1, 2])
    kv.check()
    assert kv.num_cached_blocks == 2


def test_reset_drops_every_hash():
    kv = caching(16, 4)
    kv.add_sequence(0, token_ids=list(range(9)))
    kv.add_sequence(1, token_ids=list(range(100, 109)))
    kv.free_sequence(1)
    assert kv.num_cached_blocks == 4
    assert kv.reset_prefix_cache() == 4
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 13
    assert kv.count_cached_tokens(list(range(9))) == 0
    kv.check()
    kv.append_tokens([0], 3, token_ids=[9, 10, 11])       # sequence 0 registers again
    assert kv.num_cached_blocks == 1
    kv.check()


def test_without_caching_nothing_changes():
    kv = KVCacheManager(8, 4)
    assert not kv.prefix_caching and kv.hash_algorithm is None and kv.none_hash is None
    assert kv.add_sequence(0, token_ids=[5, 6, 7]).slots.tolist() == [0, 1, 2]
    assert kv.add_sequence(1, 2).slots.tolist() == [4, 5]
    assert kv.count_cached_tokens([5, 6, 7]) == 0 and kv.reset_prefix_cache() == 0
    assert kv.prefix_cache_stats == PrefixCacheStats() and kv.num_cached_blocks == 0
    with pytest.raises(RuntimeError, match="enable_kv_cache_events"):
        kv.take_events()


# ---------------------------------------------------------------------- errors

@pytest.mark.parametrize("options, error, match", [
    ({"enable_prefix_caching": 1}, TypeError, "enable_prefix_caching"),
    ({"enable_prefix_caching": True, "hash_algorithm": "md5"}, ValueError, "hash_algorithm"),
    ({"enable_prefix_caching": True, "event_hash_format": "hex"}, ValueError, "event_hash_format"),
    ({"enable_kv_cache_events": True}, ValueError, "enable_prefix_caching"),
    ({"enable_prefix_caching": True, "hash_seed": 1.5}, TypeError, "seed"),
    ({"hash_seed": "0"}, ValueError, "hash_seed"),
    ({"enable_prefix_caching": True, "medium": 3}, TypeError, "medium"),
    ({"enable_prefix_caching": True, "data_parallel_rank": -1}, ValueError, "data_parallel_rank"),
])
def test_bad_options_name_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        KVCacheManager(8, 4, **options)


@pytest.mark.parametrize("call, error, match", [
    (lambda kv: kv.add_sequence(5, 3), ValueError, "token_ids is required"),
    (lambda kv: kv.add_sequence(5, 3, token_ids=[1, 2]), ValueError, "num_tokens is 3"),
    (lambda kv: kv.add_sequence(5, token_ids=[1, -2]), ValueError, r"token_ids\[1\]"),
    (lambda kv: kv.add_sequence(5, token_ids=[1, 2**31]), OverflowError, "token_ids"),
    (lambda kv: kv.add_sequence(5, token_ids=[1.5]), TypeError, "token_ids"),
    (lambda kv: kv.add_sequence(5, token_ids=[1], extra_keys="lora"), TypeError, "extra_keys"),
    (lambda kv: kv.add_sequence(0, token_ids=[1]), ValueError, "already exists"),
    (lambda kv: kv.append_tokens([0]), ValueError, "token_ids is required"),
    (lambda kv: kv.append_tokens([0], 2, token_ids=[1]), ValueError, "adds 2 tokens"),
    (lambda kv: kv.append_tokens([0], token_ids=[-1]), ValueError, r"token_ids\[0\]"),
    (lambda kv: kv.count_cached_tokens([1, -1]), ValueError, r"token_ids\[1\]"),
    (lambda kv: kv.take_events(), RuntimeError, "enable_kv_cache_events"),
])
def test_bad_calls_raise_and_change_nothing(call, error, match):
    kv = caching(8, 4)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5])
    before = kv._state()
    with pytest.raises(error, match=match):
        call(kv)
    after = kv._state()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    kv.check()


def test_a_subclass_of_extra_keys_is_refused():
    """Its code would run in the middle of a change, as blocks fill."""
    class Keys(ExtraKeys):
        pass

    kv = caching(8, 4)
    with pytest.raises(TypeError, match="not a subclass"):
        kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5], extra_keys=Keys(cache_salt="s"))
    assert len(kv) == 0


def test_extra_keys_without_caching_is_refused():
    with pytest.raises(ValueError, match="extra_keys"):
        KVCacheManager(8, 4).add_sequence(0, token_ids=[1], extra_keys=ExtraKeys(cache_salt="s"))


# ----------------------------------------------------------------- saved state

def churned(algorithm="xxhash_cbor"):
    needs(algorithm)
    rng = np.random.default_rng(5)
    kv = caching(48, 4, hash_algorithm=algorithm)
    system = rng.integers(0, 1000, 11).tolist()
    live = []
    for seq in range(30):
        keys = ExtraKeys(lora_name="l", lora_path="/p", lora_id=2, mm=[("img", 2, 5)]) if seq % 4 == 0 else None
        tokens = system + rng.integers(0, 1000, int(rng.integers(0, 9))).tolist()
        try:
            kv.add_sequence(seq, token_ids=tokens, extra_keys=keys)
            live.append(seq)
        except OutOfBlocksError:
            pass
        if len(live) > 4:
            kv.free_sequence(live.pop(0))
        if live:
            kv.append_tokens(live, token_ids=rng.integers(0, 1000, len(live)))
    kv.check()
    assert kv.prefix_cache_stats.evictions > 0 and kv.num_cached_blocks > 0
    return kv, system


@pytest.mark.parametrize("algorithm", ["sha256", "xxhash_cbor"])
def test_copies_pickles_and_files_keep_the_cache(algorithm):
    kv, system = churned(algorithm)
    buffer = io.BytesIO()
    kv.save(buffer)
    buffer.seek(0)
    for other in (kv.copy(), pickle.loads(pickle.dumps(kv)), load(buffer)):
        other.check()
        assert other == kv
        assert other.prefix_cache_stats == kv.prefix_cache_stats
        assert other.num_cached_blocks == kv.num_cached_blocks
        assert other.none_hash == kv.none_hash
        # Both go on the same way: same hits, same blocks, same evictions.
        prompt = system + [1, 2, 3]
        mine, theirs = kv.copy(), other
        for seq in (100, 101):
            assert mine.add_sequence(seq, token_ids=prompt) == theirs.add_sequence(seq, token_ids=prompt)
        assert mine == theirs


def test_a_tampered_cache_is_corrupt_state():
    kv, _ = churned()
    state = kv._state()
    cached = np.flatnonzero(state["prefix_cached"])
    bad = dict(state)
    bad["prefix_tokens"] = state["prefix_tokens"].copy()
    bad["prefix_tokens"][int(cached[0]) * 4] += 1          # a cached block's token changes
    with pytest.raises(CorruptStateError, match="hash"):
        KVCacheManager._from_state(bad)
    bad = dict(state)
    bad["prefix_cached"] = np.zeros_like(state["prefix_cached"])
    with pytest.raises(CorruptStateError):
        KVCacheManager._from_state(bad)
    bad = dict(state)
    del bad["prefix_seed"]
    with pytest.raises(CorruptStateError, match="prefix_seed"):
        KVCacheManager._from_state(bad)
    bad = dict(state)
    bad["prefix_extra"] = np.array("{not json")
    with pytest.raises(CorruptStateError, match="prefix_extra"):
        KVCacheManager._from_state(bad)


# ------------------------------------------------------------ batched admission

def test_add_sequences_is_all_or_nothing():
    kv = caching(6, 4)
    system = [1, 2, 3, 4, 5, 6, 7, 8]
    before = kv._state()
    # The third prompt needs 4 more blocks than are left: nothing is admitted.
    with pytest.raises(OutOfBlocksError):
        kv.add_sequences([10, 11, 12], token_ids=[system + [9], system + [5], system + [6] * 12])
    after = kv._state()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len(kv) == 0 and kv.prefix_cache_stats.requests == 0
    results = kv.add_sequences([10, 11], token_ids=[system + [9], system + [5]])
    # The second prompt hits the blocks the first registers in the same call.
    assert [r.num_cached_tokens for r in results] == [0, 8]
    assert 10 in kv and 11 in kv
    assert kv.prefix_cache_stats.requests == 2
    kv.check()


def test_add_sequences_matches_one_call_per_prompt():
    batched, single = caching(32, 4), caching(32, 4)
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [7] * 13, [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    keys = [None, ExtraKeys(cache_salt="x"), None, None]
    results = batched.add_sequences(np.arange(4), token_ids=prompts, extra_keys=keys)
    assert results == [single.add_sequence(i, token_ids=p, extra_keys=k)
                       for i, (p, k) in enumerate(zip(prompts, keys))]
    assert batched == single


@pytest.mark.parametrize("call, error, match", [
    (lambda kv: kv.add_sequences([1, 1], token_ids=[[1], [2]]), ValueError, "more than once"),
    (lambda kv: kv.add_sequences([1, 0], token_ids=[[1], [2]]), ValueError, r"seq_ids\[1\] = 0 already exists"),
    (lambda kv: kv.add_sequences([1, 2], token_ids=[[1]]), ValueError, "1 prompts for 2"),
    (lambda kv: kv.add_sequences([1, 2], token_ids=[[1], [-2]]), ValueError, r"prompt 1: token_ids\[0\]"),
    (lambda kv: kv.add_sequences([1], token_ids=[[1]], extra_keys=[None, None]), ValueError, "extra_keys"),
    (lambda kv: kv.add_sequences([1], token_ids=np.array([[1]])), TypeError, "token_ids"),
    (lambda kv: kv.add_sequences([-1], token_ids=[[1]]), ValueError, "negative"),
])
def test_add_sequences_checks_everything_first(call, error, match):
    kv = caching(8, 4)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5])
    before = kv._state()
    with pytest.raises(error, match=match):
        call(kv)
    after = kv._state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ----------------------------------------- the compiled serialisations, against Python's

from hypothesis import given, settings, strategies as st  # noqa: E402

token_ids = st.integers(0, 2**31 - 1) | st.sampled_from(
    [0, 1, 23, 24, 255, 256, 65535, 65536, 2**24, 2**31 - 1])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]),
       st.integers(1, 40), st.lists(token_ids, max_size=200), st.booleans())
def test_every_recorded_hash_equals_pagetable_prefix(algorithm, block_size, tokens, keyed):
    """The manager's C serialisations (hand-written CBOR and pickle for the common
    block, cbor2/pickle with extra keys) give pagetable.prefix's hashes, which the
    vLLM vectors pin to vLLM's."""
    needs(algorithm)
    keys = ExtraKeys(lora_name="a", lora_path="/a", mm=[("m", 3, 30)], cache_salt="s") if keyed else None
    kv = KVCacheManager(len(tokens) // block_size + 2, block_size, enable_prefix_caching=True,
                        hash_algorithm=algorithm, hash_seed="1")
    kv.add_sequence(0, token_ids=tokens, extra_keys=keys)
    table = kv.block_table([0])[0]
    expected = hash_prompt(tokens, block_size, keys, algorithm, seed="1")
    assert [kv._block_hash(int(table[k])) for k in range(len(expected))] == expected
