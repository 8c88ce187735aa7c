# Memory for the compiled modules has no Python-level names: its functions are cdef, for cimport.
