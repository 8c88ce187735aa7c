# The base of every stateful class: saving, loading, copying and pickling, written once.
cdef class Persistent:
    pass
