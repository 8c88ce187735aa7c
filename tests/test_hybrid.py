"""KV-cache groups: HybridKVCacheManager against its reference, call by call.

The reference hybrid is the same coordinator over reference managers.  Each test runs
on the reference hybrid alone and, once the Cython manager implements the group hooks
of ``docs/HYBRID.md``, on both side by side: every call must give the same answer (or
raise the same exception) and leave every group with the same blocks.  The
hand-computed cases check the contract's figures themselves; the state machine checks
that a call that raises changes nothing in any group, and that the groups stay in step.
"""

import copy
import math

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagetable import (PAD_SLOT_ID, HybridKVCacheManager, HybridResult, KVCacheGroupSpec, KVCacheManager,
                       OutOfBlocksError)
from pagetable.reference import ReferenceHybridKVCacheManager, ReferenceKVCacheManager

HOOKS = ("_hit_mask", "_admission_plan", "_admit", "_append_plan", "_append", "_truncate_check")
REFERENCE_HAS_HOOKS = all(hasattr(ReferenceKVCacheManager, hook) for hook in HOOKS)
CYTHON_HAS_HOOKS = hasattr(KVCacheManager, "_append_plan")

needs_reference = pytest.mark.skipif(not REFERENCE_HAS_HOOKS, reason="reference manager lacks the group hooks")
needs_cython = pytest.mark.skipif(not CYTHON_HAS_HOOKS, reason="Cython manager lacks the group hooks")
# "reference": the reference hybrid alone; "both": the Cython hybrid held against it.
IMPLEMENTATIONS = [pytest.param(False, id="reference", marks=needs_reference),
                   pytest.param(True, id="both", marks=[needs_reference, needs_cython])]

FULL = KVCacheGroupSpec(64, 16)
WINDOW = KVCacheGroupSpec(64, 16, sliding_window=32)


def plain(value):
    """A result as plain data: arrays as lists, AppendResults field by field."""
    if isinstance(value, HybridResult):
        return ("HybridResult", [plain(r) for r in value], value.num_cached_tokens)
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.tolist())
    if hasattr(value, "slots"):
        fields = ("slots", "copy_src", "copy_dst", "num_cached_tokens", "lookahead_slots")
        return tuple(plain(getattr(value, name, None)) for name in fields)
    if hasattr(value, "hit_rate"):
        return (value.requests, value.queries, value.hits, value.evictions)
    if hasattr(value, "events"):
        return [(type(e).__name__, getattr(e, "block_hashes", None), getattr(e, "group_idx", None))
                for e in value.events]
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def described(exc):
    if isinstance(exc, OutOfBlocksError):
        return ("OutOfBlocksError", exc.requested, exc.available)
    return type(exc).__name__


def outcome(call):
    try:
        return plain(call())
    except (OutOfBlocksError, KeyError, ValueError, TypeError, OverflowError, IndexError) as exc:
        return described(exc)


def state(manager):
    """Everything a group shows: its blocks, lengths, free blocks and counters."""
    ids = sorted(manager._seq_ids)
    return [(m.block_table(ids).tolist(), m.seq_lens(ids).tolist(), m.num_free_blocks,
             m.num_cached_blocks, plain(m.prefix_cache_stats)) for m in manager.managers]


class Twin:
    """The reference hybrid and, with ``both``, the Cython one: each call goes to both,
    the answers and the groups' states must agree, and the call gives the reference's
    answer (or raises its exception)."""

    def __init__(self, groups, both, **options):
        self.reference = ReferenceHybridKVCacheManager(groups, **options)
        self.fast = HybridKVCacheManager(groups, **options) if both else None

    def __getattr__(self, name):
        attribute = getattr(self.reference, name)
        if not callable(attribute):
            if self.fast is not None:
                assert plain(getattr(self.fast, name)) == plain(attribute), name
            return attribute

        def call(*args, **kwargs):
            fast = None if self.fast is None else outcome(lambda: getattr(self.fast, name)(*args, **kwargs))
            error = None
            try:
                result = attribute(*args, **kwargs)
            except (OutOfBlocksError, KeyError, ValueError, TypeError, OverflowError, IndexError) as exc:
                error = exc
            if self.fast is not None:
                expected = described(error) if error is not None else plain(result)
                assert fast == expected, f"{name}{args}: pagetable {fast}, the reference {expected}"
                assert state(self.fast) == state(self.reference), f"after {name}{args}"
            if error is not None:
                raise error
            return result
        return call

    def check(self):
        self.reference.check()
        if self.fast is not None:
            self.fast.check()
            assert state(self.fast) == state(self.reference)


