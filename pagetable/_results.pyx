"""What the manager's calls return: AppendResult, and OutOfBlocksError for a full pool."""

cimport cython

import numpy as np

from pagetable._convert import as_index, as_int_array


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a call needs; the call changed nothing.

    A ``RuntimeError`` rather than a ``MemoryError``: running out of KV blocks is the
    normal back-pressure signal an engine's scheduler handles (by preempting), not a
    failure of host memory, and catching ``MemoryError`` must not swallow it.

    Attributes
    ----------
    requested : int
        Blocks the call needed.
    available : int
        Blocks that were free.
    """

    def __init__(self, requested, available):
        super().__init__(f"need {requested} free blocks, only {available} available")
        self.requested = requested
        self.available = available

    def __reduce__(self):
        return (type(self), (self.requested, self.available))


cdef class AppendResult:
    """What an engine needs after a growth call.

    Attributes
    ----------
    slots : numpy.ndarray of int64
        The cache slot (``block_id * block_size + offset``) of every new token,
        sequence by sequence in input order: the K/V write kernel's slot mapping.
    copy_src, copy_dst : numpy.ndarray of int32
        Copy-on-write block copies to perform before writing, pairwise.
    num_cached_tokens : int
        For ``add_sequence`` with prefix caching: the prompt tokens found in the
        cache, whose KV is already there (``slots`` starts after them); else 0.
    lookahead_slots : numpy.ndarray of int64
        For ``append_tokens(..., num_lookahead=K)``: the slots of the ``K`` positions
        after each sequence's new length (room reserved for draft tokens), sequence
        by sequence in input order; else empty.
    """

    def __init__(self, slots, copy_src, copy_dst, num_cached_tokens=0, lookahead_slots=None):
        slots = as_int_array(slots, "slots")
        copy_src = as_int_array(copy_src, "copy_src", np.dtype(np.int32))
        copy_dst = as_int_array(copy_dst, "copy_dst", np.dtype(np.int32))
        if copy_src.shape[0] != copy_dst.shape[0]:
            raise ValueError(
                f"copy_src and copy_dst must have the same length, "
                f"got {copy_src.shape[0]} and {copy_dst.shape[0]}")
        num_cached_tokens = as_index(num_cached_tokens, "num_cached_tokens")
        if num_cached_tokens < 0:
            raise ValueError(f"num_cached_tokens must be >= 0, got {num_cached_tokens}")
        self.slots = slots
        self.copy_src = copy_src
        self.copy_dst = copy_dst
        self.num_cached_tokens = num_cached_tokens
        self.lookahead_slots = (_EMPTY_INT64 if lookahead_slots is None
                                else as_int_array(lookahead_slots, "lookahead_slots"))

    def __repr__(self):
        cached = f", num_cached_tokens={self.num_cached_tokens}" if self.num_cached_tokens else ""
        if self.lookahead_slots.shape[0]:
            cached += f", lookahead_slots={self.lookahead_slots!r}"
        return (f"AppendResult(slots={self.slots!r}, copy_src={self.copy_src!r}, "
                f"copy_dst={self.copy_dst!r}{cached})")

    def __eq__(self, other):
        if not isinstance(other, AppendResult):
            return NotImplemented
        return (np.array_equal(self.slots, other.slots)
                and np.array_equal(self.copy_src, other.copy_src)
                and np.array_equal(self.copy_dst, other.copy_dst)
                and self.num_cached_tokens == other.num_cached_tokens
                and np.array_equal(self.lookahead_slots, other.lookahead_slots))

    __hash__ = None

    def __reduce__(self):
        # Through __init__, which checks what it is given.
        return (AppendResult, (self.slots, self.copy_src, self.copy_dst, self.num_cached_tokens,
                               self.lookahead_slots))


cdef AppendResult new_result():
    """An empty AppendResult, made before a change so that making it cannot fail after."""
    cdef AppendResult result = AppendResult.__new__(AppendResult)
    result.slots = _EMPTY_INT64
    result.copy_src = _EMPTY_INT32
    result.copy_dst = _EMPTY_INT32
    result.num_cached_tokens = 0
    result.lookahead_slots = _EMPTY_INT64
    return result


cdef object _EMPTY_INT32 = np.empty(0, dtype=np.int32)
_EMPTY_INT32.flags.writeable = False
cdef object _EMPTY_INT64 = np.empty(0, dtype=np.int64)
_EMPTY_INT64.flags.writeable = False
