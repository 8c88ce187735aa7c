"""The reference model of prefix caching, scenario by scenario (docs/PREFIX_CACHING.md).

Each test drives ``ReferenceKVCacheManager(..., enable_prefix_caching=True)`` through
one rule of the contract and asserts the exact blocks, hashes, events and counters
that rule gives.  The expected hashes are computed here from the contract's
definition, so a slip in the model's hashing shows as a wrong number.
"""

import dataclasses
import hashlib
import pickle

import cbor2
import pytest
import xxhash

from pagetable import OutOfBlocksError
from pagetable.reference import ReferenceKVCacheManager

B = 4
SYSTEM = [100, 101, 102, 103, 104, 105, 106, 107]   # two full blocks of a system prompt


@pytest.fixture(autouse=True)
def no_hash_seed_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


@dataclasses.dataclass
class Keys:
    """Any object with ExtraKeys' attributes will do for the model."""
    lora_name: object = None
    lora_path: object = None
    lora_id: object = None
    mm: tuple = ()
    cache_salt: object = None


def sha(obj):
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = sha("vllm-none-hash")


def chain(tokens, extra=lambda k: None, parent=NONE_HASH, first=0):
    """h[first..] of the full blocks of ``tokens``, as the contract defines them."""
    hashes = []
    for k in range(first, len(tokens) // B):
        parent = sha((parent, tuple(tokens[k * B:(k + 1) * B]), extra(k)))
        hashes.append(parent)
    return hashes


def low64(block_hash):
    return int.from_bytes(block_hash[-8:], "big")


def caching(num_blocks, **kwargs):
    return ReferenceKVCacheManager(num_blocks, B, enable_prefix_caching=True,
                                   enable_kv_cache_events=True, **kwargs)


def described(events):
    """Events as plain tuples, so that a mismatch prints readably."""
    out = []
    for e in events:
        name = type(e).__name__.lstrip("_")
        if name == "BlockStored":
            out.append((name, e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size,
                        e.lora_id, e.medium, e.lora_name, e.extra_keys, e.group_idx))
        elif name == "BlockRemoved":
            out.append((name, e.block_hashes, e.medium, e.group_idx))
        else:
            out.append((name,))
    return out


def stored(hashes, parent, tokens, lora_id=None, lora_name=None, extra_keys=None):
    # A block without keys has None in extra_keys, even when no block has any.
    return ("BlockStored", [low64(h) for h in hashes], None if parent is None else low64(parent),
            list(tokens), B, lora_id, "GPU", lora_name,
            [None] * len(hashes) if extra_keys is None else extra_keys, 0)


def removed(block_hash):
    return ("BlockRemoved", [low64(block_hash)], "GPU", 0)


def stats(manager):
    s = manager.prefix_cache_stats
    return (s.requests, s.queries, s.hits, s.evictions)


def test_a_shared_system_prompt_is_computed_once():
    m = caching(16)
    first = m.add_sequence(1, token_ids=SYSTEM + [1, 2, 3])
    assert first.num_cached_tokens == 0
    assert first.slots.tolist() == list(range(11))
    assert m.block_table([1]).tolist() == [[0, 1, 2]]
    h = chain(SYSTEM)
    assert described(m.take_events().events) == [stored(h, None, SYSTEM)]
    assert m.num_cached_blocks == 2

    second = m.add_sequence(2, token_ids=SYSTEM + [7, 8])
    assert second.num_cached_tokens == 8
    assert second.slots.tolist() == [12, 13]          # only the uncached positions, in block 3
    assert m.block_table([2]).tolist() == [[0, 1, 3]]
    assert m.allocator.refcount([0, 1, 2, 3]).tolist() == [2, 2, 1, 1]
    assert m.take_events().events == []               # nothing new became full
    assert stats(m) == (2, 21, 8, 0)
    assert m.prefix_cache_stats.hit_rate == pytest.approx(8 / 21)
    assert m.num_free_blocks == 12
    assert m.block_tokens(3) == [7, 8]
    assert m.sequence_tokens(2) == SYSTEM + [7, 8]
    m.check()


def test_the_hit_stops_short_of_the_last_token_and_a_duplicate_stays_unregistered():
    m = caching(16)
    m.add_sequence(1, token_ids=SYSTEM)               # exactly two full blocks: 0, 1
    h = chain(SYSTEM)
    m.take_events()
    assert m.count_cached_tokens(SYSTEM) == 4          # capped at (8 - 1) // 4 = 1 block
    again = m.add_sequence(2, token_ids=SYSTEM)
    assert again.num_cached_tokens == 4
    assert again.slots.tolist() == [8, 9, 10, 11]     # block 1's content again, in block 2
    assert m.block_table([2]).tolist() == [[0, 2]]
    # Block 2 is full with hash h[1], which block 1 already holds: it stays unregistered.
    assert m.num_cached_blocks == 2
    assert m.take_events().events == []
    assert m.block_tokens(2) == SYSTEM[4:]
    m.free_sequence(2)
    assert m.allocator._free_stack[-1] == 2           # unregistered: free stack, not LRU
    assert m._lru == []                               # block 0 is still held by sequence 1
    m.check()


def test_short_prompts_are_never_hits():
    m = caching(8)
    m.add_sequence(1, token_ids=SYSTEM + [9])
    assert m.count_cached_tokens([]) == 0
    assert m.count_cached_tokens(SYSTEM[:1]) == 0
    assert m.count_cached_tokens(SYSTEM[:4]) == 0      # (4 - 1) // 4 = 0
    assert m.count_cached_tokens(SYSTEM[:5]) == 4
    assert m.count_cached_tokens(SYSTEM) == 4
    assert m.count_cached_tokens(SYSTEM + [0]) == 8
    empty = m.add_sequence(2, token_ids=[])
    assert empty.num_cached_tokens == 0 and empty.slots.tolist() == []
    assert m.block_table([2]).tolist() == [[]]
    assert stats(m) == (2, 9, 0, 0)


def test_eviction_takes_the_free_stack_first_then_the_lru_tail_of_a_sequence_before_its_head():
    m = caching(5)
    prompt = list(range(13))                           # blocks 0, 1, 2 full, block 3 partial
    m.add_sequence(1, token_ids=prompt)
    h = chain(prompt)
    m.take_events()
    m.free_sequence(1)
    # Last block first: 3 (unregistered) to the free stack, then 2, 1, 0 to the LRU.
    assert m.allocator._free_stack == [4, 3]
    assert m._lru == [2, 1, 0]
    assert m.num_free_blocks == 5 and m.num_cached_blocks == 3
    other = list(range(50, 66))                        # four full blocks, nothing shared
    result = m.add_sequence(2, token_ids=other)
    assert result.num_cached_tokens == 0
    assert m.block_table([2]).tolist() == [[3, 4, 2, 1]]
    g = chain(other)
    assert described(m.take_events().events) == [
        removed(h[2]), removed(h[1]),                  # evictions first, in taking order
        stored(g, None, other),
    ]
    assert stats(m)[3] == 2
    assert m._lru == [0]
    assert m.count_cached_tokens(prompt) == 4          # the head block survived
    m.check()


def test_a_hit_revives_a_cached_free_block_and_counts_it_out_of_what_is_available():
    m = caching(3)
    prompt = SYSTEM + [1]
    m.add_sequence(1, token_ids=prompt)
    m.free_sequence(1)
    assert m._lru == [1, 0] and m.allocator._free_stack == [2]
    m.take_events()
    before = (m._lru[:], m.allocator._free_stack[:], stats(m))
    # Thirteen tokens with the same two blocks: 2 hits, 2 more blocks, but taking the
    # hits leaves only one block to take.
    with pytest.raises(OutOfBlocksError) as info:
        m.add_sequence(2, token_ids=SYSTEM + [1, 2, 3, 4, 5])
    assert (info.value.requested, info.value.available) == (2, 1)
    assert (m._lru, m.allocator._free_stack, stats(m)) == before
    assert m.take_events().events == [] and 2 not in m
    result = m.add_sequence(2, token_ids=SYSTEM + [9])
    assert result.num_cached_tokens == 8 and result.slots.tolist() == [8]
    assert m.block_table([2]).tolist() == [[0, 1, 2]]
    assert m._lru == [] and m.num_free_blocks == 0
    assert m.block_tokens(2) == [9]
    assert stats(m) == (2, 18, 8, 0)
    m.check()


def test_copy_on_write_carries_the_tokens_and_registers_the_copy_when_it_fills():
    m = caching(8)
    m.add_sequence(1, token_ids=[10, 11, 12, 13, 14, 15])
    m.fork(1, 2)
    m.take_events()
    result = m.append_tokens([2], 2, token_ids=[20, 21])
    assert result.copy_src.tolist() == [1] and result.copy_dst.tolist() == [2]
    assert result.slots.tolist() == [10, 11]
    assert m.block_tokens(1) == [14, 15]              # the parent's block is untouched
    assert m.block_tokens(2) == [14, 15, 20, 21]
    assert m.sequence_tokens(2) == [10, 11, 12, 13, 14, 15, 20, 21]
    assert m.sequence_tokens(1) == [10, 11, 12, 13, 14, 15]
    h = chain(m.sequence_tokens(2))
    assert described(m.take_events().events) == [stored(h[1:], h[0], [14, 15, 20, 21])]
    # The parent fills its own block with the same tokens: same hash, stays unregistered.
    m.append_tokens([1], 2, token_ids=[20, 21])
    assert m.take_events().events == [] and m.num_cached_blocks == 2
    m.check()


def test_append_registers_sequence_by_sequence_and_a_run_carries_its_parent():
    m = caching(16)
    base = [1, 2, 3, 4, 5, 6]
    m.add_sequence(1, token_ids=base)
    m.fork(1, 2)
    m.take_events()
    # Both fill block 1 with the same tokens and block 2 differently, in one call.
    tail_1 = [7, 8, 30, 31, 32, 33]
    tail_2 = [7, 8, 40, 41, 42, 43]
    result = m.append_tokens([1, 2], 6, token_ids=tail_1 + tail_2)
    assert result.copy_src.tolist() == [1] and result.copy_dst.tolist() == [2]
    assert m.block_table([1, 2]).tolist() == [[0, 2, 3], [0, 1, 4]]
    h1 = chain(base + tail_1)
    h2 = chain(base + tail_2)
    assert h1[1] == h2[1]
    assert described(m.take_events().events) == [
        stored(h1[1:], h1[0], [5, 6, 7, 8, 30, 31, 32, 33]),
        stored(h2[2:], h2[1], [40, 41, 42, 43]),     # block 1's hash is sequence 1's block
    ]
    assert m.num_cached_blocks == 4
    m.check()


def test_reset_drops_every_hash_and_later_blocks_register_against_the_old_chain():
    m = caching(8)
    m.add_sequence(1, token_ids=SYSTEM + [1])         # blocks 0, 1, 2
    m.add_sequence(2, token_ids=list(range(60, 69)))   # blocks 3, 4, 5
    m.free_sequence(2)
    assert m._lru == [4, 3] and m.allocator._free_stack == [7, 6, 5]
    m.take_events()
    assert m.reset_prefix_cache() == 4
    assert m.allocator._free_stack == [7, 6, 5, 4, 3]  # LRU head first
    assert m._lru == [] and m.num_cached_blocks == 0
    assert described(m.take_events().events) == [("AllBlocksCleared",)]
    assert m.count_cached_tokens(SYSTEM + [1]) == 0
    # Sequence 1 fills block 2: it registers, its parent being h[1], no longer in the map.
    m.append_tokens([1], 3, token_ids=[2, 3, 4])
    h = chain(SYSTEM + [1, 2, 3, 4])
    assert described(m.take_events().events) == [stored(h[2:], h[1], [1, 2, 3, 4])]
    assert m.num_cached_blocks == 1
    # A new prompt with sequence 1's content: block 0 registers again, block 1's hash is
    # free too, block 2's is sequence 1's: two runs, the second broken off by it.
    prompt = SYSTEM + [1, 2, 3, 4] + [5, 6, 7, 8] + [9]
    result = m.add_sequence(3, token_ids=prompt)
    assert result.num_cached_tokens == 0
    g = chain(prompt)
    assert described(m.take_events().events) == [
        stored(g[:2], None, SYSTEM),
        stored(g[3:], g[2], [5, 6, 7, 8]),
    ]
    assert stats(m) == (3, 9 + 9 + 17, 0, 0)
    m.check()


def test_extra_keys_enter_the_hash_tagged_and_the_events_untagged():
    m = caching(16)
    keys = Keys(lora_name="adapter", lora_path="/lora/a", lora_id=7,
                mm=(("img", 2, 4),), cache_salt="salt")
    prompt = list(range(200, 209))
    m.add_sequence(1, token_ids=prompt, extra_keys=keys)

    def tagged(k):
        found = [("lora", "adapter", "/lora/a")]
        if k == 0:
            found += [("mm", "img", 2), ("cache_salt", "salt")]
        if k == 1:
            found += [("mm", "img", -2)]               # the item runs over from block 0
        return tuple(found)

    h = chain(prompt, tagged)
    assert described(m.take_events().events) == [
        stored(h, None, prompt[:8], lora_id=7, lora_name="adapter",
               extra_keys=[("adapter", ("img", 2), "salt"), ("adapter", ("img", -2))]),
    ]
    assert m.count_cached_tokens(prompt, keys) == 8
    assert m.count_cached_tokens(prompt) == 0          # no keys, other hashes
    assert m.count_cached_tokens(prompt, Keys(lora_name="adapter", lora_path="/lora/a",
                                              mm=(("img", 2, 4),), cache_salt="other")) == 0
    # An item tags only the blocks it overlaps; a block without keys has None.
    plain = ReferenceKVCacheManager(4, B, enable_prefix_caching=True)
    plain.add_sequence(1, token_ids=prompt, extra_keys=Keys(mm=(("img", 5, 1),)))
    assert plain.block_table([1]).tolist() == [[0, 1, 2]]
    assert plain._registered == {
        0: chain(prompt)[0],
        1: chain(prompt, lambda k: None if k == 0 else (("mm", "img", 1),))[1],
    }
    m.check()
    plain.check()


def test_count_cached_tokens_changes_nothing():
    m = caching(4)
    m.add_sequence(1, token_ids=SYSTEM + [1])
    m.free_sequence(1)
    m.take_events()
    before = (m._lru[:], m.allocator._free_stack[:], stats(m), m.num_cached_blocks)
    assert m.count_cached_tokens(SYSTEM + [1]) == 8
    assert (m._lru, m.allocator._free_stack, stats(m), m.num_cached_blocks) == before
    assert m.take_events().events == []


@pytest.mark.parametrize("algorithm, serialise, digest", [
    ("sha256", lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL), lambda b: hashlib.sha256(b).digest()),
    ("sha256_cbor", lambda o: cbor2.dumps(o, canonical=True), lambda b: hashlib.sha256(b).digest()),
    ("xxhash", lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL), xxhash.xxh3_128_digest),
    ("xxhash_cbor", lambda o: cbor2.dumps(o, canonical=True), xxhash.xxh3_128_digest),
])
def test_each_algorithm_and_seed(monkeypatch, algorithm, serialise, digest):
    def H(obj):
        return digest(serialise(obj))

    tokens = [5, 6, 7, 8, 9]
    m = caching(4, hash_algorithm=algorithm, hash_seed="seed", event_hash_format="bytes")
    m.add_sequence(1, token_ids=tokens)
    expected = H((H("seed"), (5, 6, 7, 8), None))
    assert len(expected) == (32 if algorithm.startswith("sha") else 16)
    assert m._registered == {0: expected}
    assert m.take_events().events[0].block_hashes == [expected]
    # No seed: $PYTHONHASHSEED, else the fixed string (sha256) or one random seed per
    # process (xxhash), the same for every manager.
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    seeded = caching(4, hash_algorithm=algorithm)
    seeded.add_sequence(1, token_ids=tokens)
    assert seeded._registered == {0: H((H("42"), (5, 6, 7, 8), None))}
    monkeypatch.delenv("PYTHONHASHSEED")
    first, second = caching(4, hash_algorithm=algorithm), caching(4, hash_algorithm=algorithm)
    first.add_sequence(1, token_ids=tokens)
    second.add_sequence(1, token_ids=tokens)
    assert first._registered == second._registered
    if algorithm.startswith("sha"):
        assert first._registered == {0: H((H("vllm-none-hash"), (5, 6, 7, 8), None))}


