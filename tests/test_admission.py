"""Batched admission, can_admit, reset and the coordinator hooks (docs/HYBRID.md,
"Batched admission and scheduler calls", "The hooks a group coordinator uses")."""

import pickle

import numpy as np
import pytest

import pagetable
from pagetable import KVCacheManager, OutOfBlocksError, PAD_SLOT_ID
from pagetable._admission import Admission

from side_by_side import Pair, implementations, make, needs_cython, random_workload

P = PAD_SLOT_ID
CACHING = dict(enable_prefix_caching=True, enable_kv_cache_events=True)
SYSTEM = [100, 101, 102, 103, 104, 105, 106, 107]


@pytest.fixture(autouse=True)
def no_hash_seed_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


@implementations("admission")
def test_all_or_nothing_with_hits_within_the_call(impl):
    kv = make(impl, 5, 4, **CACHING)
    with pytest.raises(OutOfBlocksError) as error:
        kv.add_sequences([1, 2, 3], token_ids=[SYSTEM + [1], SYSTEM + [2], list(range(9))])
    assert (error.value.requested, error.value.available) == (7, 5)
    assert len(kv) == 0 and kv.take_events().events == []
    results = kv.add_sequences([1, 2], token_ids=[SYSTEM + [1], SYSTEM + [2]])
    assert [r.num_cached_tokens for r in results] == [0, 8]
    assert kv.block_table([1, 2]).tolist() == [[0, 1, 2], [0, 1, 3]]


@implementations("admission")
def test_hit_blocks_gain_references_before_any_take(impl):
    # LRU [1, 0, 3, 2] (SYSTEM's blocks at the head), free stack [4].  One prompt at a
    # time, the first prompt's take would evict block 1 before the second could hit
    # it; batched, both of SYSTEM's blocks are held first and the takes evict 3, 2.
    kv = make(impl, 5, 4, **CACHING)
    kv.add_sequence(0, token_ids=SYSTEM)
    kv.add_sequence(9, token_ids=list(range(50, 58)) + [1])
    kv.free_sequence([0, 9])
    kv.take_events()
    results = kv.add_sequences([1, 2], token_ids=[[9] * 5, SYSTEM + [5]])
    assert [r.num_cached_tokens for r in results] == [0, 8]
    assert kv.block_table([1, 2]).tolist() == [[4, 3, P], [0, 1, 2]]
    assert kv.prefix_cache_stats.evictions == 2
    kv.check()


@implementations("admission")
def test_num_tokens_only_without_caching(impl):
    kv = make(impl, 4, 2)
    results = kv.add_sequences([0, 1], num_tokens=[3, 1])
    assert [r.slots.tolist() for r in results] == [[0, 1, 2], [4]]
    with pytest.raises(OutOfBlocksError):
        kv.add_sequences([2, 3], num_tokens=[1, 1])
    with pytest.raises(ValueError):
        kv.add_sequences([2], num_tokens=[1], token_ids=[[1, 2]])


@implementations("admission")
def test_can_admit(impl):
    kv = make(impl, 10, 4, **CACHING)
    kv.add_sequence(0, token_ids=SYSTEM + [1])            # 3 blocks
    assert kv.can_admit(9, token_ids=SYSTEM + [2]) == Admission(True, True, 1)
    assert kv.can_admit(9) == Admission(True, True, 3)    # no ids: no hits
    assert kv.can_admit(29) == Admission(False, True, 8)
    assert kv.can_admit(41) == Admission(False, False, 11)
    # ceil(0.25 * 10) = 3 blocks kept back.
    assert kv.can_admit(13, watermark=0.25) == Admission(True, True, 4)
    assert kv.can_admit(17, watermark=0.25) == Admission(False, True, 5)
    assert kv.can_admit(29, watermark=0.25) == Admission(False, False, 8)
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("x", TypeError)):
        with pytest.raises(error):
            kv.can_admit(1, watermark=bad)
    assert isinstance(kv.can_admit(1), tuple) and kv.can_admit(1).need == 1


@implementations("admission")
def test_reset_frees_everything_and_clears_the_cache(impl):
    kv = make(impl, 6, 4, **CACHING)
    kv.add_sequence(0, token_ids=SYSTEM + [1])
    kv.fork(0, 1)
    kv.take_events()
    kv.reset()
    assert len(kv) == 0 and kv.num_free_blocks == 6 and kv.num_cached_blocks == 0
    assert [type(e).__name__ for e in kv.take_events().events] == ["AllBlocksCleared"]
    assert kv.prefix_cache_stats.requests == 1
    kv.check()


