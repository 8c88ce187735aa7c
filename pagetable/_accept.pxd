# The one acceptance layer for arguments, shared by every compiled module.
#
# The inline checks below recognise, at no call cost, the argument a kernel can use
# as it is: a Python int in range, or an exact numpy.ndarray, 1-D, C-contiguous,
# aligned, in native byte order, of the kernel's dtype.  Anything else goes to
# pagetable._convert, which converts it (without a copy, for an ``out`` buffer) or
# raises an exception naming the argument.  No entry point checks arguments any
# other way.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, INT32_MAX, INT64_MAX

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1


cdef inline bint is_kernel_vector(object values, int typenum) noexcept:
    """Whether ``values`` is a behaved 1-D array of ``typenum`` (read as it is)."""
    return (cnp.PyArray_CheckExact(values)
            and cnp.PyArray_TYPE(<cnp.ndarray>values) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>values) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>values)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>values)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>values))


cdef inline bint is_output_vector(object out, Py_ssize_t n, int typenum) noexcept:
    """Whether ``out`` is a behaved, writeable 1-D array of ``typenum`` and length ``n``."""
    return (is_kernel_vector(out, typenum)
            and cnp.PyArray_DIM(<cnp.ndarray>out, 0) == n
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out))


# int64 or int32 (``typenum``) vector from any integer array-like; raises naming ``name``.
cdef object int_vector(object values, str name, int typenum)
# ``out`` as a writeable int64 / int32 ndarray of length ``n`` sharing its memory (an
# ndarray as it is; a DLPack or buffer-protocol object, such as a CPU torch.Tensor,
# viewed without a copy), else raise naming it.
cdef object output_vector(object out, Py_ssize_t n, int typenum)
# Whether two arrays' memory ranges intersect (an ``out`` that overlaps an input).
cdef bint shares_memory(object a, object b) noexcept
# The slow path of ``int_arg``: converts or raises naming ``name``.
cdef int64_t int_arg_slow(object value, str name, int64_t high) except? -2


cdef inline int64_t int_arg(object value, str name, int64_t high) except? -2:
    """An integer argument in ``0 .. high``; raises naming ``name`` otherwise.

    All comparisons are on C values: boxing a bound here cost every call.
    """
    cdef int overflow = 0
    cdef long long result
    if type(value) is int:
        result = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= result <= high:
            return result
    return int_arg_slow(value, name, high)


cdef inline int64_t seq_arg(object value, str name) except? -2:
    """A sequence id argument (``0 .. 2**63 - 1``)."""
    return int_arg(value, name, INT64_MAX)


cdef inline int32_t block_arg(object value, str name) except? -2:
    """A block id argument (``0 .. 2**31 - 1``)."""
    return <int32_t>int_arg(value, name, INT32_MAX)