def test_events_batch_medium_rank_and_switches():
    m = caching(4, medium="CPU", data_parallel_rank=3)
    m.add_sequence(1, token_ids=[1, 2, 3, 4, 5])
    batch = m.take_events()
    assert batch.data_parallel_rank == 3 and isinstance(batch.ts, float)
    assert [e.medium for e in batch.events] == ["CPU"]
    assert m.take_events().events == []              # taking empties the record
    quiet = ReferenceKVCacheManager(4, B, enable_prefix_caching=True)
    quiet.add_sequence(1, token_ids=[1, 2, 3, 4, 5])
    quiet.reset_prefix_cache()
    with pytest.raises(RuntimeError, match="enable_kv_cache_events"):
        quiet.take_events()
    assert quiet.prefix_cache_stats.requests == 1
    # Events describe the prefix cache: there are none without one.
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        ReferenceKVCacheManager(4, B, enable_kv_cache_events=True)
    with pytest.raises(TypeError, match="medium"):
        caching(4, medium=None)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        caching(4, data_parallel_rank=-1)
    # An int seed reads as $PYTHONHASHSEED would hold it.
    five, text = caching(4, hash_seed=5), caching(4, hash_seed="5")
    assert five._none_hash == text._none_hash == sha("5")
    with pytest.raises(TypeError):
        caching(4, hash_seed=True)
    with pytest.raises(ValueError):
        caching(4, hash_seed=2**32)


