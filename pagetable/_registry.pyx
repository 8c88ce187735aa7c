"""The KV-cache manager's record of its sequences (see ``_registry.pxd``)."""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, INT32_MAX
from libc.string cimport memcpy

from pagetable._buffers cimport zeroed
from pagetable._idmap cimport idmap_attach, idmap_insert, idmap_remove, idmap_storage
from pagetable._registry cimport SequenceSlot

cnp.import_array()

cdef enum:
    MIN_SLOTS = 16
    # The index grows past 3/8 full, as the PageTable's does (see there why).
    LOAD_NUM = 3
    LOAD_DEN = 8


cdef class SequenceRegistry:
    """Sequence id -> slot, with each slot's token count and table row (C use only)."""

    def __cinit__(self):
        self._capacity = 0
        self._used = 0
        self._num_free = 0
        self._count = 0
        self._mark = 0
        self._storage = None
        self._index_storage = None
        self._grow_slots(MIN_SLOTS)
        self._rebuild_index(2 * MIN_SLOTS)

    cdef int _grow_slots(self, int64_t capacity) except -1:
        """Give the records room for ``capacity`` slots, keeping what they hold."""
        cdef Py_ssize_t records = capacity * sizeof(SequenceSlot)    # a multiple of 8
        storage = zeroed((records + capacity * 4 + 7) // 8, cnp.NPY_INT64)
        cdef char* base = <char*>cnp.PyArray_DATA(<cnp.ndarray>storage)
        cdef SequenceSlot* slots = <SequenceSlot*>base
        cdef int32_t* free_slots = <int32_t*>(base + records)
        if self._used:
            memcpy(slots, self.slots, <size_t>self._used * sizeof(SequenceSlot))
        if self._num_free:
            memcpy(free_slots, self._free_slots, <size_t>self._num_free * 4)
        retired = self._storage
        self._storage = storage
        self.slots = slots
        self._free_slots = free_slots
        self._capacity = <int32_t>capacity
        del retired
        return 0

    cdef int _rebuild_index(self, int64_t capacity) except -1:
        cdef int32_t slot
        storage = idmap_storage(capacity)
        retired = self._index_storage
        self._index_storage = storage
        idmap_attach(&self._index, storage)
        for slot in range(self._used):
            if self.slots[slot].seq_id >= 0:
                idmap_insert(&self._index, self.slots[slot].seq_id, slot)
        del retired
        return 0

    cdef int reserve(self, int64_t extra) except -1:
        cdef int64_t needed = self._count + extra
        cdef int64_t capacity = self._index.mask + 1
        cdef int64_t slots = self._used + max(extra - self._num_free, 0)
        if needed >= INT32_MAX // 2:
            raise OverflowError("a KVCacheManager holds at most 2**30 sequences")
        if slots > self._capacity:
            self._grow_slots(max(slots, 2 * <int64_t>self._capacity))
        while needed * LOAD_DEN > capacity * LOAD_NUM:
            capacity *= 2
        if capacity != self._index.mask + 1:
            self._rebuild_index(capacity)
        return 0

    cdef int32_t add(self, int64_t seq_id, int32_t row, int32_t tokens) noexcept nogil:
        cdef int32_t slot
        if self._num_free:
            self._num_free -= 1
            slot = self._free_slots[self._num_free]
        else:
            slot = self._used
            self._used += 1
        self.slots[slot].seq_id = seq_id
        self.slots[slot].mark = 0
        self.slots[slot].tokens = tokens
        self.slots[slot].row = row
        self.slots[slot].live = 0
        self.slots[slot].lookahead = 0
        self.slots[slot].shared_tail = 0
        idmap_insert(&self._index, seq_id, slot)
        self._count += 1
        return slot

    cdef void remove(self, int32_t slot) noexcept nogil:
        idmap_remove(&self._index, self.slots[slot].seq_id)
        self.slots[slot].seq_id = -1
        self.slots[slot].tokens = 0
        self.slots[slot].row = -1
        self._free_slots[self._num_free] = slot
        self._num_free += 1
        self._count -= 1
