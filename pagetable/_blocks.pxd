# Block arithmetic: which block holds a token position, at what offset, and how many
# blocks hold a number of tokens.  One definition for every module; a power-of-two
# block size turns the divisions into shifts and masks.  Positions and token counts
# are non-negative.
from libc.stdint cimport int32_t, int64_t


cdef struct BlockGeometry:
    int64_t size        # tokens per block, >= 1
    int32_t shift       # log2(size) for a power of two, else -1
    int64_t mask        # size - 1 for a power of two, else 0


cdef inline BlockGeometry block_geometry(int64_t size) noexcept nogil:
    cdef BlockGeometry geometry
    geometry.size = size
    geometry.shift = -1
    geometry.mask = 0
    if size & (size - 1) == 0:
        geometry.shift = 0
        while (<int64_t>1 << geometry.shift) < size:
            geometry.shift += 1
        geometry.mask = size - 1
    return geometry


cdef inline int64_t block_index(const BlockGeometry* geometry, int64_t position) noexcept nogil:
    """The logical block holding token ``position``."""
    if geometry.shift >= 0:
        return position >> geometry.shift
    return position // geometry.size


cdef inline int64_t block_offset(const BlockGeometry* geometry, int64_t position) noexcept nogil:
    """Where token ``position`` sits within its block."""
    if geometry.shift >= 0:
        return position & geometry.mask
    return position % geometry.size


cdef inline int64_t blocks_for(const BlockGeometry* geometry, int64_t tokens) noexcept nogil:
    """Blocks that ``tokens`` tokens fill (the last one possibly in part)."""
    return block_index(geometry, tokens + geometry.size - 1)
