"""Lookahead, truncate and rollback (docs/HYBRID.md, "Lookahead" and "Rollback and
truncate"): hand-computed cases on the reference model and (once it has them) the
Cython manager, and random workloads held side by side."""

import numpy as np
import pytest

from pagetable import PAD_SLOT_ID
from pagetable.reference.manager import APPEND_RESULT_HAS_LOOKAHEAD

from side_by_side import Pair, implementations, make, needs_cython, random_workload

P = PAD_SLOT_ID
needs_lookahead_slots = pytest.mark.skipif(
    not APPEND_RESULT_HAS_LOOKAHEAD, reason="AppendResult lacks lookahead_slots (pagetable/_results.pyx)")
CACHING = dict(enable_prefix_caching=True, enable_kv_cache_events=True)


@pytest.fixture(autouse=True)
def no_hash_seed_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


@needs_lookahead_slots
@implementations("lookahead", "truncate")
@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_spec_decode_step_reserves_then_commits_into_the_same_slots(impl, accepted):
    kv = make(impl, 8, 4)
    kv.add_sequence(0, 5)                       # blocks 0, 1
    step = kv.append_tokens([0], 1, num_lookahead=3)
    assert step.slots.tolist() == [5]
    assert step.lookahead_slots.tolist() == [6, 7, 8]        # position 8: reserved block 2
    assert kv.block_table([0]).tolist() == [[0, 1, 2]]
    assert kv.seq_lens([0]).tolist() == [6] and kv.num_free_blocks == 5
    # Accepted drafts commit into the reserved slots: no take.
    if accepted:
        assert kv.append_tokens([0], accepted).slots.tolist() == step.lookahead_slots.tolist()[:accepted]
    assert kv.num_free_blocks == 5
    # The rejected rest of the reservation goes with a truncate to the length.
    kv.truncate([0], 6 + accepted)
    assert kv.block_table([0]).tolist() == ([[0, 1, 2]] if accepted == 3 else [[0, 1]])
    kv.check()


@implementations("lookahead", "truncate")
@pytest.mark.parametrize("accepted", [0, 2, 3])
def test_spec_decode_commit_all_then_rollback_the_rejected(impl, accepted):
    kv = make(impl, 8, 4, **CACHING)
    kv.add_sequence(0, token_ids=[1, 2, 3, 4, 5])
    kv.take_events()
    result = kv.append_tokens([0], 4, token_ids=[6, 7, 8, 9])      # 1 + K = 4
    assert result.slots.tolist() == [5, 6, 7, 8]
    if APPEND_RESULT_HAS_LOOKAHEAD:
        assert result.lookahead_slots.tolist() == []
    kv.rollback([0], 3 - accepted)
    assert kv.seq_lens([0]).tolist() == [6 + accepted]
    events = kv.take_events().events
    # Block 1 (positions 4..7) filled with [5, 6, 7, 8]; rolled back into it, it is
    # partial and held only here: its hash goes (unless all three were accepted).
    names = [type(e).__name__ for e in events]
    assert names == (["BlockStored"] if accepted >= 2 else ["BlockStored", "BlockRemoved"])
    assert kv.num_cached_blocks == (2 if accepted >= 2 else 1)
    kv.check()


@implementations("lookahead", "truncate")
def test_reserved_blocks_are_held_freed_and_never_forked(impl):
    kv = make(impl, 8, 2)
    kv.add_sequence(0, 3)                              # blocks 0, 1
    kv.append_tokens([0], 0, num_lookahead=4)          # positions 3..6: blocks 1, 2, 3
    assert kv.block_table([0]).tolist() == [[0, 1, 2, 3]] and kv.num_free_blocks == 4
    kv.fork(0, 1)
    assert kv.block_table([1]).tolist() == [[0, 1]]
    assert kv.allocator.refcount([0, 1, 2, 3]).tolist() == [2, 2, 1, 1]
    # The child writes into the shared block holding position 3: a copy.
    result = kv.append_tokens([1], 1)
    assert (result.copy_src.tolist(), result.copy_dst.tolist()) == ([1], [4])
    kv.free_sequence(0)
    assert kv.num_free_blocks == 6                     # the child holds 0 and its copy 4
    kv.free_sequence(1)
    assert kv.num_free_blocks == 8
    kv.check()


@implementations("truncate")
def test_truncate_releases_the_tail_last_block_first(impl):
    kv = make(impl, 6, 2)
    kv.add_sequence(0, 9)                   # blocks 0..4
    kv.truncate([0], 3)
    assert kv.block_table([0]).tolist() == [[0, 1]] and kv.seq_lens([0]).tolist() == [3]
    # Free stack top is the last pushed: 4 went first, 2 last.
    stack = kv.allocator._free_stack if impl == "reference" else kv.allocator._free_blocks().tolist()
    assert stack[-3:] == [4, 3, 2]
    kv.rollback([0], 3)
    assert kv.block_table([0]).tolist() == [[]] and kv.seq_lens([0]).tolist() == [0]
    assert kv.append_tokens([0], 1).slots.tolist() == [0]   # block 0 again (LIFO)
    kv.check()


