"""Minimised reproducers of the bugs the fuzz harness (tests/fuzz/harness.py) found.

Each test is the few lines a divergence came down to, asserting what the contract says.
"""

import numpy as np
import pytest

from pagetable import BlockAllocator, KVCacheManager, PageTable
from pagetable.reference import ReferenceKVCacheManager


def unaligned_int64(values):
    buf = bytearray(8 * len(values) + 1)
    out = np.frombuffer(buf, dtype=np.int64, count=len(values), offset=1)
    out[...] = values
    return out


@pytest.fixture
def table():
    pt = PageTable(16)
    pt.append_blocks([7, 7], [3, 8])
    return pt


# --- found at 61642f9, fixed in 5a6a46b ----------------------------------------------

def test_list_mixing_uint64_and_signed_scalars_is_integers(table):
    # was: a bare StopIteration out of pagetable._convert
    assert table.slot_mapping([np.uint64(7), np.int64(7)], [0, 17]).tolist() == [48, 129]
    assert table.slot_mapping([np.uint64(7), 7], [0, 17]).tolist() == [48, 129]
    a = BlockAllocator(4)
    a.allocate(2)
    a.free([np.uint64(1), np.int64(0)])
    assert a.num_free == 4


def test_big_endian_arrays_are_read_as_their_values(table):
    # was: read unswapped (seq id 7 as 504403158265495552, block 280 as 402718720)
    assert table.slot_mapping(np.array([7, 7], ">i8"), [0, 17]).tolist() == [48, 129]
    pt = PageTable()
    pt.append_blocks(np.array([5, 1], ">i8"), np.array([280, 4], ">i4"))
    assert list(pt) == [5, 1]
    assert pt.get_sequence_blocks(5).tolist() == [280]
    pt.append_block(6, 1)
    assert pt.versions(np.array([6, 6], ">i8")[::2])[0].tolist() != [-1]


def test_slot_mapping_refuses_a_big_endian_or_unaligned_out(table):
    # was: accepted, and wrote native int64s into them
    with pytest.raises((TypeError, ValueError), match="out"):
        table.slot_mapping([7, 7], [0, 17], out=np.zeros(2, ">i8"))
    with pytest.raises(ValueError, match="out"):
        table.slot_mapping([7, 7], [0, 17], out=unaligned_int64([0, 0]))


def test_slot_mapping_out_overlapping_seq_ids(table):
    # was: ValueError "seq_ids must be in 0..2**63-1, got -1", not naming out
    base = np.zeros(4, dtype=np.int64)
    seqs = base[:3]
    seqs[:] = [7, 7, 7]
    try:
        got = table.slot_mapping(seqs, [0, 17, 1], out=base[1:])
    except ValueError as error:
        assert "out" in str(error)
    else:
        assert got.tolist() == [48, 129, 49]


# --- found at 5a6a46b, fixed in f7d638a ----------------------------------------------

@pytest.mark.parametrize("method", ["num_blocks", "rows", "to_csr", "block_table"])
def test_minus_one_at_the_start_of_a_batch_is_refused(table, method):
    # was: num_blocks([-1]) -> [0], rows([-1]) -> [-1] (the "no id yet" sentinel)
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(table, method)([-1])
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(table, method)([-1, 7])


def test_bools_among_integers_are_refused(table):
    # was: read as 1 / 0 (append_blocks([1, True], ...) appended to sequence 1 twice)
    before = [(s, table.get_sequence_blocks(s).tolist()) for s in table]
    with pytest.raises(TypeError):
        table.append_blocks([1, True], [5, 6])
    with pytest.raises(TypeError):
        table.append_blocks([3, 3], [7, True])
    with pytest.raises(TypeError):
        table.slot_mapping([7, True], [0, 0])
    with pytest.raises(TypeError):
        table.lookup([7, 7], [np.True_, 0])
    assert [(s, table.get_sequence_blocks(s).tolist()) for s in table] == before
    a = BlockAllocator(4)
    a.allocate(2)
    with pytest.raises(TypeError):
        a.free([True, 0])
    with pytest.raises(TypeError):
        a.refcount([0, np.False_])
    kv = KVCacheManager(8, 4)
    kv.add_sequence(1, 3)
    with pytest.raises(TypeError):
        kv.append_tokens([1, np.False_], 1)


@pytest.mark.parametrize("manager", [KVCacheManager, ReferenceKVCacheManager])
def test_manager_and_reference_report_the_same_first_bad_entry(manager):
    # was: the manager said ValueError (repeat at index 1), the reference KeyError (9)
    kv = manager(8, 4)
    kv.add_sequence(1, 3)
    with pytest.raises(ValueError, match="more than once"):
        kv.append_tokens([1, 1, 9], 1)
    with pytest.raises(ValueError, match="more than once"):
        kv.free_sequence([1, 1, 9])


# --- open at f7d638a -------------------------------------------------------------------

@pytest.mark.parametrize("manager", [KVCacheManager, ReferenceKVCacheManager])
@pytest.mark.parametrize(
    "seq_ids, count, exc",
    [([], -1, ValueError), ([1], -1, ValueError),
     ([], 2**64, OverflowError), ([1], 2**63, OverflowError)],
)
def test_scalar_token_counts_are_checked_for_any_batch(manager, seq_ids, count, exc):
    # The manager raises; the reference accepts a negative or huge count for an empty
    # batch and says OutOfBlocksError (can_append: False) for 2**63.
    kv = manager(8, 4)
    kv.add_sequence(1, 3)
    with pytest.raises(exc):
        kv.append_tokens(seq_ids, count)
    with pytest.raises(exc):
        kv.can_append(seq_ids, count)
