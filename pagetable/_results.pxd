# The manager's result types, for modules that build them in C.
cimport cython


@cython.final
cdef class AppendResult:
    cdef readonly object slots      # int64 cache slot of every new token
    cdef readonly object copy_src   # int32 copy-on-write sources
    cdef readonly object copy_dst   # int32 copy-on-write destinations


# An empty AppendResult, made before a change so that making it cannot fail after.
cdef AppendResult new_result()
