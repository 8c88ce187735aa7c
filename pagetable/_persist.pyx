"""Saving, loading, copying and pickling, once for every stateful class.

A subclass defines ``_state()`` (its state dict, see ``pagetable._state``) and a
``_from_state(state)`` that validates and builds, registered with
``pagetable._state.register`` under the class's name.  Files, pickles and copies all
go through that one validated path; a class never keeps Cython's automatic pickling.
"""

from pagetable import _state


cdef class Persistent:
    """Base class: ``save`` / ``load`` / ``copy`` / pickling through one validated state."""

    def _state(self):
        raise NotImplementedError

    def save(self, path):
        """Save to ``path`` (a file name or a binary file object).

        The file is an uncompressed ``.npz`` of plain integer arrays in pagetable's
        versioned format (see ``pagetable._state``); load it with this class's
        :meth:`load` or with :func:`pagetable.load`.  The file is written whole or not
        at all: a file name is written to a temporary file that replaces it.
        """
        _state.write(path, self._state())

    @classmethod
    def load(cls, path):
        """Load an object of this class saved by :meth:`save`.

        Raises
        ------
        CorruptStateError
            The file is truncated, tampered with, of another version, holds another
            kind of object, or holds inconsistent state.  Nothing is built.
        """
        return _state.load_kind(path, cls.__name__)

    def copy(self):
        """Return an independent copy (built through the validated state)."""
        return _state.rebuild(self._state())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_state.rebuild, (self._state(),))