def test_bad_calls_raise_and_change_nothing():
    m = caching(4)
    m.add_sequence(1, token_ids=[1, 2, 3])
    m.take_events()
    with pytest.raises(ValueError, match="token_ids"):
        m.add_sequence(2, 3)
    with pytest.raises(ValueError, match="token_ids"):
        m.add_sequence(2, 4, token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="token_ids"):
        m.add_sequence(2, token_ids=[1, -1])
    with pytest.raises(OverflowError, match="token_ids"):
        m.add_sequence(2, token_ids=[2**31])
    with pytest.raises(ValueError, match="token_ids"):
        m.append_tokens([1], 1)
    with pytest.raises(ValueError, match="token_ids"):
        m.append_tokens([1], 2, token_ids=[5])
    with pytest.raises(OverflowError, match="token_ids"):
        m.count_cached_tokens([2**31])
    with pytest.raises(TypeError):
        m.add_sequence(2, token_ids=[1.5])
    with pytest.raises(ValueError, match="already exists"):
        m.add_sequence(1, token_ids=[9])
    assert 2 not in m and m.sequence_tokens(1) == [1, 2, 3]
    assert m.take_events().events == [] and stats(m) == (1, 3, 0, 0)
    assert m.add_sequence(2, token_ids=[2**31 - 1, 0]).num_cached_tokens == 0
    m.check()