# --------------------------------------------------------------------------- specs
def test_group_spec_defaults_and_kind():
    assert KVCacheGroupSpec(8) == KVCacheGroupSpec(8, 16, None, None)
    assert KVCacheGroupSpec(8).kind == "full"
    assert KVCacheGroupSpec(8, sliding_window=4).kind == "sliding_window"
    assert KVCacheGroupSpec(8, attention_chunk=4).kind == "chunked_local"
    assert KVCacheGroupSpec(np.int64(8)).num_blocks == 8 and type(KVCacheGroupSpec(np.int64(8)).num_blocks) is int
    with pytest.raises(AttributeError):
        KVCacheGroupSpec(8).num_blocks = 9


@pytest.mark.parametrize("fields, error, name", [
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(num_blocks=True), TypeError, "num_blocks"),
    (dict(num_blocks=8, block_size=0), ValueError, "block_size"),
    (dict(num_blocks=8, block_size=2.0), TypeError, "block_size"),
    (dict(num_blocks=8, sliding_window=0), ValueError, "sliding_window"),
    (dict(num_blocks=8, attention_chunk=-1), ValueError, "attention_chunk"),
    (dict(num_blocks=8, sliding_window=4, attention_chunk=4), ValueError, "attention_chunk"),
    (dict(num_blocks=2**31), OverflowError, "num_blocks"),
])
def test_group_spec_refuses_bad_fields_by_name(fields, error, name):
    with pytest.raises(error, match=name):
        KVCacheGroupSpec(**fields)


@pytest.mark.parametrize("groups, error", [([], ValueError), (FULL, TypeError), ([FULL, (8, 16)], TypeError)])
def test_coordinator_refuses_bad_groups(groups, error):
    with pytest.raises(error, match="groups"):
        HybridKVCacheManager(groups, manager_class=ReferenceKVCacheManager)


def test_hybrid_result_is_a_tuple_of_group_results():
    from pagetable import AppendResult
    import pickle
    results = [AppendResult([1, 2], [], []), AppendResult([5], [], [])]
    hybrid = HybridResult(results, 32)
    assert len(hybrid) == 2 and hybrid[1] == results[1] and hybrid.num_cached_tokens == 32
    assert pickle.loads(pickle.dumps(hybrid)) == hybrid
    assert hybrid != HybridResult(results, 0)


