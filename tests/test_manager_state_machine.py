"""Hypothesis drives random add / append / fork / free on the Cython manager and the
pure-Python reference side by side; after every step every observable must agree and
both must pass ``check()``."""

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagetable import KVCacheManager, OutOfBlocksError
from pagetable.reference import ReferenceKVCacheManager

OUT_OF_BLOCKS = OutOfBlocksError


def outcome(call):
    """The call's result as plain data, or the name of the exception it raised."""
    try:
        result = call()
    except OUT_OF_BLOCKS:
        return "OutOfBlocksError"
    except (KeyError, ValueError) as exc:
        return type(exc).__name__
    if result is None:
        return None
    return (result.slots.tolist(), result.copy_src.tolist(), result.copy_dst.tolist())


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.live = []
        self.last_seen = {}

    @initialize(block_size=st.sampled_from([1, 2, 3, 4, 16]), num_blocks=st.integers(1, 40))
    def make(self, block_size, num_blocks):
        self.fast = KVCacheManager(num_blocks, block_size)
        self.ref = ReferenceKVCacheManager(num_blocks, block_size)
        self.block_size = block_size
        self.next_id = 0

    def fresh_id(self):
        # Spread ids out so that the PageTable's hash index sees more than 0, 1, 2, ...
        seq = self.next_id * 1_000_003 + (self.next_id % 3) * 2**40
        self.next_id += 1
        return seq

    def both(self, call):
        fast, ref = outcome(lambda: call(self.fast)), outcome(lambda: call(self.ref))
        assert fast == ref, (fast, ref)
        return fast

    @rule(tokens=st.integers(0, 70))
    def add(self, tokens):
        seq = self.fresh_id()
        if self.both(lambda m: m.add_sequence(seq, tokens)) != "OutOfBlocksError":
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), per_sequence=st.booleans())
    def append(self, data, per_sequence):
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, unique=True))
        if per_sequence:
            counts = data.draw(st.lists(st.integers(0, 20), min_size=len(ids), max_size=len(ids)))
        else:
            counts = data.draw(st.integers(0, 5))
        can = self.fast.can_append(ids, counts)
        assert can == self.ref.can_append(ids, counts)
        result = self.both(lambda m: m.append_tokens(ids, counts))
        assert (result != "OutOfBlocksError") == can

    @precondition(lambda self: self.live)
    @rule()
    def decode_step(self):
        # One token for every live sequence, as an engine's decode step.
        self.both(lambda m: m.append_tokens(self.live, 1))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 4))
    def fork_and_append_together(self, data, count):
        # Parent and child write into their shared last block in the same call:
        # the first copies, the second then owns the block.
        parent = data.draw(st.sampled_from(self.live))
        child = self.fresh_id()
        self.both(lambda m: m.fork(parent, child))
        self.live.append(child)
        order = data.draw(st.permutations([parent, child]))
        can = self.fast.can_append(order, count)
        result = self.both(lambda m: m.append_tokens(order, count))
        assert (result != "OutOfBlocksError") == can

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = self.fresh_id()
        self.both(lambda m: m.fork(parent, child))
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=3, unique=True))
        self.both(lambda m: m.free_sequence(ids if len(ids) > 1 else ids[0]))
        self.live = [s for s in self.live if s not in ids]

    @rule()
    def bad_calls(self):
        # Unknown ids, a repeated id and an existing id: same exception, nothing changes.
        self.both(lambda m: m.append_tokens([self.fresh_id()]))
        if self.live:
            self.both(lambda m: m.append_tokens([self.live[0], self.live[0]]))
            self.both(lambda m: m.add_sequence(self.live[-1], 1))
            self.both(lambda m: m.fork(self.live[0], self.live[-1]))

    @rule(how=st.sampled_from(["pickle", "file", "copy"]))
    def reload(self, how):
        """Carry on with a manager rebuilt from its saved state (validated on load)."""
        import io
        import pickle

        if not hasattr(self, "fast"):
            return
        if how == "pickle":
            self.fast = pickle.loads(pickle.dumps(self.fast))
        elif how == "file":
            buffer = io.BytesIO()
            self.fast.save(buffer)
            buffer.seek(0)
            self.fast = KVCacheManager.load(buffer)
        else:
            self.fast = self.fast.copy()
        self.last_seen = {}     # change stamps start anew in a rebuilt table

    @invariant()
    def agree(self):
        if not hasattr(self, "fast"):
            return
        fast, ref, live = self.fast, self.ref, self.live
        assert fast.num_free_blocks == ref.num_free_blocks
        assert len(fast) == len(ref) == len(live)
        every_block = np.arange(fast.num_blocks)
        assert fast.allocator.refcount(every_block).tolist() == ref.allocator.refcount(every_block).tolist()
        assert fast.allocator._free_blocks().tolist() == ref.allocator._free_stack
        assert fast.seq_lens(live).tolist() == ref.seq_lens(live).tolist()
        assert fast.block_table(live).tolist() == ref.block_table(live).tolist()
        for a, b in zip(fast.flashinfer_layout(live), ref.flashinfer_layout(live)):
            assert a.tolist() == b.tolist()
        fast.check()
        ref.check()
        # Every change to a sequence's blocks goes through the table, so its change
        # stamp moves with it (what device mirrors rely on).
        versions = fast.page_table.versions(live)[0].tolist() if live else []
        table = fast.block_table(live).tolist()
        seen = {}
        for seq, version, row in zip(live, versions, table):
            blocks = tuple(b for b in row if b >= 0)
            old = self.last_seen.get(seq)
            if old is not None and old[0] != blocks:
                assert version != old[1], f"sequence {seq} changed without a new version"
            seen[seq] = (blocks, version)
        self.last_seen = seen

    def teardown(self):
        if hasattr(self, "fast") and self.live:
            self.fast.free_sequence(self.live)
            self.ref.free_sequence(self.live)
            assert self.fast.num_free_blocks == self.fast.num_blocks
            assert self.ref.num_free_blocks == self.ref.num_blocks
            self.fast.check()


ManagerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestManagerMachine = ManagerMachine.TestCase
