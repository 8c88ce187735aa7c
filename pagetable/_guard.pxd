# What a KVCacheManager needs of the table and the pool it owns: to mark them changing
# while its change runs, and owned, so that their own changing methods refuse.
from libc.stdint cimport int32_t

from pagetable._persist cimport Persistent


cdef class Guarded(Persistent):
    cdef:
        # A change in progress that may let other threads run (allocating or freeing
        # mapped memory releases the GIL).  Another change meanwhile raises.
        int32_t _writing
        # Set while a KVCacheManager owns the object: changes from outside it raise.
        int32_t _owned

    cdef inline bint is_changing(self) noexcept nogil:
        return self._writing != 0

    cdef inline void mark_changing(self, bint changing) noexcept nogil:
        self._writing = 1 if changing else 0

    cdef inline bint is_owned(self) noexcept nogil:
        return self._owned != 0

    cdef inline void mark_owned(self, bint owned) noexcept nogil:
        self._owned = 1 if owned else 0