@implementations("hooks", "windows")
def test_the_coordinator_hooks(impl):
    kv = make(impl, 12, 2, sliding_window=3, **CACHING)
    tokens = list(range(10, 20))
    assert kv._hit_mask(tokens + [1]).tolist() == [True] + [False] * 5
    assert kv._hit_mask([1, 2]).tolist() == [True]
    kv.add_sequence(0, token_ids=tokens)
    kv.truncate([0], 1)
    kv.free_sequence(0)
    # H reads from first_needed(2H) = 2H - 2, block H - 1: each H alone needs block H-1.
    assert kv._hit_mask(tokens + [1]).tolist() == [True, False, True, True, True, True]
    plan = kv._admission_plan([5], None, [tokens + [1]], None, [3])
    assert (plan.need, plan.available) == (3, 12 - 1)
    with pytest.raises(ValueError):
        kv._admission_plan([5], None, [tokens + [1]], None, [1])
    before = kv.num_free_blocks
    [result] = kv._admit(plan)
    assert result.num_cached_tokens == 6 and kv.num_free_blocks == before - 3 - 1
    assert kv.block_table([5]).tolist()[0][:3] == [P, P, 2]
    plan = kv._append_plan([5], 40, token_ids=[1] * 40)
    with pytest.raises(OutOfBlocksError):
        kv._append(plan)
    plan = kv._append_plan([5], 1, token_ids=[1])
    assert kv._append(plan).slots.size == 1
    with pytest.raises(ValueError):
        kv._truncate_check([5], 2)
    kv._truncate_check([5], 12)
    assert kv.seq_lens([5]).tolist() == [12]
    kv.check()


@needs_cython("admission", "lookahead", "truncate", "windows")
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("seed", range(3))
def test_random_admissions_match_the_reference(block_size, seed):
    pair = Pair(16, block_size, **CACHING)
    random_workload(pair, np.random.default_rng(seed), 150)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
def test_random_admissions_keep_the_reference_consistent(block_size):
    pair = Pair(16, block_size, compare=False, **CACHING)
    random_workload(pair, np.random.default_rng(block_size + 7), 250)


# ---- the batched result -----------------------------------------------------------

def test_add_sequences_returns_every_slot_in_one_array():
    kv = KVCacheManager(16, 4)
    result = kv.add_sequences(np.array([5, 3, 9]), num_tokens=np.array([6, 0, 3]))
    assert isinstance(result, pagetable.AdmissionResult)
    assert len(result) == 3
    assert result.query_start_loc.tolist() == [0, 6, 6, 9]
    assert result.num_cached_tokens.tolist() == [0, 0, 0]
    for i, seq in enumerate([5, 3, 9]):
        a, b = result.query_start_loc[i], result.query_start_loc[i + 1]
        n = b - a
        assert result.slots[a:b].tolist() == kv.page_table.slot_mapping([seq] * n, range(n)).tolist()
        assert result[i].slots.tolist() == result.slots[a:b].tolist()
    assert result[-1] == result[2] and result[1:] == [result[1], result[2]]
    assert [r.num_cached_tokens for r in result] == [0, 0, 0]
    assert pickle.loads(pickle.dumps(result)) == result
    with pytest.raises(IndexError, match="prompt index 3"):
        result[3]
    with pytest.raises(TypeError):
        result["a"]


def test_the_one_pass_admission_matches_prompt_by_prompt_admission():
    rng = np.random.default_rng(4)
    for trial in range(20):
        ids = rng.permutation(40)[:int(rng.integers(1, 30))]
        lengths = rng.integers(0, 70, ids.size)
        batched, single = KVCacheManager(400, 16), KVCacheManager(400, 16)
        result = batched.add_sequences(ids, num_tokens=lengths)
        singles = [single.add_sequence(int(s), int(n)) for s, n in zip(ids, lengths)]
        assert result == singles
        assert batched.block_table(ids).tolist() == single.block_table(ids).tolist()
        batched.check()


@pytest.mark.parametrize("call, error, message", [
    (lambda kv: kv.add_sequences(np.array([1, 2, 1]), num_tokens=np.array([1, 1, 1])), ValueError,
     r"seq_ids\[2\] = 1 appears more than once"),
    (lambda kv: kv.add_sequences(np.array([1, -2]), num_tokens=np.array([1, 1])), ValueError, "negative"),
    (lambda kv: kv.add_sequences(np.array([1, 7]), num_tokens=np.array([1, 1])), ValueError,
     r"seq_ids\[1\] = 7 already exists"),
    (lambda kv: kv.add_sequences(np.array([1, 2]), num_tokens=np.array([1, -1])), ValueError,
     "prompt 1: num_tokens must be >= 0"),
    (lambda kv: kv.add_sequences(np.array([1, 2]), num_tokens=np.array([1])), ValueError, "1 entries for 2"),
    (lambda kv: kv.add_sequences(np.array([1, 2]), num_tokens=np.array([1.5, 2])), TypeError, "num_tokens"),
    (lambda kv: kv.add_sequences(np.array([1, 2]), num_tokens=np.array([40, 40])), OutOfBlocksError, "need 6"),
])
def test_one_pass_admission_errors_change_nothing(call, error, message):
    kv = KVCacheManager(4, 16)
    kv.add_sequence(7, 3)
    before = kv._state()
    with pytest.raises(error, match=message):
        call(kv)
    after = kv._state()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) if isinstance(before[k], np.ndarray) else before[k] == after[k]
               for k in before)
    kv.check()


def test_admission_result_checks_its_arrays():
    with pytest.raises(ValueError, match="one entry more"):
        pagetable.AdmissionResult([1, 2], [0], [0, 1, 2])
    with pytest.raises(ValueError, match="rise from 0"):
        pagetable.AdmissionResult([1, 2], [0, 0], [0, 2, 1])
    with pytest.raises(ValueError, match=">= 0"):
        pagetable.AdmissionResult([1, 2], [-1], [0, 2])
    assert pagetable.AdmissionResult([], [], [0]) == []
