"""The one acceptance layer for arguments (see ``_accept.pxd``)."""

cimport numpy as cnp
from libc.stdint cimport uintptr_t

import numpy as np

from pagetable._convert import as_index, as_int_array, check_output, check_range

cnp.import_array()

_INT64 = np.dtype(np.int64)
_INT32 = np.dtype(np.int32)


cdef object int_vector(object values, str name, int typenum):
    if is_kernel_vector(values, typenum):
        return values
    return as_int_array(values, name, _INT64 if typenum == cnp.NPY_INT64 else _INT32)


cdef object output_vector(object out, Py_ssize_t n, int typenum):
    if is_output_vector(out, n, typenum):
        return out
    # Raises with the precise reason; a subclass of ndarray that is otherwise right
    # passes, and so does a writeable CPU tensor (viewed through DLPack).
    return check_output(out, (n,), _INT64 if typenum == cnp.NPY_INT64 else _INT32)


cdef int64_t int_arg_slow(object value, str name, int64_t high) except? -2:
    value = as_index(value, name)
    check_range(value, 0, high, name)
    return value


cdef bint shares_memory(object a, object b) noexcept:
    cdef uintptr_t a_begin, a_end, b_begin, b_end
    if not (cnp.PyArray_Check(a) and cnp.PyArray_Check(b)):
        return False
    a_begin = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>a)
    a_end = a_begin + <uintptr_t>cnp.PyArray_NBYTES(<cnp.ndarray>a)
    b_begin = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>b)
    b_end = b_begin + <uintptr_t>cnp.PyArray_NBYTES(<cnp.ndarray>b)
    return a_begin < b_end and b_begin < a_end
