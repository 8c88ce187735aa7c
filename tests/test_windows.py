"""Sliding-window and chunked-local attention (docs/HYBRID.md, "Attention kinds"):
the release rule, PAD entries, windowed prefix hits and the hash chain past released
blocks, on the reference model and (once it has them) the Cython manager."""

import hashlib
import pickle

import numpy as np
import pytest

from pagetable import OutOfBlocksError, PAD_SLOT_ID
from pagetable.reference import ReferenceKVCacheManager

from side_by_side import Pair, implementations, make, needs_cython, random_workload

P = PAD_SLOT_ID


@implementations("windows")
def test_window_4_block_2_pads_what_the_next_token_no_longer_reads(impl):
    kv = make(impl, 6, 2, sliding_window=4)
    kv.add_sequence(0, 5)
    assert kv.block_table([0]).tolist() == [[0, 1, 2]]
    # c = 5: the token at 5 reads 2..5, so block 0 goes back before the call takes.
    assert kv.append_tokens([0], 1).slots.tolist() == [5]
    assert kv.block_table([0]).tolist() == [[P, 1, 2]]
    assert kv.num_free_blocks == 4 and kv.allocator.refcount([0]).tolist() == [0]
    # c = 6 reads 3..6: block 1 still needed; position 6 takes block 0 again (LIFO).
    assert kv.append_tokens([0], 1).slots.tolist() == [0]
    assert kv.block_table([0]).tolist() == [[P, 1, 2, 0]]
    # c = 7 reads 4..7: block 1 goes.
    kv.append_tokens([0], 1)
    assert kv.block_table([0]).tolist() == [[P, P, 2, 0]]
    assert kv.seq_lens([0]).tolist() == [8]
    indptr, indices, last = kv.flashinfer_layout([0])
    assert indices.tolist() == [P, P, 2, 0] and last.tolist() == [2]
    kv.fork(0, 1)
    assert kv.block_table([1]).tolist() == [[P, P, 2, 0]]
    kv.free_sequence([0, 1])
    assert kv.num_free_blocks == 6
    kv.check()


@implementations("windows")
def test_chunked_local_releases_whole_chunks(impl):
    kv = make(impl, 6, 2, attention_chunk=4)
    kv.add_sequence(0, 5)
    kv.append_tokens([0], 1)          # c = 5 reads from 4: blocks 0 and 1 go
    assert kv.block_table([0]).tolist() == [[P, P, 2]]
    kv.append_tokens([0], 2)          # c = 6 reads from 4: nothing more
    assert kv.block_table([0]).tolist() == [[P, P, 2, 1]]
    kv.append_tokens([0], 1)          # c = 8 reads from 8: blocks 2 and 3 go
    assert kv.block_table([0]).tolist() == [[P, P, P, P, 1]]
    kv.check()


@implementations("windows")
def test_a_zero_count_releases_nothing_and_a_call_that_raises_releases_nothing(impl):
    kv = make(impl, 3, 2, sliding_window=2)
    kv.add_sequence(0, 4)
    kv.add_sequence(1, 2)
    kv.append_tokens([0, 1], [0, 0])
    assert kv.block_table([0]).tolist() == [[0, 1]]
    # Sequence 0 would free block 0 (need 1, free 0 + 1), sequence 1 needs one more:
    # the exact count includes the release, and the failure releases nothing.
    with pytest.raises(OutOfBlocksError) as error:
        kv.append_tokens([0, 1], [1, 1])
    assert (error.value.requested, error.value.available) == (2, 1)
    assert kv.block_table([0, 1]).tolist() == [[0, 1], [2, P]]
    # One call: the block released by sequence 0 serves it.
    assert kv.append_tokens([0], 1).slots.tolist() == [0]
    assert kv.block_table([0]).tolist() == [[P, 1, 0]]


@implementations("windows")
def test_a_block_shared_by_two_sequences_of_the_call_counts_once(impl):
    kv = make(impl, 4, 2, sliding_window=1)
    kv.add_sequence(0, 4)
    kv.fork(0, 1)
    assert kv.num_free_blocks == 2
    # Both release blocks 0 and 1 (window 1 keeps nothing before c); each then needs
    # one block: need 2, available 2 + 2 freed.
    result = kv.append_tokens([0, 1], 1)
    assert result.slots.tolist() == [1 * 2, 0 * 2]
    assert kv.block_table([0, 1]).tolist() == [[P, P, 1], [P, P, 0]]
    kv.check()


