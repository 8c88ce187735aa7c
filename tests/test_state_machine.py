"""A hypothesis state machine drives the Cython table and the reference side by side."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagetable import PAD_SLOT_ID, PageTable
from pagetable.reference import ReferencePageTable

# A small id space makes collisions, re-use and removal of live ids likely.
seq_ids = st.one_of(st.integers(0, 12), st.integers(0, 2**63 - 1))
block_ids = st.integers(0, 2**31 - 1)


class PageTableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.block_size = None
        self.pt = None
        self.ref = None
        self.seen = {}   # seq -> (version, rewrite_version, blocks) at the last check
        self.hints = {}  # seq -> row, as rows() gave it once; goes stale on purpose

    @precondition(lambda self: self.pt is None)
    @rule(block_size=st.sampled_from([1, 2, 3, 16, 17, 64]))
    def create(self, block_size):
        self.block_size = block_size
        self.pt = PageTable(block_size)
        self.ref = ReferencePageTable(block_size)

    def known(self):
        return list(self.ref.sequences)

    @precondition(lambda self: self.pt is not None)
    @rule(seq=seq_ids, block=block_ids)
    def append_block(self, seq, block):
        self.pt.append_block(seq, block)
        self.ref.append_block(seq, block)

    @precondition(lambda self: self.pt is not None)
    @rule(pairs=st.lists(st.tuples(seq_ids, block_ids), max_size=40))
    def append_blocks(self, pairs):
        seqs = [s for s, _ in pairs]
        blocks = [b for _, b in pairs]
        self.pt.append_blocks(seqs, blocks)
        self.ref.append_blocks(seqs, blocks)

    @precondition(lambda self: self.pt is not None)
    @rule(pairs=st.lists(st.tuples(seq_ids, st.integers(-(2**31), 2**32)), min_size=1, max_size=10))
    def append_blocks_with_a_bad_block(self, pairs):
        seqs = [s for s, _ in pairs]
        blocks = [b for _, b in pairs]
        if all(0 <= b <= 2**31 - 1 for b in blocks):
            blocks[-1] = -1
        try:
            self.pt.append_blocks(seqs, blocks)
        except (ValueError, OverflowError):
            pass
        else:
            raise AssertionError("a bad block id was accepted")

    @precondition(lambda self: self.pt is not None)
    @rule(seq=seq_ids)
    def remove(self, seq):
        got = self.pt.remove_sequence(seq)
        expected = self.ref.remove_sequence(seq)
        if expected is None:
            assert got is None
        else:
            assert got.tolist() == expected.tolist()

    @precondition(lambda self: self.pt is not None and len(self.ref.sequences) > 0)
    @rule(data=st.data(), child=seq_ids)
    def fork(self, data, child):
        parent = data.draw(st.sampled_from(self.known()))
        if child in self.ref.sequences:
            try:
                self.pt.fork_sequence(parent, child)
            except ValueError:
                return
            raise AssertionError("fork onto an existing id was accepted")
        self.pt.fork_sequence(parent, child)
        self.ref.fork_sequence(parent, child)

    @precondition(lambda self: self.pt is not None and any(self.ref.sequences.values()))
    @rule(data=st.data(), block=block_ids)
    def set_block(self, data, block):
        seq = data.draw(st.sampled_from([s for s, b in self.ref.sequences.items() if b]))
        index = data.draw(st.integers(0, len(self.ref.sequences[seq]) - 1))
        assert self.pt.set_block(seq, index, block) == self.ref.set_block(seq, index, block)

    @precondition(lambda self: self.pt is not None)
    @rule()
    def replace_with_copy(self):
        clone = self.pt.copy()
        assert clone == self.pt
        self.pt = clone
        self.seen = {}   # stamps belong to a table; a copy starts its own

    @precondition(lambda self: self.pt is not None)
    @rule(data=st.data(), n=st.integers(0, 60), grouped=st.booleans())
    def queries_match(self, data, n, grouped):
        candidates = self.known() + [13, 2**63 - 1]
        seqs = data.draw(st.lists(st.sampled_from(candidates), min_size=n, max_size=n))
        if grouped:
            seqs.sort()
        limit = 50 * self.block_size
        positions = data.draw(st.lists(st.integers(-3, limit), min_size=n, max_size=n))
        # Row hints never change a result: none, remembered ones (stale after
        # removals, reuse and copies), or arbitrary integers.
        mode = data.draw(st.sampled_from(["none", "remembered", "arbitrary"]))
        if mode == "none":
            rows = None
        elif mode == "remembered":
            rows = [self.hints.get(s, -1) for s in seqs]
        else:
            rows = data.draw(st.lists(st.integers(-(2**31), 40), min_size=n, max_size=n))
        expected = self.ref.slot_mapping(seqs, positions)
        np.testing.assert_array_equal(self.pt.slot_mapping(seqs, positions, rows=rows), expected)
        blocks, offsets = self.pt.lookup(seqs, positions, rows=rows)
        ref_blocks, ref_offsets = self.ref.lookup(seqs, positions)
        np.testing.assert_array_equal(blocks, ref_blocks)
        np.testing.assert_array_equal(offsets, ref_offsets)
        for s, p in zip(seqs[:5], positions[:5]):
            if p >= 0:
                assert self.pt.get_block_for_position(s, p) == self.ref.get_block_for_position(s, p)

    @precondition(lambda self: self.pt is not None and len(self.ref.sequences) > 0)
    @rule()
    def remember_rows(self):
        known = self.known()
        rows = self.pt.rows(known)
        assert rows.dtype == np.int32 and len(set(rows.tolist())) == len(known)
        self.hints.update(zip(known, rows.tolist()))

    @precondition(lambda self: self.pt is not None and len(self.ref.sequences) > 0)
    @rule(data=st.data())
    def batch_layouts_match(self, data):
        batch = data.draw(st.lists(st.sampled_from(self.known()), max_size=12))
        table, num_blocks = self.pt.block_table(batch)
        ref_table, ref_num = self.ref.block_table(batch)
        np.testing.assert_array_equal(table, ref_table)
        np.testing.assert_array_equal(num_blocks, ref_num)
        indptr, indices = self.pt.to_csr(batch)
        ref_indptr, ref_indices = self.ref.to_csr(batch)
        np.testing.assert_array_equal(indptr, ref_indptr)
        np.testing.assert_array_equal(indices, ref_indices)

    @precondition(lambda self: self.pt is not None)
    @rule(how=st.sampled_from(["pickle", "file", "copy"]))
    def reload(self, how):
        """Carry on with a table rebuilt from its saved state: the validated path that
        pickles, files and copies share must keep contents and insertion order."""
        import io
        import pickle

        if how == "pickle":
            self.pt = pickle.loads(pickle.dumps(self.pt))
        elif how == "file":
            buffer = io.BytesIO()
            self.pt.save(buffer)
            buffer.seek(0)
            self.pt = PageTable.load(buffer)
        else:
            self.pt = self.pt.copy()
        self.seen = {}      # change stamps start anew in a rebuilt table

    @invariant()
    def same_contents(self):
        if self.pt is None:
            return
        self.pt._check_invariants()
        assert len(self.pt) == len(self.ref) == self.pt.num_sequences()
        assert list(self.pt) == list(self.ref.sequences)
        assert self.pt.total_blocks == self.ref.total_blocks
        for seq, blocks in self.ref.sequences.items():
            assert seq in self.pt
            assert self.pt.get_sequence_blocks(seq).tolist() == blocks
        assert self.pt.get_block_for_position(14, 0) is None or 14 in self.ref.sequences
        self.check_versions()

    def check_versions(self):
        """Stamps change exactly when a row changes; the rewrite stamp whenever a
        mirror's copy of the row's earlier blocks would be stale."""
        ids = list(self.ref.sequences)
        version, rewrite = self.pt.versions(ids + [2**62 + 5])
        assert version[-1] == -1 and rewrite[-1] == -1
        current = {}
        for seq, v, r in zip(ids, version.tolist(), rewrite.tolist()):
            blocks = list(self.ref.sequences[seq])
            current[seq] = (v, r, blocks)
            if seq not in self.seen:
                continue
            old_v, old_r, old_blocks = self.seen[seq]
            if blocks != old_blocks:
                assert v != old_v
            prefix_kept = blocks[: max(len(old_blocks) - 1, 0)] == old_blocks[:-1] and len(blocks) >= len(old_blocks)
            if not prefix_kept:
                assert r != old_r, (seq, old_blocks, blocks)
        self.seen = current
        assert PAD_SLOT_ID == -1


TestPageTableMachine = PageTableMachine.TestCase
TestPageTableMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