# ------------------------------------------------------------------ hand-computed cases
@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_window_group_pads_released_blocks_full_group_keeps_them(both):
    kv = Twin([FULL, WINDOW], both)
    kv.add_sequence(0, 100)                       # 7 blocks in each group
    assert kv.num_free_blocks == (57, 57)
    kv.append_tokens([0], 1)
    # The token at position 100 reads from 69 on: window blocks 0..3 go back (69 // 16 = 4).
    full, window = kv.block_table([0], group=0)[0], kv.block_table([0], group=1)[0]
    assert (full != PAD_SLOT_ID).all() and full.size == 7
    assert window[:4].tolist() == [PAD_SLOT_ID] * 4 and (window[4:] != PAD_SLOT_ID).all()
    assert kv.num_free_blocks == (57, 61)
    assert kv.seq_lens([0]).tolist() == [101]
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_second_prompt_sharing_a_prefix_gets_the_hit_every_group_serves(both):
    kv = Twin([FULL, WINDOW], both, enable_prefix_caching=True)
    first = np.arange(100, dtype=np.int64)
    second = np.concatenate([first[:96], 5000 + np.arange(10)])
    kv.add_sequence(0, token_ids=first)
    assert kv.count_cached_tokens(second) == 96
    result = kv.add_sequence(1, token_ids=second)
    assert result.num_cached_tokens == 96
    assert [r.slots.size for r in result] == [10, 10]
    assert [r.num_cached_tokens for r in result] == [96, 96]
    full0, full1 = kv.block_table([0, 1], group=0)
    assert full1[:6].tolist() == full0[:6].tolist()
    window0, window1 = kv.block_table([0, 1], group=1)
    # A hit of 6 blocks needs window blocks 4 and 5 only (position 96 reads from 65 on).
    assert window1[:4].tolist() == [PAD_SLOT_ID] * 4 and window1[4:6].tolist() == window0[4:6].tolist()
    assert [s.hits for s in kv.prefix_cache_stats] == [96, 96]
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_window_group_out_of_blocks_fails_the_whole_call(both):
    kv = Twin([FULL, KVCacheGroupSpec(8, 16, sliding_window=32)], both)
    kv.add_sequence(0, 100)
    before = state(kv.reference)
    with pytest.raises(OutOfBlocksError) as caught:
        kv.add_sequence(1, 40)                    # 3 window blocks, 1 free
    assert (caught.value.requested, caught.value.available) == (3, 1)
    with pytest.raises(OutOfBlocksError) as caught:
        # 13 - 7 = 6 new window blocks; 1 free plus the 4 the window would release.
        kv.append_tokens([0], 100)
    assert (caught.value.requested, caught.value.available) == (6, 5)
    assert not kv.can_append([0], 100) and kv.can_append([0], 20)
    assert 1 not in kv.reference and len(kv.reference) == 1
    assert state(kv.reference) == before          # the full group, which had room, unchanged too
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_block_sizes_16_and_32_hit_a_multiple_of_32(both):
    kv = Twin([KVCacheGroupSpec(64, 16), KVCacheGroupSpec(64, 32)], both, enable_prefix_caching=True)
    first = np.arange(100, dtype=np.int64)
    second = np.concatenate([first[:80], 7000 + np.arange(20)])
    kv.add_sequence(0, token_ids=first)
    assert kv.reference.managers[0].count_cached_tokens(second) == 80    # 16-token group alone
    assert kv.count_cached_tokens(second) == 64
    result = kv.add_sequence(1, token_ids=second)
    assert result.num_cached_tokens == 64 and [r.slots.size for r in result] == [36, 36]
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_rollback_refused_by_the_window_changes_no_group(both):
    kv = Twin([FULL, WINDOW], both)
    kv.add_sequence(0, 100)
    kv.append_tokens([0], 1)                      # window blocks 0..3 released
    before = state(kv.reference)
    with pytest.raises(ValueError):
        kv.rollback([0], 50)                      # length 51 reads from 20: block 1, given back
    assert state(kv.reference) == before
    kv.rollback([0], 1)                           # length 100 reads from 69: block 4, still held
    assert kv.seq_lens([0]).tolist() == [100]
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_speculative_step_append_then_rollback(both):
    kv = Twin([FULL, WINDOW], both)
    kv.add_sequence(0, 30)
    result = kv.append_tokens([0], 1, num_lookahead=3)
    if hasattr(result[0], "lookahead_slots"):
        assert [r.lookahead_slots.size for r in result] == [3, 3]
    kv.append_tokens([0], 4)                      # 1 + 3 drafts
    kv.rollback([0], 2)                           # 2 rejected
    assert kv.seq_lens([0]).tolist() == [33]
    kv.check()


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_events_merge_group_by_group(both):
    kv = Twin([FULL, WINDOW], both, enable_prefix_caching=True, enable_kv_cache_events=True)
    kv.add_sequence(0, token_ids=np.arange(40, dtype=np.int64))
    batch = kv.reference.take_events() if kv.fast is None else kv.take_events()
    groups = [getattr(e, "group_idx", None) for e in batch.events]
    assert groups == sorted(groups) and set(groups) == {0, 1}


@pytest.mark.parametrize("both", IMPLEMENTATIONS)
def test_fork_free_reset_and_copy(both):
    kv = Twin([FULL, WINDOW], both)
    kv.add_sequence(0, 50)
    kv.fork(0, 1)
    with pytest.raises(ValueError):
        kv.fork(0, 1)
    with pytest.raises(KeyError):
        kv.free_sequence([1, 99])
    assert len(kv.reference) == 2 and 1 in kv.reference
    clone = copy.copy(kv.reference)
    kv.free_sequence([0, 1])
    assert kv.num_free_blocks == (64, 64) and len(clone) == 2
    clone.check()
    clone.reset()
    assert len(clone) == 0 and clone.num_free_blocks == (64, 64)
    kv.check()


