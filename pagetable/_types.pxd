# Fixed-width C types, named once and reused by every extension module.
from libc.stdint cimport int32_t, int64_t, uint64_t

ctypedef int32_t block_id_t    # physical block id; what attention kernels take
ctypedef int64_t seq_id_t      # sequence id, 0 .. 2**63 - 1
ctypedef int64_t slot_t        # block_id * block_size + offset
ctypedef int32_t row_t         # internal row index of a sequence, -1 for none

# The one sentinel for "nothing here"; exported to Python as pagetable.PAD_SLOT_ID.
cdef enum:
    PAD = -1
