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


cdef inline Py_ssize_t cnp_len(object array):
    return array.shape[0]


@cython.final
cdef class AdmissionResult:
    """What ``add_sequences`` returns: every prompt's slots in one array.

    A sequence of :class:`AppendResult`, one per prompt (``result[i]``, ``len``,
    iteration), built on demand from three arrays, so admitting a batch makes no
    Python object per prompt.

    Attributes
    ----------
    slots : numpy.ndarray of int64
        The slots of every token the engine computes, prompt by prompt: prompt ``i``'s
        positions ``num_cached_tokens[i] .. num_tokens[i] - 1``.
    num_cached_tokens : numpy.ndarray of int64, shape (n,)
        Each prompt's tokens found in the prefix cache (0 without prefix caching).
    query_start_loc : numpy.ndarray of int64, shape (n + 1,)
        Prompt ``i``'s slots are ``slots[query_start_loc[i]:query_start_loc[i + 1]]``
        (the cumulative query lengths attention kernels take).
    """

    def __init__(self, slots, num_cached_tokens, query_start_loc):
        slots = as_int_array(slots, "slots")
        cached = as_int_array(num_cached_tokens, "num_cached_tokens")
        loc = as_int_array(query_start_loc, "query_start_loc")
        if loc.shape[0] != cached.shape[0] + 1:
            raise ValueError(
                f"query_start_loc must have one entry more than num_cached_tokens, "
                f"got {loc.shape[0]} and {cached.shape[0]}")
        if loc[0] != 0 or loc[-1] != slots.shape[0] or (np.diff(loc) < 0).any():
            raise ValueError("query_start_loc must rise from 0 to len(slots)")
        if (cached < 0).any():
            raise ValueError("num_cached_tokens must be >= 0")
        self.slots = slots
        self.num_cached_tokens = cached
        self.query_start_loc = loc

    def __len__(self):
        return cnp_len(self.num_cached_tokens)

    def __getitem__(self, index):
        cdef Py_ssize_t n = cnp_len(self.num_cached_tokens)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(n))]
        i = as_index(index, "index")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"prompt index {index} is out of range for {n} prompts")
        cdef AppendResult result = new_result()
        result.slots = self.slots[self.query_start_loc[i]:self.query_start_loc[i + 1]]
        result.num_cached_tokens = self.num_cached_tokens[i]
        return result

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        return (f"AdmissionResult(slots={self.slots!r}, num_cached_tokens={self.num_cached_tokens!r}, "
                f"query_start_loc={self.query_start_loc!r})")

    def __eq__(self, other):
        if isinstance(other, AdmissionResult):
            return (np.array_equal(self.slots, other.slots)
                    and np.array_equal(self.num_cached_tokens, other.num_cached_tokens)
                    and np.array_equal(self.query_start_loc, other.query_start_loc))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __reduce__(self):
        return (AdmissionResult, (self.slots, self.num_cached_tokens, self.query_start_loc))


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
