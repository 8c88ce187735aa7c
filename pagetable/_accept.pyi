# The acceptance layer has no Python-level names: its functions are cdef, for cimport.
