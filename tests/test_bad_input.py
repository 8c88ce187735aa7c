"""Every bad argument raises a clear exception naming it, and changes nothing."""

import numpy as np
import pytest

from conftest import snapshot
from pagetable import PageTable


@pytest.fixture
def table():
    pt = PageTable()
    pt.append_blocks([1, 1, 2], [10, 11, 20])
    return pt


@pytest.mark.parametrize(
    "value, exc",
    [(0, ValueError), (-1, ValueError), (1.0, TypeError), (16.0, TypeError), ("16", TypeError),
     (None, TypeError), (2**40, OverflowError), (2**31, OverflowError), (True, TypeError),
     ([16], TypeError), (np.float64(16), TypeError)],
)
def test_bad_block_size(value, exc):
    with pytest.raises(exc, match="block_size"):
        PageTable(value)
    with pytest.raises(exc, match="block_size"):
        PageTable.with_block_size(value)


def test_numpy_integer_block_size_is_accepted():
    assert PageTable(np.int64(8)).block_size == 8
    assert PageTable(2**31 - 1).block_size == 2**31 - 1


def test_block_size_is_read_only():
    with pytest.raises(AttributeError):
        PageTable().block_size = 8


@pytest.mark.parametrize(
    "seq, block, exc, name",
    [(-1, 0, ValueError, "sequence_id"), (2**63, 0, OverflowError, "sequence_id"),
     (1.5, 0, TypeError, "sequence_id"), ("1", 0, TypeError, "sequence_id"),
     (None, 0, TypeError, "sequence_id"), (True, 0, TypeError, "sequence_id"),
     (1, -1, ValueError, "block_id"), (1, 2**31, OverflowError, "block_id"),
     (1, 2.0, TypeError, "block_id"), (1, None, TypeError, "block_id"),
     (1, np.bool_(True), TypeError, "block_id")],
)
def test_append_block_rejects(table, seq, block, exc, name):
    before = snapshot(table)
    with pytest.raises(exc, match=name):
        table.append_block(seq, block)
    assert snapshot(table) == before


@pytest.mark.parametrize(
    "seq, pos, exc",
    [(1, -1, ValueError), (1, -(2**70), ValueError), (1, 1.0, TypeError), (1, "0", TypeError),
     (1, None, TypeError), (-1, 0, ValueError), (1.0, 0, TypeError), (2**64, 0, OverflowError)],
)
def test_get_block_for_position_rejects(table, seq, pos, exc):
    with pytest.raises(exc):
        table.get_block_for_position(seq, pos)


@pytest.mark.parametrize("method", ["get_sequence_blocks", "remove_sequence"])
@pytest.mark.parametrize("seq, exc", [(-5, ValueError), ("a", TypeError), (None, TypeError), (2**63, OverflowError)])
def test_single_id_methods_reject(table, method, seq, exc):
    before = snapshot(table)
    with pytest.raises(exc, match="sequence_id"):
        getattr(table, method)(seq)
    assert snapshot(table) == before


BAD_ARRAYS = [
    ([1.0, 2.0], TypeError),
    (np.array([1, 2], dtype=np.float32), TypeError),
    (np.array([True, False]), TypeError),
    ([True, False], TypeError),
    (np.array([1, 2], dtype=object), TypeError),
    (["a", "b"], TypeError),
    ([None, 1], TypeError),
    (np.array([[1, 2]]), ValueError),
    (5, ValueError),
    ([2**64, 1], OverflowError),
    ([-1, 2**63], OverflowError),
    (np.array([2**63, 1], dtype=np.uint64), OverflowError),
]


@pytest.mark.parametrize("bad, exc", BAD_ARRAYS)
def test_append_blocks_rejects_bad_seq_ids(table, bad, exc):
    before = snapshot(table)
    with pytest.raises(exc, match="seq_ids"):
        table.append_blocks(bad, [1, 2])
    assert snapshot(table) == before


@pytest.mark.parametrize("bad, exc", BAD_ARRAYS)
def test_append_blocks_rejects_bad_block_ids(table, bad, exc):
    before = snapshot(table)
    with pytest.raises(exc, match="block_ids"):
        table.append_blocks([1, 3], bad)
    assert snapshot(table) == before


@pytest.mark.parametrize(
    "seqs, blocks, exc",
    [([1, 2, 3], [1, 2], ValueError), ([1, -2], [1, 2], ValueError), ([5, 6], [1, -1], ValueError),
     ([5, 6], [1, 2**31], OverflowError), ([5, 6], np.array([1, 2**40]), OverflowError)],
)
def test_append_blocks_is_all_or_nothing(table, seqs, blocks, exc):
    before = snapshot(table)
    with pytest.raises(exc):
        table.append_blocks(seqs, blocks)
    assert snapshot(table) == before
    table._check_invariants()


@pytest.mark.parametrize("method", ["lookup", "slot_mapping"])
@pytest.mark.parametrize("bad, exc", BAD_ARRAYS)
def test_queries_reject_bad_arrays(table, method, bad, exc):
    with pytest.raises(exc, match="seq_ids"):
        getattr(table, method)(bad, [0, 0])
    with pytest.raises(exc, match="positions"):
        getattr(table, method)([1, 1], bad)


