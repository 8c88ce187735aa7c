# A table's per-row metadata: one struct of arrays, all in one allocation.
#
# Row ``r`` is the metadata of one sequence: where its blocks sit in the pool, how
# many it has and has room for, its id, its insertion order and its change stamps.
# Every field is an array of ``capacity`` entries carved from one buffer, so growing
# is one allocation, one copy per field and one pointer switch.  To add a field, add
# it to ``Rows`` and give it one line in ``rows_layout``: nothing else lists them.
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy


cdef struct Rows:
    int64_t* start        # offset of the row's first block in the pool
    int32_t* length       # blocks mapped
    int32_t* capacity     # blocks reserved in the pool
    int64_t* seq          # sequence id, -1 for a free row
    int64_t* order        # insertion stamp, for iteration order
    int64_t* version      # stamp of the row's last change (PageTable.versions)
    int64_t* rewrite      # stamp of its last change other than an append
    int32_t* pending      # scratch for batched appends, all zero between calls
    int32_t* free_stack   # recycled rows, a stack (not per row: a row per entry)


cdef inline char* _field(char* base, Py_ssize_t* offset, Py_ssize_t itemsize, int64_t capacity,
                         const void* source, int64_t count) noexcept nogil:
    """Carve the next field (8-byte aligned) and copy ``count`` entries of ``source``."""
    cdef char* field = NULL
    if base != NULL:
        field = base + offset[0]
        if source != NULL and count > 0:
            memcpy(field, source, <size_t>count * <size_t>itemsize)
    offset[0] += ((<Py_ssize_t>capacity * itemsize + 7) // 8) * 8
    return field


cdef inline Py_ssize_t rows_layout(Rows* rows, char* base, int64_t capacity,
                                   const Rows* source, int64_t used, int64_t num_free) noexcept nogil:
    """Point ``rows`` into ``base`` for ``capacity`` rows; return the bytes that takes.

    With ``base`` NULL only the size is computed (the pointers are NULL).  With
    ``source``, each field's first ``used`` entries (``num_free`` for the free stack)
    are copied from it.
    """
    cdef Py_ssize_t at = 0
    cdef bint copy = source != NULL
    rows.start = <int64_t*>_field(base, &at, 8, capacity, source.start if copy else NULL, used)
    rows.length = <int32_t*>_field(base, &at, 4, capacity, source.length if copy else NULL, used)
    rows.capacity = <int32_t*>_field(base, &at, 4, capacity, source.capacity if copy else NULL, used)
    rows.seq = <int64_t*>_field(base, &at, 8, capacity, source.seq if copy else NULL, used)
    rows.order = <int64_t*>_field(base, &at, 8, capacity, source.order if copy else NULL, used)
    rows.version = <int64_t*>_field(base, &at, 8, capacity, source.version if copy else NULL, used)
    rows.rewrite = <int64_t*>_field(base, &at, 8, capacity, source.rewrite if copy else NULL, used)
    rows.pending = <int32_t*>_field(base, &at, 4, capacity, source.pending if copy else NULL, used)
    rows.free_stack = <int32_t*>_field(base, &at, 4, capacity,
                                       source.free_stack if copy else NULL, num_free)
    return at
