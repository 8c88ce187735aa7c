# The manager's result types, for modules that build them in C.
cimport cython
from libc.stdint cimport int64_t


@cython.final
cdef class AppendResult:
    cdef readonly object slots      # int64 cache slot of every new token
    cdef readonly object copy_src   # int32 copy-on-write sources
    cdef readonly object copy_dst   # int32 copy-on-write destinations
    cdef readonly int64_t num_cached_tokens   # prompt tokens found in the prefix cache
    cdef readonly object lookahead_slots      # int64 slots reserved for draft tokens


# An empty AppendResult, made before a change so that making it cannot fail after.
cdef AppendResult new_result()