def test_without_caching_token_ids_are_optional_and_nothing_is_cached():
    m = ReferenceKVCacheManager(4, B)
    assert m.add_sequence(1, 5).slots.tolist() == [0, 1, 2, 3, 4]
    m.add_sequence(2, token_ids=[1, 2, 3, 4, 5])
    m.append_tokens([1, 2], 1)
    assert m.sequence_tokens(1) == [None] * 6
    assert m.sequence_tokens(2) == [1, 2, 3, 4, 5, None]
    assert m.count_cached_tokens([1, 2, 3, 4, 5]) == 0 and m.num_cached_blocks == 0
    with pytest.raises(ValueError, match="extra_keys"):
        m.add_sequence(3, token_ids=[1], extra_keys=Keys(cache_salt="s"))
    with pytest.raises(TypeError, match="num_tokens or token_ids"):
        m.add_sequence(3)
    m.free_sequence([1])
    assert m.allocator._free_stack == [0, 1]          # first block first, as ever
    assert m.reset_prefix_cache() == 0
    m.check()


def test_check_sees_a_corrupted_model():
    def model():
        m = caching(6)
        m.add_sequence(1, token_ids=SYSTEM + [1])
        m.add_sequence(2, token_ids=list(range(30, 39)))
        m.free_sequence(2)
        m.check()
        return m

    m = model()
    m._contents[0][1] = 999                            # a registered block's content
    with pytest.raises(AssertionError, match="block 0"):
        m.check()
    m = model()
    m._lru.append(m._lru[0])
    with pytest.raises(AssertionError, match="LRU"):
        m.check()
    m = model()
    m._cache[chain(SYSTEM)[0]] = 1
    with pytest.raises(AssertionError, match="map"):
        m.check()
    m = model()
    m._token_ids[1][-1] = 2
    with pytest.raises(AssertionError, match="sequence 1"):
        m.check()
    m = model()
    m.allocator._free_stack.append(m._lru.pop())
    with pytest.raises(AssertionError, match="free stack holds a registered block"):
        m.check()


