"""Hypothesis drives prefix caching on the Cython manager and the reference side by side.

Prompts are drawn from a few shared prefixes with random suffixes (some with extra
keys), so that hits, misses, duplicates and evictions all happen; sequences grow,
fork, are freed, and the cache is reset.  After every call both managers must give
the same answer (or raise the same exception), hold the same blocks, report the same
events and counters, and pass ``check()``.

The machine also keeps its own account, independent of either manager:

- a simulated KV memory, ``slot -> token id``, written as an engine would (each
  call's copy-on-write copies first, then its new tokens at the slots returned);
  every position of every live sequence must read back its own token through the
  block table.  A wrong hit, a block reused while still shared, or a copy that
  lost tokens shows here;
- the set of hashes a KV-aware router holds from the events alone, whose size must
  be ``num_cached_blocks``;
- the statistics, counted from the results and events.

The account holds either manager to the contract on its own, so the machine is
meaningful even where both agree.
"""

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pagetable
from pagetable import KVCacheManager, OutOfBlocksError
from pagetable.prefix import ExtraKeys
from pagetable.reference import ReferenceKVCacheManager

from side_by_side import cython_lacks, event_data

TOKEN_ID_MAX = 2**31 - 1
# docs/HYBRID.md rules run only once the Cython manager has them (both managers are
# compared after every step).
HAS_ADMISSION = cython_lacks("admission") is None
HAS_TRUNCATE = cython_lacks("truncate") is None
HAS_LOOKAHEAD = cython_lacks("lookahead") is None


def outcome(call):
    """The call's result as plain data, or the name of the exception it raised."""
    try:
        result = call()
    except OutOfBlocksError as exc:
        return ("OutOfBlocksError", exc.requested, exc.available)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        return type(exc).__name__
    if result is None or isinstance(result, (int, np.integer)):
        return result
    if isinstance(result, (list, pagetable.AdmissionResult)):
        return [outcome(lambda r=r: r) for r in result]
    plain = (result.slots.tolist(), result.copy_src.tolist(), result.copy_dst.tolist())
    if hasattr(result, "num_cached_tokens"):
        plain += (result.num_cached_tokens,)
    if hasattr(result, "lookahead_slots"):
        plain += (result.lookahead_slots.tolist(),)
    return plain




def stats_data(manager):
    s = manager.prefix_cache_stats
    return (s.requests, s.queries, s.hits, s.evictions, s.hit_rate)