def sha(obj):
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def chain(tokens, size):
    parent, out = sha("vllm-none-hash"), []
    for k in range(len(tokens) // size):
        parent = sha((parent, tuple(tokens[k * size:(k + 1) * size]), None))
        out.append(parent)
    return out


@pytest.fixture(autouse=True)
def no_hash_seed_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


@implementations("windows", "truncate")
def test_a_windowed_hit_needs_only_the_window_and_pads_the_rest(impl):
    caching = dict(enable_prefix_caching=True, enable_kv_cache_events=True)
    tokens = list(range(10, 20))
    for window, hit in ((None, 0), (4, 10)):
        kv = make(impl, 12, 2, sliding_window=window, **caching)
        kv.add_sequence(0, token_ids=tokens)
        kv.truncate([0], 1)             # block 0 now partial: its hash goes
        kv.free_sequence(0)             # blocks 1..4 stay cached-free
        kv.take_events()
        # n = 11: H = 5 reads from first_needed(10) = 7, block 3: blocks 3 and 4.
        assert kv.count_cached_tokens(tokens + [7]) == hit
        result = kv.add_sequence(1, token_ids=tokens + [7])
        assert result.num_cached_tokens == hit
        if window:
            assert kv.block_table([1]).tolist() == [[P, P, P, 3, 4, 0]]   # block 0: free stack top
            assert result.slots.tolist() == [0]
            # The chain goes on from h[4]: block 5 is not full yet; fill it.
            kv.append_tokens([1], 1, token_ids=[8])
            events = kv.take_events().events
            h = chain(tokens + [7, 8], 2)
            assert [e.block_hashes for e in events] == [[int.from_bytes(h[5][-8:], "big")]]
            assert events[0].parent_block_hash == int.from_bytes(h[4][-8:], "big")
        assert kv.prefix_cache_stats.hits == hit
        kv.check()


@implementations("windows")
def test_group_idx_is_in_every_event(impl):
    kv = make(impl, 2, 2, sliding_window=2, group_idx=3, enable_prefix_caching=True,
              enable_kv_cache_events=True)
    kv.add_sequence(0, token_ids=[1, 2, 3])
    kv.free_sequence(0)
    kv.add_sequence(1, token_ids=[5, 6, 7])      # evicts block 0's hash
    assert [e.group_idx for e in kv.take_events().events] == [3, 3, 3]


@pytest.mark.parametrize("kwargs, error", [
    (dict(sliding_window=4, attention_chunk=4), ValueError),
    (dict(sliding_window=0), ValueError),
    (dict(attention_chunk=-2), ValueError),
    (dict(sliding_window=True), TypeError),
    (dict(attention_chunk=2.0), TypeError),
    (dict(group_idx=-1), ValueError),
    (dict(group_idx=1.5), TypeError),
])
@implementations("windows")
def test_bad_windows_raise(impl, kwargs, error):
    with pytest.raises(error):
        make(impl, 4, 2, **kwargs)


@needs_cython("windows", "lookahead", "truncate", "admission")
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("kind", ["window", "chunk"])
@pytest.mark.parametrize("seed", range(3))
def test_random_windowed_workload_matches_the_reference(block_size, kind, seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 3 * block_size + 2))
    option = {"sliding_window": length} if kind == "window" else {"attention_chunk": length}
    pair = Pair(24, block_size, enable_prefix_caching=bool(seed % 2),
                enable_kv_cache_events=bool(seed % 2), group_idx=seed, **option)
    random_workload(pair, rng, 150)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("kind", ["window", "chunk"])
def test_random_windowed_workload_keeps_the_reference_consistent(block_size, kind):
    # The reference alone (its check() after every call), whatever the Cython has.
    rng = np.random.default_rng(block_size)
    option = {"sliding_window": 5} if kind == "window" else {"attention_chunk": 5}
    pair = Pair(24, block_size, compare=False, enable_prefix_caching=True,
                enable_kv_cache_events=True, **option)
    random_workload(pair, rng, 200)
    assert isinstance(pair.ref, ReferenceKVCacheManager)