def test_add_sequences_admits_every_prompt_or_none():
    m = caching(5)
    # Three blocks, one (after hitting two the first registers), three and one: eight
    # fresh blocks for five free; nothing is added (docs/HYBRID.md, step 3).
    with pytest.raises(OutOfBlocksError) as error:
        m.add_sequences([1, 2, 3, 4], token_ids=[SYSTEM + [1], SYSTEM + [2], list(range(40, 49)), [7]])
    assert (error.value.requested, error.value.available) == (8, 5)
    assert len(m) == 0 and stats(m) == (0, 0, 0, 0) and m.take_events().events == []
    results = m.add_sequences([1, 2], token_ids=[SYSTEM + [1], SYSTEM + [2]])
    # The second hits what the first registered in the same call.
    assert [r.num_cached_tokens for r in results] == [0, 8]
    assert [r.slots.tolist() for r in results] == [[0, 1, 2, 3, 4, 5, 6, 7, 8], [12]]
    assert len(m) == 2
    assert stats(m) == (2, 18, 8, 0)
    with pytest.raises(ValueError, match="already exists"):
        m.add_sequences([5, 1], token_ids=[[1], [2]])
    with pytest.raises(ValueError, match="more than once"):
        m.add_sequences([5, 5], token_ids=[[1], [2]])
    with pytest.raises(OverflowError, match="prompt 1: token_ids"):
        m.add_sequences([5, 6], token_ids=[[1], [2**31]])
    with pytest.raises(TypeError, match="list of arrays"):
        m.add_sequences([5], token_ids=iter([[1]]))
    with pytest.raises(ValueError, match="2 prompts for 1 seq_ids"):
        m.add_sequences([5], token_ids=[[1], [2]])
    assert len(m) == 2 and stats(m) == (2, 18, 8, 0)
    m.check()
