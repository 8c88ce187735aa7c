"""The one acceptance layer for arguments (see ``_accept.pxd``)."""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uintptr_t, INT32_MAX, INT32_MIN

import numpy as np

from pagetable._convert import as_index, as_int_array, check_output, check_range

cnp.import_array()

_INT64 = np.dtype(np.int64)
_INT32 = np.dtype(np.int32)


cdef object int_vector(object values, str name, int typenum):
    if is_kernel_vector(values, typenum):
        return values
    cdef int other = cnp.NPY_INT32 if typenum == cnp.NPY_INT64 else cnp.NPY_INT64
    if type(values) is list or type(values) is tuple:
        array = _exact_int_sequence(values, typenum)
        if array is not None:
            return array
    elif is_kernel_vector(values, other):
        array = _narrow_or_widen(values, typenum)
        if array is not None:
            return array
    return as_int_array(values, name, _INT64 if typenum == cnp.NPY_INT64 else _INT32)


cdef object _narrow_or_widen(object values, int typenum):
    """A behaved int64 array as int32 (None if an entry does not fit), or int32 as int64.

    One C pass: numpy's ``astype`` with the range check around it cost 50 us per
    call on a busy machine, for a step's few hundred token ids.
    """
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(<cnp.ndarray>values, 0)
    cdef cnp.npy_intp size = n
    array = cnp.PyArray_EMPTY(1, &size, typenum, 0)
    cdef const int64_t* wide_in
    cdef int32_t* narrow_out
    cdef const int32_t* narrow_in
    cdef int64_t* wide_out
    if typenum == cnp.NPY_INT32:
        wide_in = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>values)
        narrow_out = <int32_t*>cnp.PyArray_DATA(array)
        for i in range(n):
            if wide_in[i] < INT32_MIN or wide_in[i] > INT32_MAX:
                return None
            narrow_out[i] = <int32_t>wide_in[i]
    else:
        narrow_in = <const int32_t*>cnp.PyArray_DATA(<cnp.ndarray>values)
        wide_out = <int64_t*>cnp.PyArray_DATA(array)
        for i in range(n):
            wide_out[i] = narrow_in[i]
    return array


cdef object _exact_int_sequence(object values, int typenum):
    """The int64 / int32 array of a list or tuple of Python ints, read in one C pass.

    None as soon as an entry is anything but an exact ``int`` that fits (a bool, a
    numpy scalar, a float, a big int): the slow path then converts it, or raises
    naming the argument, exactly as it always has.  A token-id list of 2,000 entries
    took 200 us through numpy and the type checks, and takes a few here.
    """
    cdef Py_ssize_t i, n = len(values)
    cdef cnp.npy_intp size = n
    array = cnp.PyArray_EMPTY(1, &size, typenum, 0)
    cdef int64_t* wide = <int64_t*>cnp.PyArray_DATA(array)
    cdef int32_t* narrow = <int32_t*>cnp.PyArray_DATA(array)
    cdef int overflow = 0
    cdef long long value
    cdef object item
    cdef bint is_list = type(values) is list
    for i in range(n):
        # Nothing here runs Python code, so the list cannot change under the loop.
        item = (<list>values)[i] if is_list else (<tuple>values)[i]
        if type(item) is not int:
            return None
        value = PyLong_AsLongLongAndOverflow(item, &overflow)
        if overflow:
            return None
        if typenum == cnp.NPY_INT64:
            wide[i] = value
        elif INT32_MIN <= value <= INT32_MAX:
            narrow[i] = <int32_t>value
        else:
            return None
    return array


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
