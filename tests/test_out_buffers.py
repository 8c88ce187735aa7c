"""``out=`` accepts writeable buffers that are not numpy arrays, without a copy.

A CPU ``torch.Tensor`` exposes DLPack (``__dlpack__``); ``Tensorish`` below is a
stand-in with nothing but the DLPack protocol, so the test needs no torch.  What is
checked: the caller's memory receives the result, the call returns the caller's own
object, and a buffer that cannot be written in place is refused naming ``out``.
"""

import numpy as np
import pytest

from pagetable import PAD_SLOT_ID, PageTable


class Tensorish:
    """An object whose only array protocol is DLPack, as a CPU tensor's is."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


class NotABuffer:
    pass


def table():
    pt = PageTable(16)
    pt.append_blocks([7, 7, 9], [3, 8, 5])
    return pt


def test_slot_mapping_writes_into_a_dlpack_object_and_returns_it():
    memory = np.full(3, 99, dtype=np.int64)
    out = Tensorish(memory)
    result = table().slot_mapping([7, 7, 9], [0, 17, 40], out=out)
    assert result is out
    assert memory.tolist() == [48, 129, PAD_SLOT_ID]


def test_slot_mapping_writes_into_a_memoryview():
    memory = np.zeros(2, dtype=np.int64)
    view = memoryview(memory)
    assert table().slot_mapping([7, 9], [1, 2], out=view) is view
    assert memory.tolist() == [49, 82]


def test_strict_failure_leaves_a_dlpack_out_as_it_was():
    memory = np.full(2, 5, dtype=np.int64)
    with pytest.raises(IndexError):
        table().slot_mapping([7, 7], [0, 999], out=Tensorish(memory), strict=True)
    assert memory.tolist() == [5, 5]


def test_block_table_writes_into_a_dlpack_object():
    memory = np.full((2, 3), 42, dtype=np.int32)
    out = Tensorish(memory)
    result, lengths = table().block_table([7, 9], out=out)
    assert result is out
    assert memory.tolist() == [[3, 8, PAD_SLOT_ID], [5, PAD_SLOT_ID, PAD_SLOT_ID]]
    assert lengths.tolist() == [2, 1]


@pytest.mark.parametrize("out, error, match", [
    (Tensorish(np.zeros(3, dtype=np.int32)), TypeError, "out must have dtype int64"),
    (Tensorish(np.zeros(4, dtype=np.int64)), ValueError, r"out must have shape"),
    (NotABuffer(), TypeError, "out must be a numpy.ndarray or a writeable buffer"),
    (memoryview(b"\0" * 24), TypeError, "out must have dtype int64"),
])
def test_unusable_buffers_are_refused_naming_out(out, error, match):
    pt = table()
    before = pt.copy()
    with pytest.raises(error, match=match):
        pt.slot_mapping([7, 7, 9], [0, 17, 40], out=out)
    assert pt == before


def test_a_read_only_dlpack_buffer_is_refused():
    memory = np.zeros(3, dtype=np.int64)
    memory.flags.writeable = False
    with pytest.raises((ValueError, TypeError), match="out"):
        table().slot_mapping([7, 7, 9], [0, 17, 40], out=Tensorish(memory))
    assert memory.tolist() == [0, 0, 0]


def test_torch_tensors_are_written_in_place():
    torch = pytest.importorskip("torch")
    out = torch.zeros(3, dtype=torch.int64)
    assert table().slot_mapping([7, 7, 9], [0, 17, 40], out=out) is out
    assert out.tolist() == [48, 129, PAD_SLOT_ID]
