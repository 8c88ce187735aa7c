"""Memory for the compiled modules: anonymous mappings and the arrays built on them.

Storage that grows (a table's pool, its row metadata and index) is replaced rather
than resized in the heap.  From the heap, the arrays left behind fragment it and stay
resident; a mapping of its own goes back to the OS the moment it is dropped, and its
untouched pages never count at all.
"""

cimport numpy as cnp

import mmap as _mmap

import numpy as np

cnp.import_array()

_INT32 = np.dtype(np.int32)
_INT64 = np.dtype(np.int64)


cdef object new_map(Py_ssize_t nbytes):
    # Private, not the default shared mapping: a shared anonymous mapping is a fixed
    # size memory object, and touching pages past it after an mremap faults.
    flags = getattr(_mmap, "MAP_PRIVATE", 0) | getattr(_mmap, "MAP_ANONYMOUS", 0)
    try:
        if flags:
            return _mmap.mmap(-1, nbytes, flags=flags)
        return _mmap.mmap(-1, nbytes)
    except OSError as error:
        # The OS refusing memory is running out of memory, whatever errno says
        # (ENOMEM, or EAGAIN past a locked-memory limit): callers catch MemoryError.
        raise MemoryError(f"cannot map {nbytes} bytes: {error}") from None


cdef object zeroed(Py_ssize_t count, int typenum):
    # Small arrays come straight from numpy's C API: a table grows its arrays a
    # dozen times on its way to a thousand sequences, and each growth should cost little.
    cdef cnp.npy_intp size = count
    cdef Py_ssize_t itemsize = 8 if typenum == cnp.NPY_INT64 else 4
    cdef Py_ssize_t nbytes = count * itemsize
    if nbytes < 65536:
        return cnp.PyArray_ZEROS(1, &size, typenum, 0)
    return np.frombuffer(new_map(nbytes), dtype=_INT64 if itemsize == 8 else _INT32,
                         count=count)