# ------------------------------------------------------------------------ state machine
PREFIXES = [list(range(1, 41)), list(range(100, 124))]


class HybridMachine(RuleBasedStateMachine):
    """Random calls on a random set of groups; after each: check(), and a call that
    raised changed nothing in any group."""

    BOTH = False

    @initialize(
        sizes=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3),
        kinds=st.lists(st.sampled_from(["full", "window", "chunk"]), min_size=3, max_size=3),
        extents=st.lists(st.integers(1, 9), min_size=3, max_size=3),
        blocks=st.lists(st.integers(4, 24), min_size=3, max_size=3),
        caching=st.booleans(),
    )
    def make(self, sizes, kinds, extents, blocks, caching):
        groups = []
        for size, kind, extent, num_blocks in zip(sizes, kinds, extents, blocks):
            groups.append(KVCacheGroupSpec(num_blocks, size, sliding_window=extent if kind == "window" else None,
                                           attention_chunk=extent if kind == "chunk" else None))
        self.unit = math.lcm(*sizes)
        self.caching = caching
        self.kv = Twin(groups, self.BOTH, enable_prefix_caching=caching)
        self.tokens = {}                          # seq id -> its token ids
        self.next_id = 0

    def attempt(self, name, *args, **kwargs):
        """The call; if it raises, every group must be as it was."""
        before = state(self.kv.reference)
        try:
            return getattr(self.kv, name)(*args, **kwargs)
        except (OutOfBlocksError, ValueError):
            assert state(self.kv.reference) == before, f"{name}{args} raised and changed a group"
            return None

    def prompt(self, data):
        head = data.draw(st.sampled_from(PREFIXES + [[]]))
        cut = data.draw(st.integers(0, len(head)))
        tail = data.draw(st.lists(st.integers(0, 999), max_size=12))
        return head[:cut] + tail

    @rule(data=st.data())
    def add(self, data):
        ids = [self.next_id + i for i in range(data.draw(st.integers(1, 2)))]
        prompts = [self.prompt(data) for _ in ids]
        if self.caching:
            results = self.attempt("add_sequences", ids, token_ids=[np.array(p, dtype=np.int64) for p in prompts])
        else:
            results = self.attempt("add_sequences", ids, [len(p) for p in prompts])
        self.next_id += len(ids)
        if results is None:
            return
        for s, p, result in zip(ids, prompts, results):
            self.tokens[s] = p
            cached = result.num_cached_tokens
            assert cached % self.unit == 0 and (cached == 0 or cached <= len(p) - 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=3, unique=True))
        counts = data.draw(st.lists(st.integers(0, 5), min_size=len(ids), max_size=len(ids)))
        lookahead = data.draw(st.integers(0, 3))
        new = [data.draw(st.lists(st.integers(0, 999), min_size=c, max_size=c)) for c in counts]
        token_ids = np.array([t for n in new for t in n], dtype=np.int64) if self.caching else None
        if self.attempt("append_tokens", ids, counts, token_ids=token_ids, num_lookahead=lookahead) is not None:
            for s, n in zip(ids, new):
                self.tokens[s] = self.tokens[s] + n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def rollback(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        rejected = data.draw(st.integers(0, min(4, len(self.tokens[seq]))))
        before = state(self.kv.reference)
        try:
            self.kv.rollback([seq], rejected)
        except ValueError:
            assert state(self.kv.reference) == before
            return
        self.tokens[seq] = self.tokens[seq][:len(self.tokens[seq]) - rejected]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.fork(parent, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[parent])
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=2, unique=True))
        self.kv.free_sequence(ids)
        for s in ids:
            del self.tokens[s]

    @precondition(lambda self: self.caching)
    @rule()
    def reset_prefix_cache(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def in_step(self):
        if hasattr(self, "kv"):
            self.kv.check()
            ids = sorted(self.tokens)
            assert len(self.kv.reference) == len(ids)
            assert self.kv.reference.seq_lens(ids).tolist() == [len(self.tokens[s]) for s in ids]


class BothMachine(HybridMachine):
    BOTH = True


TestHybridReference = needs_reference(HybridMachine.TestCase)
TestHybridAgainstReference = needs_cython(needs_reference(BothMachine.TestCase))
TestHybridReference.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestHybridAgainstReference.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
