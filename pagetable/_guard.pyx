"""The change and ownership flags of the table and the pool (see ``_guard.pxd``)."""

from pagetable._persist cimport Persistent


cdef class Guarded(Persistent):
    """Base class: the flags a KVCacheManager sets on the table and pool it owns."""

    def _set_owned(self, owned):
        """Private: mark the object owned by a manager, or not (tests corrupt it this way)."""
        self._owned = 1 if owned else 0
