"""The seed's documented behaviour, ported as tests."""

import numpy as np
import pytest

from pagetable import PAD_SLOT_ID, PageTable


def test_default_block_size_is_16():
    assert PageTable().block_size == 16


def test_with_block_size():
    pt = PageTable.with_block_size(32)
    assert pt.block_size == 32
    assert isinstance(pt, PageTable)


def test_positions_0_to_15_map_to_first_block():
    pt = PageTable()
    pt.append_block(1, 0)
    pt.append_block(1, 1)
    for pos in range(16):
        assert pt.get_block_for_position(1, pos) == (0, pos)
    for pos in range(16, 32):
        assert pt.get_block_for_position(1, pos) == (1, pos - 16)


def test_custom_block_size_mapping():
    pt = PageTable.with_block_size(32)
    pt.append_block(7, 5)
    pt.append_block(7, 9)
    assert pt.get_block_for_position(7, 31) == (5, 31)
    assert pt.get_block_for_position(7, 32) == (9, 0)
    assert pt.get_block_for_position(7, 64) is None


def test_invalid_position_and_sequence_give_none():
    pt = PageTable()
    pt.append_block(1, 0)
    assert pt.get_block_for_position(1, 16) is None
    assert pt.get_block_for_position(2, 0) is None
    assert pt.get_block_for_position(1, 2**62) is None
    assert pt.get_block_for_position(1, 2**70) is None


def test_get_sequence_blocks_in_order():
    pt = PageTable()
    pt.append_block(1, 0)
    pt.append_block(1, 1)
    blocks = pt.get_sequence_blocks(1)
    assert blocks.dtype == np.int32
    assert blocks.tolist() == [0, 1]
    assert pt.get_sequence_blocks(99) is None


def test_remove_sequence_returns_blocks_and_cleans_up():
    pt = PageTable()
    pt.append_block(1, 0)
    pt.append_block(1, 1)
    pt.append_block(2, 2)
    removed = pt.remove_sequence(1)
    assert removed.dtype == np.int32 and removed.tolist() == [0, 1]
    assert pt.get_sequence_blocks(1) is None
    assert pt.get_block_for_position(1, 0) is None
    assert pt.num_sequences() == 1
    assert pt.remove_sequence(1) is None
    assert pt.remove_sequence(12345) is None


def test_counts():
    pt = PageTable()
    assert pt.num_sequences() == 0
    for seq in range(5):
        pt.append_block(seq, seq)
    assert pt.num_sequences() == 5
    pt.append_block(0, 10)
    assert pt.num_sequences() == 5
    assert len(pt) == 5


def test_multiple_sequences_are_independent():
    pt = PageTable()
    pt.append_block(1, 100)
    pt.append_block(2, 200)
    pt.append_block(1, 101)
    assert pt.get_sequence_blocks(1).tolist() == [100, 101]
    assert pt.get_sequence_blocks(2).tolist() == [200]


def test_default_is_empty_and_debug_repr():
    pt = PageTable()
    assert pt.num_sequences() == 0
    pt.append_block(3, 4)
    text = repr(pt)
    assert "PageTable" in text and "block_size=16" in text and "3: [4]" in text


def test_clone_is_independent():
    pt = PageTable()
    pt.append_block(1, 0)
    clone = pt.copy()
    clone.append_block(1, 1)
    clone.append_block(2, 5)
    assert pt.get_sequence_blocks(1).tolist() == [0]
    assert 2 not in pt
    assert clone != pt


def test_pad_slot_id():
    assert PAD_SLOT_ID == -1