@implementations("windows", "truncate")
def test_truncate_is_refused_where_the_window_reaches_a_released_block(impl):
    kv = make(impl, 8, 2, sliding_window=3)
    kv.add_sequence(0, 6)
    kv.append_tokens([0], 1)                 # c = 6 reads from 4: blocks 0 and 1 go
    assert kv.block_table([0]).tolist() == [[P, P, 2, 1]]   # block 1 released, then taken
    with pytest.raises(ValueError):
        kv.truncate([0], 5)                  # the token at 5 reads from 3: block 1
    with pytest.raises(ValueError):
        kv.rollback([0], 2)
    assert kv.seq_lens([0]).tolist() == [7]
    kv.truncate([0], 6)                      # reads from 4: fine
    assert kv.block_table([0]).tolist() == [[P, P, 2]]
    kv.truncate([0], 0)                      # empty: always allowed, live back to 0
    assert kv.block_table([0]).tolist() == [[]]
    kv.append_tokens([0], 3)
    assert kv.block_table([0]).tolist() == [[2, 1]]
    kv.check()


@pytest.mark.parametrize("call", [
    lambda kv: kv.truncate([0], 6),
    lambda kv: kv.truncate([0], -1),
    lambda kv: kv.truncate([0, 1], [1]),
    lambda kv: kv.truncate([0, 0], 1),
    lambda kv: kv.truncate([9], 1),
    lambda kv: kv.truncate([0], 1.0),
    lambda kv: kv.rollback([0, 1], [1, 3]),
    lambda kv: kv.rollback([0], -1),
    lambda kv: kv.append_tokens([0], 1, num_lookahead=-1),
    lambda kv: kv.append_tokens([0], 1, num_lookahead=True),
    lambda kv: kv.append_tokens([0], 1, num_lookahead=20),
])
@implementations("truncate", "lookahead")
def test_bad_calls_raise_and_change_nothing(impl, call):
    kv = make(impl, 8, 2)
    kv.add_sequence(0, 5)
    kv.add_sequence(1, 2)
    before = (kv.block_table([0, 1]).tolist(), kv.seq_lens([0, 1]).tolist(), kv.num_free_blocks)
    with pytest.raises(Exception):
        call(kv)
    assert (kv.block_table([0, 1]).tolist(), kv.seq_lens([0, 1]).tolist(), kv.num_free_blocks) == before


@implementations("truncate")
def test_issue_49377_a_truncated_block_rewritten_is_never_hit_with_its_old_tokens(impl):
    old = [1, 2, 3, 4, 5, 6, 7, 8]
    kv = make(impl, 8, 4, **CACHING)
    kv.add_sequence(0, token_ids=old)                # blocks 0, 1 registered
    kv.take_events()
    kv.truncate([0], 6)                              # block 1 now partial, held only here
    assert [type(e).__name__ for e in kv.take_events().events] == ["BlockRemoved"]
    kv.append_tokens([0], 2, token_ids=[90, 91])     # block 1: 5, 6, 90, 91
    assert kv.count_cached_tokens(old + [9]) == 4    # block 0 only, never the stale block 1
    result = kv.add_sequence(1, token_ids=old + [9])
    assert result.num_cached_tokens == 4
    assert kv.block_table([1]).tolist()[0][1] != kv.block_table([0]).tolist()[0][1]
    kv.check()


@implementations("truncate")
def test_a_shared_block_keeps_its_hash_and_is_copied_before_the_write(impl):
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    kv = make(impl, 8, 4, **CACHING)
    kv.add_sequence(0, token_ids=tokens)
    kv.fork(0, 1)
    kv.take_events()
    kv.truncate([0], 6)                              # block 1 shared: keeps its hash
    assert kv.take_events().events == [] and kv.num_cached_blocks == 2
    result = kv.append_tokens([0], 1, token_ids=[70])
    assert (result.copy_src.tolist(), result.copy_dst.tolist()) == ([1], [2])
    assert kv.count_cached_tokens(tokens + [9]) == 8
    # Wholly released blocks keep their hashes: a rollback to 0 leaves them cached-free.
    kv.truncate([1], 0)
    assert kv.num_cached_blocks == 2 and kv.count_cached_tokens(tokens + [9]) == 8
    kv.check()


@implementations("truncate")
def test_truncate_into_a_block_whose_sharers_left_drops_its_hash_at_the_next_write(impl):
    # Truncated while shared (hash kept); the sharer leaves; the sole holder's write
    # changes what the block holds, so its hash goes first (docs/PREFIX_CACHING.md).
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    kv = make(impl, 8, 4, **CACHING)
    kv.add_sequence(0, token_ids=tokens)
    kv.fork(0, 1)
    kv.truncate([0], 6)
    kv.free_sequence(1)
    kv.take_events()
    result = kv.append_tokens([0], 1, token_ids=[70])
    assert result.copy_src.tolist() == []
    assert [type(e).__name__ for e in kv.take_events().events] == ["BlockRemoved"]
    assert kv.count_cached_tokens(tokens + [9]) == 4
    kv.check()


@needs_cython("lookahead", "truncate", "admission")
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_random_lookahead_and_rollback_match_the_reference(block_size, caching, seed):
    options = CACHING if caching else {}
    pair = Pair(20, block_size, **options)
    random_workload(pair, np.random.default_rng(seed), 150)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
def test_random_lookahead_and_rollback_keep_the_reference_consistent(block_size):
    pair = Pair(20, block_size, compare=False, **CACHING)
    random_workload(pair, np.random.default_rng(block_size), 250)
