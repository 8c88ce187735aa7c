# Memory for the compiled modules has no Python-level names: its functions are cdef, for cimport.

__pyx_capi__: dict[str, object]  # C functions for cimport
__test__: dict[str, str]
