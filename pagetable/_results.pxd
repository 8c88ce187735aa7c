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


@cython.final
cdef class AdmissionResult:
    cdef readonly object slots              # int64 slots of every computed token, prompt by prompt
    cdef readonly object num_cached_tokens  # int64 per prompt
    cdef readonly object query_start_loc    # int64 [n + 1]: prompt i's slots are [loc[i], loc[i+1])


# An empty AppendResult, made before a change so that making it cannot fail after.
cdef AppendResult new_result()
