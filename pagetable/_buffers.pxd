# Memory for the compiled modules: anonymous mappings and the 1-D arrays built on them.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t

# An anonymous private mapping of ``nbytes``; MemoryError when the OS refuses it.
cdef object new_map(Py_ssize_t nbytes)
# A zeroed 1-D array of ``count`` int64 or int32 (``typenum``); large ones get a mapping
# of their own, so that dropping them hands the memory straight back to the OS.
cdef object zeroed(Py_ssize_t count, int typenum)


cdef inline object empty(Py_ssize_t count, int typenum):
    """An uninitialised 1-D array of ``count`` entries of ``typenum``."""
    cdef cnp.npy_intp size = count
    return cnp.PyArray_EMPTY(1, &size, typenum, 0)


cdef inline int64_t* i64(object array) noexcept:
    """Data pointer of an int64 array (the caller knows its type)."""
    return <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline int32_t* i32(object array) noexcept:
    """Data pointer of an int32 array (the caller knows its type)."""
    return <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>array)