@pytest.mark.parametrize("method", ["lookup", "slot_mapping"])
def test_queries_reject_mismatch_and_negative_ids(table, method):
    with pytest.raises(ValueError, match="same length"):
        getattr(table, method)([1, 1, 1], [0, 0])
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(table, method)([1, -3], [0, 0])
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(table, method)(np.full(100000, -3), np.zeros(100000, dtype=np.int64))


@pytest.mark.parametrize(
    "out, exc",
    [(np.zeros(2, dtype=np.int32), TypeError), (np.zeros(3, dtype=np.int64), ValueError),
     (np.zeros((2, 1), dtype=np.int64), ValueError), ([0, 0], TypeError),
     (np.zeros(4, dtype=np.int64)[::2], ValueError)],
)
def test_slot_mapping_rejects_bad_out(table, out, exc):
    with pytest.raises(exc, match="out"):
        table.slot_mapping([1, 1], [0, 1], out=out)


def test_slot_mapping_rejects_read_only_out(table):
    out = np.zeros(2, dtype=np.int64)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        table.slot_mapping([1, 1], [0, 1], out=out)


@pytest.mark.parametrize(
    "out, exc",
    [(np.zeros((2, 4), dtype=np.int64), TypeError), (np.zeros((3, 4), dtype=np.int32), ValueError),
     (np.zeros(8, dtype=np.int32), ValueError), (np.zeros((2, 1), dtype=np.int32), ValueError),
     (np.zeros((2, 8), dtype=np.int32)[:, ::2], ValueError)],
)
def test_block_table_rejects_bad_out(table, out, exc):
    before = out.copy()
    with pytest.raises(exc, match="out"):
        table.block_table([1, 2], out=out)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("method", ["block_table", "to_csr", "num_blocks", "rows"])
@pytest.mark.parametrize("bad, exc", BAD_ARRAYS)
def test_batch_queries_reject_bad_ids(table, method, bad, exc):
    with pytest.raises(exc, match="seq_ids"):
        getattr(table, method)(bad)


@pytest.mark.parametrize("method", ["block_table", "to_csr", "num_blocks", "rows"])
def test_batch_queries_reject_unknown_ids(table, method):
    with pytest.raises(KeyError, match="7"):
        getattr(table, method)([1, 7])


@pytest.mark.parametrize("method", ["lookup", "slot_mapping"])
@pytest.mark.parametrize(
    "bad, exc",
    BAD_ARRAYS + [([0, 2**31], OverflowError), ([0], ValueError), ([0, 0, 0], ValueError)],
)
def test_queries_reject_bad_row_hints(table, method, bad, exc):
    out = np.full(2, 7, dtype=np.int64)
    kwargs = {"out": out} if method == "slot_mapping" else {}
    with pytest.raises(exc, match="rows"):
        getattr(table, method)([1, 2], [0, 0], rows=bad, **kwargs)
    assert out.tolist() == [7, 7]


def test_fork_and_set_block_reject(table):
    before = snapshot(table)
    with pytest.raises(TypeError):
        table.fork_sequence(1.0, 5)
    with pytest.raises(ValueError):
        table.fork_sequence(1, -5)
    with pytest.raises(KeyError):
        table.fork_sequence(99, 5)
    with pytest.raises(ValueError):
        table.fork_sequence(1, 2)
    with pytest.raises(KeyError):
        table.set_block(99, 0, 1)
    with pytest.raises(IndexError):
        table.set_block(1, 2, 1)
    with pytest.raises(ValueError, match="block_id"):
        table.set_block(1, 0, -1)
    with pytest.raises(TypeError, match="block_index"):
        table.set_block(1, 0.0, 1)
    assert snapshot(table) == before


def _table_state(block_size, seq_ids, lengths, blocks):
    from pagetable import _state

    state = _state.header("PageTable")
    state.update(block_size=np.array(block_size), seq_ids=np.array(seq_ids, dtype=np.int64),
                 lengths=np.array(lengths, dtype=np.int64), blocks=np.array(blocks, dtype=np.int64))
    return state


@pytest.mark.parametrize("args, match", [
    ((16, [1, 2], [1], [5]), "lengths"),
    ((16, [1, 1], [1, 1], [5, 6]), "appears more than once"),
    ((16, [1], [2], [5]), "add up"),
    ((0, [1], [1], [5]), "block_size"),
    ((16, [-5], [0], []), "seq_ids"),                       # wrote out of bounds once
    ((16, [1, 2], [2**62, 2**62], []), "lengths"),          # a sum that overflows int64
    ((16, [1, 2], [2**31 - 1, -(2**31 - 1)], []), "lengths"),
    ((16, [1], [1], [-3]), "blocks"),
    ((16, [1], [1], [2**31]), "blocks"),
])
def test_pickled_garbage_is_rejected(args, match):
    import pickle

    from pagetable import CorruptStateError
    from pagetable._state import rebuild as _restore

    with pytest.raises(CorruptStateError, match=match):
        _restore(_table_state(*args))
    # The same state inside a pickle stream.
    with pytest.raises(CorruptStateError, match=match):
        pickle.loads(pickle.dumps(_Reduce(_table_state(*args))))


class _Reduce:
    """Pickles as a call of the table's restore function with a crafted state."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        from pagetable._state import rebuild as _restore

        return (_restore, (self.state,))
