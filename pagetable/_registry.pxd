# The KV-cache manager's own record of its sequences: id -> slot, and per slot the
# sequence's token count and its row in each table the manager keeps.
#
# The manager keys everything on its slots, not on a table's rows, so that one
# sequence can own rows in several tables (one per KV-cache group).  Lookups are
# ``cdef inline``: a step resolves each of its sequences through ``find`` at no
# call cost.
cimport cython
from libc.stdint cimport int32_t, int64_t

from pagetable._idmap cimport IdMap, idmap_find


# One sequence's record: what a step reads and writes of it sits in one cache line.
cdef struct SequenceSlot:
    int64_t seq_id      # -1 for a free slot
    int64_t mark        # last duplicate-check mark that saw the slot (see mark_new)
    int32_t tokens      # tokens the sequence holds
    int32_t row         # its row in the manager's table
    int32_t live        # its first held block: entries before it are released (windows)
    int32_t lookahead   # draft positions its last growth call reserved past its tokens
    int32_t shared_tail # its partial block may carry a hash (a truncate into a shared block)


@cython.final
cdef class SequenceRegistry:
    cdef:
        IdMap _index               # sequence id -> slot
        object _index_storage      # (keys, values) arrays the index points into
        object _storage            # the one buffer the per-slot arrays live in
        int32_t _capacity          # slots the arrays hold
        int32_t _used              # slots 0 .. _used - 1 have been handed out
        int32_t _num_free          # entries of _free_slots
        int64_t _count             # sequences held
        int64_t _mark              # the current duplicate-check mark (see mark_new)
        SequenceSlot* slots        # one record per slot
        int32_t* _free_slots       # recycled slots, a stack

    cdef inline int32_t find(self, int64_t seq_id) noexcept nogil:
        """Slot of ``seq_id``, or -1 (also for a negative id)."""
        if seq_id < 0:
            return -1
        return idmap_find(&self._index, seq_id)

    cdef inline int64_t count(self) noexcept nogil:
        return self._count

    cdef inline int32_t slots_used(self) noexcept nogil:
        """Slots ``0 .. slots_used() - 1`` have been handed out (some may be free now)."""
        return self._used

    # A fresh mark for a duplicate check: a slot is a repeat in a batch when
    # ``slots[slot].mark`` already equals the mark, and is marked by setting it.
    cdef inline int64_t mark_new(self) noexcept nogil:
        self._mark += 1
        return self._mark

    # Make room for ``extra`` more sequences; the only call that allocates.
    cdef int reserve(self, int64_t extra) except -1
    # Add a sequence known to be absent, after ``reserve``: never fails.
    cdef int32_t add(self, int64_t seq_id, int32_t row, int32_t tokens) noexcept nogil
    cdef void remove(self, int32_t slot) noexcept nogil

    cdef int _grow_slots(self, int64_t capacity) except -1
    cdef int _rebuild_index(self, int64_t capacity) except -1
