"""BlockAllocator: reuse order, reference counts, all-or-nothing errors, against the reference."""

import numpy as np
import pytest

from pagetable import BlockAllocator, OutOfBlocksError
from pagetable.reference import ReferenceBlockAllocator

ALLOCATORS = [
    pytest.param((BlockAllocator, OutOfBlocksError), id="cython"),
    pytest.param((ReferenceBlockAllocator, OutOfBlocksError), id="reference"),
]


@pytest.fixture(params=ALLOCATORS)
def kind(request):
    return request.param


def state(allocator):
    """Everything observable: free count, every refcount, and the next blocks handed out."""
    return allocator.num_free, allocator.refcount(np.arange(allocator.num_blocks)).tolist()


def test_fresh_pool_hands_out_low_ids_first(kind):
    cls, _ = kind
    allocator = cls(8)
    assert allocator.num_blocks == 8 and allocator.num_free == 8
    blocks = allocator.allocate(3)
    assert blocks.dtype == np.int32
    assert blocks.tolist() == [0, 1, 2]
    assert allocator.num_free == 5
    assert allocator.refcount([0, 1, 2, 3]).tolist() == [1, 1, 1, 0]


def test_reuse_is_lifo(kind):
    cls, _ = kind
    allocator = cls(8)
    allocator.allocate(6)
    allocator.free([1, 4])
    # Most recently freed first, then the untouched part of the pool.
    assert allocator.allocate(3).tolist() == [4, 1, 6]


def test_allocate_zero_and_all(kind):
    cls, _ = kind
    allocator = cls(4)
    assert allocator.allocate(0).tolist() == []
    assert sorted(allocator.allocate(4).tolist()) == [0, 1, 2, 3]
    assert allocator.num_free == 0


def test_out_of_blocks_takes_nothing(kind):
    cls, error = kind
    allocator = cls(4)
    allocator.allocate(3)
    before = state(allocator)
    with pytest.raises(error) as info:
        allocator.allocate(2)
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, MemoryError)
    assert info.value.requested == 2 and info.value.available == 1
    assert state(allocator) == before


def test_refcounts_and_sharing(kind):
    cls, _ = kind
    allocator = cls(4)
    allocator.allocate(2)
    allocator.incref([0, 0, 1])
    assert allocator.refcount([0, 1]).tolist() == [3, 2]
    allocator.free([0, 1])
    assert allocator.num_free == 2
    allocator.free([0, 0, 1])
    assert allocator.num_free == 4
    assert allocator.refcount([0, 1]).tolist() == [0, 0]


def test_free_with_duplicates_counts_each(kind):
    cls, _ = kind
    allocator = cls(4)
    allocator.allocate(2)
    before = state(allocator)
    with pytest.raises(ValueError, match="block_ids"):
        allocator.free([0, 1, 0])  # block 0 holds one reference, listed twice
    assert state(allocator) == before


@pytest.mark.parametrize("bad", [[5], [-1], [0, 2**31], [3]])
def test_free_bad_ids_change_nothing(kind, bad):
    cls, _ = kind
    allocator = cls(4)
    allocator.allocate(2)
    before = state(allocator)
    with pytest.raises((ValueError, OverflowError), match="block_ids"):
        allocator.free([0] + bad)
    assert state(allocator) == before


def test_incref_free_block_raises(kind):
    cls, _ = kind
    allocator = cls(4)
    allocator.allocate(1)
    before = state(allocator)
    with pytest.raises(ValueError, match="block_ids"):
        allocator.incref([0, 1])
    assert state(allocator) == before


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda a: a.allocate(1.5), TypeError, "n"),
        (lambda a: a.allocate("2"), TypeError, "n"),
        (lambda a: a.allocate(None), TypeError, "n"),
        (lambda a: a.allocate(True), TypeError, "n"),
        (lambda a: a.allocate(-1), ValueError, "n"),
        (lambda a: a.free([1.0]), TypeError, "block_ids"),
        (lambda a: a.free([[0]]), ValueError, "block_ids"),
        (lambda a: a.free([True]), TypeError, "block_ids"),
        (lambda a: a.incref(["a"]), TypeError, "block_ids"),
        (lambda a: a.refcount([9]), ValueError, "block_ids"),
    ],
)
def test_bad_arguments(kind, call, exc, name):
    cls, _ = kind
    allocator = cls(4)
    allocator.allocate(2)
    before = state(allocator)
    with pytest.raises(exc) as info:
        call(allocator)
    assert str(info.value).startswith(name)
    assert state(allocator) == before


@pytest.mark.parametrize("num_blocks, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                             ("8", TypeError), (None, TypeError), (2**40, OverflowError)])
def test_bad_pool_size(kind, num_blocks, exc):
    cls, _ = kind
    with pytest.raises(exc, match="num_blocks"):
        cls(num_blocks)


def test_random_operations_match_reference():
    rng = np.random.default_rng(7)
    fast, ref = BlockAllocator(64), ReferenceBlockAllocator(64)
    for _ in range(2000):
        op = rng.integers(3)
        if op == 0:
            n = int(rng.integers(0, 8))
            outcomes = []
            for allocator in (fast, ref):
                try:
                    outcomes.append(allocator.allocate(n).tolist())
                except OutOfBlocksError:
                    outcomes.append("out")
            assert outcomes[0] == outcomes[1]
        else:
            ids = rng.integers(0, 64, size=int(rng.integers(0, 4)))
            outcomes = []
            for allocator in (fast, ref):
                try:
                    (allocator.free if op == 1 else allocator.incref)(ids)
                    outcomes.append("ok")
                except ValueError:
                    outcomes.append("error")
            assert outcomes[0] == outcomes[1]
        assert state(fast) == state(ref)
    assert fast._free_blocks().tolist() == ref._free_stack