class PrefixMachine(RuleBasedStateMachine):
    window_options = st.just({})

    @initialize(
        block_size=st.sampled_from([1, 2, 3, 4, 8]),
        num_blocks=st.integers(3, 32),
        algorithm=st.sampled_from(["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]),
        seeded=st.booleans(),
        event_hash_format=st.sampled_from(["int", "bytes"]),
        medium=st.sampled_from(["GPU", "CPU"]),
        rank=st.sampled_from([None, 0, 2]),
        data=st.data(),
    )
    def make(self, block_size, num_blocks, algorithm, seeded, event_hash_format, medium, rank, data):
        window = data.draw(self.window_options, label="window")
        # The xxhash algorithms draw a random seed per implementation without one.
        seed = "machine" if seeded or algorithm.startswith("xxhash") else None
        options = dict(enable_prefix_caching=True, enable_kv_cache_events=True,
                       hash_algorithm=algorithm, hash_seed=seed,
                       event_hash_format=event_hash_format, medium=medium,
                       data_parallel_rank=rank, **window)
        self.group = window.get("group_idx", 0)
        self.truncated = False    # a truncate may leave hashes for a later append to drop
        self.medium, self.rank = medium, rank
        self.ref = ReferenceKVCacheManager(num_blocks, block_size, **options)
        self.fast = KVCacheManager(num_blocks, block_size, **options)
        self.B = block_size
        # Shared prefixes: a system prompt of a few blocks, a longer one that extends
        # it, and one unrelated; suffix tokens come from a small alphabet so that
        # suffixes repeat too.
        system = data.draw(st.lists(st.integers(0, 1000), min_size=2 * block_size,
                                    max_size=3 * block_size + 1), label="system")
        longer = system + data.draw(st.lists(st.integers(0, 1000), min_size=block_size,
                                             max_size=2 * block_size), label="longer")
        other = data.draw(st.lists(st.integers(0, 1000), min_size=1, max_size=2 * block_size),
                          label="other")
        self.prefixes = [[], system, longer, other]
        self.keys = [None, None,
                     ExtraKeys(lora_name="adapter", lora_path="/adapters/a", lora_id=3),
                     ExtraKeys(cache_salt="tenant"),
                     ExtraKeys(mm=(("image", block_size // 2, block_size + 1),))]
        self.live = []
        self.tokens = {}          # the machine's own token list of every live sequence
        self.keys_of = {}
        self.memory = {}          # simulated KV memory: slot -> token id
        self.router = set()       # the hashes the events say are cached
        self.counted = [0, 0, 0, 0]   # requests, queries, hits, evictions
        self.history = []         # every prompt added, with its keys
        self.next_id = 0

    # -- helpers ----------------------------------------------------------------------
    def fresh_id(self):
        seq = self.next_id * 7919 + (self.next_id % 2) * 2**33
        self.next_id += 1
        return seq

    def managers(self):
        return [self.ref, self.fast]

    def both(self, call):
        """Run ``call`` on each manager; the outcomes must agree; the events it
        recorded are compared and fed to the router's account."""
        evictions = self.ref.prefix_cache_stats.evictions
        results = [outcome(lambda m=m: call(m)) for m in self.managers()]
        batches = [m.take_events() for m in self.managers()]
        events = [[event_data(e) for e in batch.events] for batch in batches]
        assert results[1] == results[0], ("fast", results[1], "reference", results[0])
        assert events[1] == events[0], ("fast", events[1], "reference", events[0])
        assert batches[0].data_parallel_rank == batches[1].data_parallel_rank == self.rank
        # Hashes dropped (truncate, or a write into a block truncated while shared)
        # come before the call's take; they are not evictions.
        removed = sum(1 for e in events[0] if e[0] == "BlockRemoved")
        drops = removed - (self.ref.prefix_cache_stats.evictions - evictions)
        assert drops == 0 or self.truncated, "a hash dropped without a truncate"
        self.follow(events[0], drops=drops)
        return results[0]

    def follow(self, events, one_add=True, drops=0):
        """The router's view: stored hashes in, removed ones out; within one add or
        append every eviction comes before every store."""
        stored_yet = False
        for event in events:
            if event[0] == "BlockStored":
                stored_yet = True
                hashes = event[1]
                assert len(event[3]) == len(hashes) * self.B and event[4] == self.B
                assert event[6] == self.medium and event[9] == self.group
                for h in hashes:
                    assert h not in self.router, f"hash {h!r} stored twice"
                    self.router.add(h)
            elif event[0] == "BlockRemoved":
                assert not (one_add and stored_yet), "an eviction after a store in one call"
                assert event[2] == self.medium and event[3] == self.group
                assert len(event[1]) == 1 and event[1][0] in self.router
                self.router.discard(event[1][0])
                if drops:
                    drops -= 1
                else:
                    self.counted[3] += 1
            else:
                self.router.clear()

    def write(self, slots, token_ids, copy_src=(), copy_dst=()):
        """What the engine does with a result: copy first, then write."""
        for src, dst in zip(copy_src, copy_dst):
            for offset in range(self.B):
                source = src * self.B + offset
                if source in self.memory:
                    self.memory[dst * self.B + offset] = self.memory[source]
                else:
                    self.memory.pop(dst * self.B + offset, None)
        assert len(slots) == len(token_ids)
        for slot, token in zip(slots, token_ids):
            self.memory[slot] = token

    def slots_of(self, seq, start, stop):
        row = self.ref.block_table([seq])[0]
        return [int(row[p // self.B]) * self.B + p % self.B for p in range(start, stop)]

    def unchanged(self):
        """What a call that raises, or a query, must leave as it was."""
        return [(m.num_free_blocks, m.num_cached_blocks, stats_data(m),
                 m.block_table(self.live).tolist(), m.seq_lens(self.live).tolist())
                for m in self.managers()]

    def cap(self, n):
        return ((n - 1) // self.B if n else 0) * self.B

    prompts = st.tuples(st.integers(0, 3), st.lists(st.integers(0, 3), max_size=9),
                        st.integers(0, 4), st.integers(0, 12))

    def prompt(self, drawn):
        prefix, suffix, keys, cut = drawn
        tokens = self.prefixes[prefix] + suffix
        if prefix and cut < len(tokens) and cut % 3 == 0:
            tokens = tokens[:len(tokens) - cut]     # a prefix of a prefix, now and then
        return tokens, self.keys[keys]

    # -- rules ------------------------------------------------------------------------
    @rule(drawn=prompts, give_count=st.booleans())
    def add(self, drawn, give_count):
        tokens, keys = self.prompt(drawn)
        self.add_prompt(tokens, keys, give_count)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), give_count=st.booleans())
    def add_again(self, data, give_count):
        # A prompt seen before (its sequence may be live, freed or evicted), cut or
        # extended: hits, revivals of cached-free blocks and duplicates.
        tokens, keys = data.draw(st.sampled_from(self.history))
        cut = data.draw(st.integers(0, len(tokens)))
        more = data.draw(st.lists(st.integers(0, 3), max_size=self.B + 1))
        self.add_prompt(tokens[:cut] + more if data.draw(st.booleans()) else tokens, keys, give_count)

    @precondition(lambda self: HAS_ADMISSION)
    @rule(drawn=st.lists(prompts, min_size=1, max_size=3))
    def add_batch(self, drawn):
        # A scheduler's admission of several prompts in one call: in order, a later one
        # hitting what an earlier one registered; all or none (docs/HYBRID.md).
        prompts = [self.prompt(d) for d in drawn]
        seqs = [self.fresh_id() for _ in prompts]
        before = self.unchanged()
        calls = []
        for m in self.managers():
            calls.append(outcome(lambda m=m: m.add_sequences(
                seqs, token_ids=[t for t, _ in prompts], extra_keys=[k for _, k in prompts])))
        batches = [m.take_events() for m in self.managers()]
        events = [[event_data(e) for e in batch.events] for batch in batches]
        assert calls[1] == calls[0], ("fast", calls[1], "reference", calls[0])
        assert events[1] == events[0], ("fast", events[1], "reference", events[0])
        if not isinstance(calls[0], list):
            assert events[0] == [] and self.unchanged() == before
            assert all(seq not in self.ref for seq in seqs)
            self.preempt()
            return
        plain = calls[0]
        self.follow(events[0], one_add=False)    # one add's evictions may follow another's stores
        for seq, (tokens, keys), (slots, copy_src, copy_dst, cached, *_) in zip(seqs, prompts, plain):
            assert cached % self.B == 0 and cached <= self.cap(len(tokens)) and copy_src == []
            assert slots == self.slots_of(seq, cached, len(tokens))
            self.admitted(seq, tokens, keys, slots, cached)

    def admitted(self, seq, tokens, keys, slots, cached):
        self.write(slots, tokens[cached:])
        self.live.append(seq)
        self.tokens[seq] = list(tokens)
        self.keys_of[seq] = keys
        self.history.append((list(tokens), keys))
        self.counted[0] += 1
        self.counted[1] += len(tokens)
        self.counted[2] += cached

    def add_prompt(self, tokens, keys, give_count):
        seq = self.fresh_id()
        expected = self.both(lambda m: m.count_cached_tokens(tokens, keys))
        before = self.unchanged()
        count = len(tokens) if give_count else None
        result = self.both(lambda m: m.add_sequence(seq, count, token_ids=tokens, extra_keys=keys))
        if isinstance(result, tuple) and result[0] == "OutOfBlocksError":
            assert self.unchanged() == before
            self.preempt()
            return
        slots, copy_src, copy_dst, cached = result[:4]
        assert cached == expected and cached % self.B == 0 and cached <= self.cap(len(tokens))
        assert copy_src == copy_dst == []
        assert slots == self.slots_of(seq, cached, len(tokens))
        self.admitted(seq, tokens, keys, slots, cached)
        # Right after the add every full block's hash is in the map (its own block's,
        # or a duplicate's): the whole prompt up to the cap is a hit now.
        full = len(tokens) // self.B * self.B
        assert self.both(lambda m: m.count_cached_tokens(tokens, keys)) == min(full, self.cap(len(tokens)))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), per_sequence=st.booleans())
    def append(self, data, per_sequence):
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=4, unique=True))
        if per_sequence:
            counts = data.draw(st.lists(st.integers(0, 2 * self.B + 1), min_size=len(ids),
                                        max_size=len(ids)))
        else:
            counts = [data.draw(st.integers(0, 3))] * len(ids)
        new = [data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)) for k in counts]
        flat = [t for tokens in new for t in tokens]
        argument = counts if per_sequence else counts[0]
        can = [m.can_append(ids, argument) for m in self.managers()]
        assert len(set(can)) == 1
        before = self.unchanged()
        result = self.both(lambda m: m.append_tokens(ids, argument, token_ids=flat))
        if isinstance(result, tuple) and result[0] == "OutOfBlocksError":
            assert not can[0] and self.unchanged() == before
            self.preempt()
            return
        assert can[0]
        slots, copy_src, copy_dst = result[:3]
        expected_slots = []
        for s, k in zip(ids, counts):
            n = len(self.tokens[s])
            expected_slots += self.slots_of(s, n, n + k)
        assert slots == expected_slots
        self.write(slots, flat, copy_src, copy_dst)
        for s, tokens in zip(ids, new):
            self.tokens[s] += tokens

    @precondition(lambda self: self.live)
    @rule()
    def decode_step(self):
        # One token for every live sequence, as an engine's decode step: token 0..3
        # chosen by position, so that forks decoding in step often fill equal blocks.
        flat = [len(self.tokens[s]) % 4 for s in self.live]
        result = self.both(lambda m: m.append_tokens(self.live, 1, token_ids=flat))
        if isinstance(result, tuple) and result[0] == "OutOfBlocksError":
            self.preempt()
            return
        self.write(result[0], flat, result[1], result[2])
        for s, t in zip(self.live, flat):
            self.tokens[s].append(t)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 5))
    def fork_and_append_together(self, data, count):
        # Parent and child write into their shared last block in one call: the first
        # copies it, the second then owns it; equal tokens make equal hashes.
        parent = data.draw(st.sampled_from(self.live))
        child = self.fresh_id()
        assert self.both(lambda m: m.fork(parent, child)) is None
        self.live.append(child)
        self.tokens[child] = list(self.tokens[parent])
        self.keys_of[child] = self.keys_of[parent]
        order = data.draw(st.permutations([parent, child]))
        same = data.draw(st.booleans())
        first = data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        second = first if same else data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        result = self.both(lambda m: m.append_tokens(order, count, token_ids=first + second))
        if isinstance(result, tuple) and result[0] == "OutOfBlocksError":
            return
        self.write(result[0], first + second, result[1], result[2])
        self.tokens[order[0]] += first
        self.tokens[order[1]] += second

    @precondition(lambda self: self.live and HAS_LOOKAHEAD)
    @rule(data=st.data(), lookahead=st.integers(0, 6))
    def append_with_lookahead(self, data, lookahead):
        # A speculative step: committed tokens, then K reserved positions whose slots
        # the engine fills with draft KV (here: a marker no committed token equals).
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=3, unique=True))
        counts = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids)))
        new = [data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)) for k in counts]
        flat = [t for tokens in new for t in tokens]
        before = self.unchanged()
        result = self.both(lambda m: m.append_tokens(ids, counts, token_ids=flat, num_lookahead=lookahead))
        if isinstance(result, tuple) and result[0] == "OutOfBlocksError":
            assert self.unchanged() == before
            self.preempt()
            return
        slots, copy_src, copy_dst = result[:3]
        expected_slots, expected_lookahead = [], []
        for s, k in zip(ids, counts):
            n = len(self.tokens[s])
            expected_slots += self.slots_of(s, n, n + k)
            expected_lookahead += self.slots_of(s, n + k, n + k + lookahead)
        assert slots == expected_slots
        self.write(slots, flat, copy_src, copy_dst)
        if len(result) > 4:         # HAS_LOOKAHEAD implies it; a stand-in may lack it
            assert result[4] == expected_lookahead
            self.write(result[4], [-7] * len(result[4]))
        for s, tokens in zip(ids, new):
            self.tokens[s] += tokens

    @precondition(lambda self: self.live and HAS_TRUNCATE)
    @rule(data=st.data(), rollback=st.booleans())
    def shrink(self, data, rollback):
        # Rejected drafts rolled back, or a sequence cut to a length (docs/HYBRID.md).
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=2, unique=True))
        counts = [data.draw(st.integers(0, len(self.tokens[s]) + 1)) for s in ids]
        before = self.unchanged()
        self.truncated = True
        name = "rollback" if rollback else "truncate"
        result = self.both(lambda m: getattr(m, name)(ids, counts))
        if isinstance(result, str):
            assert self.unchanged() == before
            return
        assert result is None
        for s, k in zip(ids, counts):
            self.tokens[s] = self.tokens[s][:len(self.tokens[s]) - k if rollback else k]

    def preempt(self):
        """What a scheduler does when the pool is full: free the oldest sequence."""
        if self.live:
            oldest = self.live[0]
            assert self.both(lambda m: m.free_sequence(oldest)) is None
            self.live.remove(oldest)
            del self.tokens[oldest], self.keys_of[oldest]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = self.fresh_id()
        assert self.both(lambda m: m.fork(parent, child)) is None
        self.live.append(child)
        self.tokens[child] = list(self.tokens[parent])
        self.keys_of[child] = self.keys_of[parent]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=3, unique=True))
        free_before = self.ref.num_free_blocks
        assert self.both(lambda m: m.free_sequence(ids if len(ids) > 1 else ids[0])) is None
        released = self.ref.num_free_blocks - free_before
        for s in ids:
            self.live.remove(s)
            del self.tokens[s], self.keys_of[s]
        # Blocks no longer referenced by any live sequence are exactly those released.
        held = {b for row in self.ref.block_table(self.live).tolist() for b in row if b >= 0}
        assert self.ref.num_blocks - self.ref.num_free_blocks == len(held)
        assert released >= 0

    @rule(drawn=prompts, what=st.sampled_from(["count", "count", "count", "reset"]))
    def count_or_reset(self, drawn, what):
        if what == "reset":
            cached = self.ref.num_cached_blocks
            free = self.ref.num_free_blocks
            assert self.both(lambda m: m.reset_prefix_cache()) == cached
            assert self.ref.num_cached_blocks == 0 and self.ref.num_free_blocks == free
            assert not self.router
            return
        tokens, keys = self.prompt(drawn)
        before = self.unchanged()
        found = self.both(lambda m: m.count_cached_tokens(tokens, keys))
        assert found % self.B == 0 and found <= self.cap(len(tokens))
        assert self.unchanged() == before

    @rule(which=st.integers(0, 7), bad=st.sampled_from([-1, TOKEN_ID_MAX + 1]))
    def bad_call(self, which, bad):
        # Bad token ids, a missing or short token_ids, an existing id: the same
        # exception from both, and nothing changes.
        before = self.unchanged()
        seq = self.fresh_id()
        live = self.live[0] if self.live else None
        calls = [
            lambda m: m.add_sequence(seq, token_ids=[1, bad]),
            lambda m: m.add_sequence(seq, 3),
            lambda m: m.add_sequence(seq, 3, token_ids=[1, 2]),
            lambda m: m.count_cached_tokens([bad]),
        ]
        if live is not None:
            calls += [
                lambda m: m.add_sequence(live, token_ids=[1]),
                lambda m: m.append_tokens([live], 1),
                lambda m: m.append_tokens([live], 2, token_ids=[1]),
                lambda m: m.append_tokens([live], 1, token_ids=[bad]),
            ]
        assert isinstance(self.both(calls[which % len(calls)]), str)
        assert self.unchanged() == before

    @rule(how=st.sampled_from(["pickle", "file", "copy"]))
    def reload(self, how):
        """Carry on with a Cython manager rebuilt from its saved state: the cache, the
        LRU order, the sequences' tokens and hashes, the counters all come back."""
        import io
        import pickle

        if how == "pickle":
            self.fast = pickle.loads(pickle.dumps(self.fast))
        elif how == "file":
            buffer = io.BytesIO()
            self.fast.save(buffer)
            buffer.seek(0)
            self.fast = KVCacheManager.load(buffer)
        else:
            self.fast = self.fast.copy()
        assert self.fast.take_events().events == []

    # -- after every step -------------------------------------------------------------
    @invariant()
    def agree(self):
        if not hasattr(self, "ref"):
            return
        ref, live = self.ref, self.live
        B = self.B
        for m in self.managers():
            m.check()
        assert ref.num_cached_blocks == len(self.router)
        assert stats_data(ref)[:4] == tuple(self.counted)
        assert len(ref) == len(live)
        table = ref.block_table(live).tolist()
        for seq, row in zip(live, table):
            tokens = self.tokens[seq]
            assert ref.sequence_tokens(seq) == tokens
            # Through the block table, every position of a held block reads its own
            # token back (released blocks are PAD_SLOT_ID, never read).
            for p, token in enumerate(tokens):
                if row[p // B] >= 0:
                    assert self.memory.get(row[p // B] * B + p % B) == token, (seq, p)
            # And the reference's record of each block says the same (a partial block
            # truncated while shared may hold more than this sequence's tokens).
            for j in range(-(-len(tokens) // B)):
                if row[j] >= 0:
                    mine = tokens[j * B:(j + 1) * B]
                    assert ref.block_tokens(row[j])[:len(mine)] == mine
        fast = self.fast
        assert fast.num_free_blocks == ref.num_free_blocks
        assert fast.num_cached_blocks == ref.num_cached_blocks
        assert stats_data(fast) == stats_data(ref)
        assert len(fast) == len(ref)
        assert fast.seq_lens(live).tolist() == ref.seq_lens(live).tolist()
        assert fast.block_table(live).tolist() == table
        every_block = np.arange(ref.num_blocks)
        assert fast.allocator.refcount(every_block).tolist() == ref.allocator.refcount(every_block).tolist()
        assert fast.allocator._free_blocks().tolist() == ref.allocator._free_stack
        # The hash the Cython manager records for what a block holds: a registered
        # block's hash, and for a full block of a live sequence its content hash.
        content = dict(ref._registered)
        for seq, row in zip(live, table):
            for j in range(len(self.tokens[seq]) // B):
                if row[j] >= 0:
                    content[row[j]] = ref._hashes[seq][j]
        assert {b: fast._block_hash(b) for b in content} == content

    def teardown(self):
        if not hasattr(self, "ref"):
            return
        if self.live:
            self.both(lambda m: m.free_sequence(self.live))
        for m in self.managers():
            assert m.num_free_blocks == m.num_blocks
            m.check()


PrefixMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPrefixMachine = PrefixMachine.TestCase


class WindowedPrefixMachine(PrefixMachine):
    """The same machine with a sliding window or chunked-local attention and a group
    index: released blocks, windowed hits, the chain past released blocks."""

    window_options = st.one_of(
        st.fixed_dictionaries({"sliding_window": st.integers(1, 9), "group_idx": st.integers(0, 3)}),
        st.fixed_dictionaries({"attention_chunk": st.integers(1, 9), "group_idx": st.integers(0, 3)}),
    )


WindowedPrefixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestWindowedPrefixMachine = pytest.mark.skipif(
    cython_lacks("windows") is not None, reason=f"Cython manager lacks {cython_lacks('windows')}"
)(WindowedPrefixMachine.TestCase)



# The machine's findings, each cut down to its smallest case: the Cython manager must
# give what the contract (and the reference) gives.
def side_by_side(steps):
    """The outcome of the last step on each manager after the steps before it."""
    answers = []
    for make in (lambda: ReferenceKVCacheManager(3, 4, enable_prefix_caching=True),
                 lambda: KVCacheManager(3, 4, enable_prefix_caching=True)):
        m = make()
        for step in steps[:-1]:
            step(m)
        answers.append(outcome(lambda: steps[-1](m)))
    return answers


def test_an_append_that_does_not_fit_raises_out_of_blocks_with_token_ids():
    # Six blocks for 21 tokens, one held, two free: OutOfBlocksError(5, 2), as without
    # caching, not a complaint about the token ids' count.
    reference, fast = side_by_side([
        lambda m: m.add_sequence(0, token_ids=[5]),
        lambda m: m.append_tokens([0], 20, token_ids=[0] * 20),
    ])
    assert reference == ("OutOfBlocksError", 5, 2)
    assert fast == reference


def test_out_of_blocks_on_a_cached_free_hit_reports_need_and_available_after_the_hit():
    # Blocks 0, 1 cached-free, block 2 held by sequence 1: a 13-token prompt hits
    # blocks 0 and 1 and needs 2 more, and the hits take both free blocks: the
    # contract's step 3 gives need = 4 - 2 = 2 and available = 2 - 2 = 0.
    reference, fast = side_by_side([
        lambda m: m.add_sequence(0, token_ids=list(range(8))),
        lambda m: m.add_sequence(1, token_ids=[9]),
        lambda m: m.free_sequence(0),
        lambda m: m.add_sequence(2, token_ids=list(range(8)) + [1, 2, 3, 4, 5]),
    ])
    assert reference == ("OutOfBlocksError", 2, 0)
    assert fast == reference
