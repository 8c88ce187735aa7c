# An open-addressing map from non-negative int64 ids to int32 values, for nogil code.
#
# Linear probing with Fibonacci hashing; removal is backward-shift deletion, so there
# are no tombstones and lookups never degrade after churn.  Empty slots hold key -1,
# which is why keys must be >= 0.  The map does not own memory: its owner allocates
# its storage with ``idmap_storage`` and points the struct at it with ``idmap_attach``;
# growing means attaching a larger storage and filling it with ``idmap_insert``.
# Every operation is ``cdef inline`` so that a kernel in another module probes it at
# no call cost.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memset

from pagetable._buffers cimport i32, i64, zeroed


cdef extern from *:
    """
    #define PAGETABLE_FIBONACCI 0x9E3779B97F4A7C15ULL
    #if defined(__GNUC__) || defined(__clang__)
    #define PAGETABLE_PREFETCH(address) __builtin_prefetch(address)
    #else
    #define PAGETABLE_PREFETCH(address) ((void)(address))
    #endif
    """
    uint64_t IDMAP_FIBONACCI "PAGETABLE_FIBONACCI"
    void prefetch "PAGETABLE_PREFETCH"(const void* address) noexcept nogil


cdef enum:
    IDMAP_EMPTY = -1


cdef struct IdMap:
    int64_t* keys       # capacity entries; IDMAP_EMPTY where unused
    int32_t* values
    int64_t mask        # capacity - 1
    int32_t shift       # 64 - log2(capacity): the slot is the hash's top bits


cdef inline uint64_t idmap_home(int64_t key, int32_t shift) noexcept nogil:
    """The slot where ``key``'s probe starts."""
    return (<uint64_t>key * IDMAP_FIBONACCI) >> shift


cdef inline int32_t idmap_shift_for(int64_t capacity) noexcept nogil:
    """``shift`` of a map with ``capacity`` (a power of two) slots."""
    cdef int32_t bits = 0
    while (<int64_t>1 << bits) < capacity:
        bits += 1
    return 64 - bits


cdef inline object idmap_storage(int64_t capacity):
    """``(keys, values)`` arrays for a map of ``capacity`` slots (a power of two), all empty.

    Allocating may let another thread run (a large array is a mapping of its own);
    the caller attaches the storage afterwards, at a point where no other thread can.
    """
    keys = zeroed(capacity, cnp.NPY_INT64)
    # Every byte 0xFF: each key reads as IDMAP_EMPTY (-1).
    memset(cnp.PyArray_DATA(<cnp.ndarray>keys), 0xFF, <size_t>capacity * sizeof(int64_t))
    return keys, zeroed(capacity, cnp.NPY_INT32)


cdef inline void idmap_attach(IdMap* map, object storage) noexcept:
    """Point ``map`` at ``storage`` from ``idmap_storage`` (the caller keeps it alive)."""
    keys, values = storage
    cdef int64_t capacity = cnp.PyArray_DIM(<cnp.ndarray>keys, 0)
    map.keys = i64(keys)
    map.values = i32(values)
    map.mask = capacity - 1
    map.shift = idmap_shift_for(capacity)


cdef inline int32_t idmap_find(const IdMap* map, int64_t key) noexcept nogil:
    """Value of ``key`` (>= 0), or -1 if it is absent.

    A plain probe loop: the branch that finds a key in its home slot is predicted,
    so the value load issues before the key compare resolves.  Owners keep the map
    sparse to make that prediction right nearly every time.
    """
    cdef uint64_t mask = <uint64_t>map.mask
    cdef uint64_t slot = idmap_home(key, map.shift)
    cdef int64_t found
    while True:
        found = map.keys[slot]
        if found == key:
            return map.values[slot]
        if found == IDMAP_EMPTY:
            return -1
        slot = (slot + 1) & mask


cdef inline void idmap_prefetch(const IdMap* map, int64_t key) noexcept nogil:
    """Start loading the slot where ``key``'s probe will begin (a hint; no effect else)."""
    prefetch(&map.keys[idmap_home(key, map.shift)])


cdef inline void idmap_insert(IdMap* map, int64_t key, int32_t value) noexcept nogil:
    """Add ``key`` (>= 0, known absent); the owner keeps a free slot available."""
    cdef uint64_t slot = idmap_home(key, map.shift)
    while map.keys[slot] != IDMAP_EMPTY:
        slot = (slot + 1) & <uint64_t>map.mask
    map.keys[slot] = key
    map.values[slot] = value


cdef inline void idmap_remove(IdMap* map, int64_t key) noexcept nogil:
    """Remove ``key`` if present.

    Backward-shift deletion: later members of the probe chain move into the hole, so
    no tombstone is needed and every chain stays unbroken.
    """
    cdef uint64_t mask = <uint64_t>map.mask
    cdef uint64_t hole = idmap_home(key, map.shift)
    cdef uint64_t probe, home
    while map.keys[hole] != key:
        if map.keys[hole] == IDMAP_EMPTY:
            return
        hole = (hole + 1) & mask
    probe = hole
    while True:
        probe = (probe + 1) & mask
        if map.keys[probe] == IDMAP_EMPTY:
            break
        home = idmap_home(map.keys[probe], map.shift)
        # The entry at ``probe`` may move into ``hole`` only if its home slot is not
        # cyclically within (hole, probe].
        if hole <= probe:
            if hole < home and home <= probe:
                continue
        else:
            if hole < home or home <= probe:
                continue
        map.keys[hole] = map.keys[probe]
        map.values[hole] = map.values[probe]
        hole = probe
    map.keys[hole] = IDMAP_EMPTY
    map.values[hole] = -1


cdef inline int64_t idmap_count(const IdMap* map) noexcept nogil:
    """Number of keys held (a scan of every slot; for checks, not hot paths)."""
    cdef int64_t slot, count = 0
    for slot in range(map.mask + 1):
        count += map.keys[slot] != IDMAP_EMPTY
    return count
