# The one acceptance layer for array arguments, shared by every compiled module.
#
# The inline checks below recognise the array a kernel can read as it is: an exact
# numpy.ndarray, 1-D, C-contiguous, aligned, in native byte order, of the kernel's
# dtype.  Anything else goes to pagetable._convert, which converts it or raises an
# exception naming the argument.  No entry point checks arrays any other way.
cimport numpy as cnp
from libc.stdint cimport int64_t


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
# Accept ``out`` as a writeable int64 / int32 vector of length ``n``, else raise naming it.
cdef int check_output_vector(object out, Py_ssize_t n, int typenum) except -1
# Whether two arrays' memory ranges intersect (an ``out`` that overlaps an input).
cdef bint shares_memory(object a, object b) noexcept
