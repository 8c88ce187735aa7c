"""The prefix cache of a KVCacheManager (see ``_prefix_cache.pxd``).

Hashes are vLLM's, bit for bit (docs/PREFIX_CACHING.md): ``H((parent, tokens,
extra_keys))`` with ``H`` one of pickle/canonical-CBOR serialisation followed by
SHA-256 or XXH3-128.  The CBOR serialisation of the common case (no extra keys) is
written here in C, straight from RFC 8949's canonical rules for the three item kinds
it holds (a byte string, an array of unsigned ints, null); extra keys, and every
pickle, go through cbor2 and pickle themselves.  ``pagetable.prefix`` computes the
same hashes in plain Python and the tests hold the two equal.
"""

cimport cython
cimport numpy as cnp
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_GET_SIZE, PyBytes_AS_STRING
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, INT64_MAX
from libc.string cimport memcmp, memcpy, memset

from pagetable._types cimport block_id_t
from pagetable._allocator cimport BlockAllocator
from pagetable._idmap cimport (IdMap, idmap_attach, idmap_find, idmap_insert, idmap_prefetch,
                               idmap_remove, idmap_storage)

import pickle

import numpy as np

from pagetable import prefix
from pagetable.prefix import event_extra_keys

cnp.import_array()

cdef extern from *:
    """
    #if defined(PAGETABLE_HAVE_XXHASH)
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    #define PAGETABLE_C_XXHASH 1
    /* XXH3-128 in its canonical (big-endian) bytes, as xxhash.xxh3_128_digest gives. */
    static inline void pagetable_xxh3_128(const void* data, size_t n, unsigned char* out) {
        XXH128_canonical_t canonical;
        XXH128_canonicalFromHash(&canonical, XXH3_128bits(data, n));
        memcpy(out, canonical.digest, 16);
    }
    #else
    #define PAGETABLE_C_XXHASH 0
    static inline void pagetable_xxh3_128(const void* data, size_t n, unsigned char* out) {
        (void)data; (void)n; (void)out;
    }
    #endif
    """
    bint C_XXHASH "PAGETABLE_C_XXHASH"
    void c_xxh3_128 "pagetable_xxh3_128"(const void* data, size_t n, unsigned char* out) noexcept nogil

# Whether block digests of the XXH3 algorithms are computed by the compiled-in xxHash
# library (else by the xxhash package); the tests and benchmarks report it.
C_XXHASH_COMPILED = bool(C_XXHASH)

cdef enum:
    # Ids per block that ``_pickle_block`` writes: 5 bytes each at most, so that a
    # block stays far inside one 64 KiB pickle frame.
    MAX_HAND_PICKLED = 8192

_ALGORITHMS = {"sha256": ALG_SHA256, "sha256_cbor": ALG_SHA256_CBOR,
               "xxhash": ALG_XXHASH, "xxhash_cbor": ALG_XXHASH_CBOR}


cdef inline Py_ssize_t _cbor_head(uint8_t* out, uint8_t major, uint64_t value) noexcept nogil:
    """A CBOR item head in its shortest form (RFC 8949 section 4.2.1); its length."""
    cdef int i
    major = major << 5
    if value < 24:
        out[0] = major | <uint8_t>value
        return 1
    if value < 0x100:
        out[0] = major | 24
        out[1] = <uint8_t>value
        return 2
    if value < 0x10000:
        out[0] = major | 25
        out[1] = <uint8_t>(value >> 8)
        out[2] = <uint8_t>value
        return 3
    if value < <uint64_t>0x100000000ULL:
        out[0] = major | 26
        out[1] = <uint8_t>(value >> 24)
        out[2] = <uint8_t>(value >> 16)
        out[3] = <uint8_t>(value >> 8)
        out[4] = <uint8_t>value
        return 5
    out[0] = major | 27
    for i in range(8):
        out[1 + i] = <uint8_t>(value >> (56 - 8 * i))
    return 9


cdef extern from *:
    """
    /* A token id (0 .. 2**31 - 1) as CBOR's shortest unsigned int, without branches:
       token ids are random, so the four lengths mispredict a branchy encoder every
       other id.  Always writes 5 bytes (the caller's buffer has room) and returns
       how many belong to the item: the head, then 0, 1, 2 or 4 big-endian bytes. */
    static inline Py_ssize_t pagetable_cbor_token(unsigned char* out, uint32_t value) {
        uint32_t one = value >= 24, two = value >= 0x100, four = value >= 0x10000;
        uint32_t extra = one + two + 2 * four;
        uint32_t shifted = (uint32_t)((uint64_t)value << (32 - 8 * extra));
        out[0] = (unsigned char)(one ? 23 + one + two + four : value);
        /* Byte by byte, so on any host; compilers make it one byte swap and store. */
        out[1] = (unsigned char)(shifted >> 24);
        out[2] = (unsigned char)(shifted >> 16);
        out[3] = (unsigned char)(shifted >> 8);
        out[4] = (unsigned char)shifted;
        return 1 + (Py_ssize_t)extra;
    }
    """
    Py_ssize_t _cbor_token "pagetable_cbor_token"(uint8_t* out, uint32_t value) noexcept nogil


cdef inline Py_ssize_t _cbor_block(uint8_t* out, const uint8_t* parent, int32_t digest_size,
                                   const int32_t* token_ids, int64_t count) noexcept nogil:
    """``[parent, [token ids...]`` of a block's 3-array, without its third item."""
    cdef Py_ssize_t n = _cbor_head(out, 4, 3)            # array of 3
    n += _cbor_head(out + n, 2, <uint64_t>digest_size)   # byte string
    memcpy(out + n, parent, <size_t>digest_size)
    n += digest_size
    n += _cbor_head(out + n, 4, <uint64_t>count)         # array of token ids
    cdef int64_t i
    for i in range(count):
        n += _cbor_token(out + n, <uint32_t>token_ids[i])   # ids are >= 0
    return n



cdef extern from *:
    """
    /* A token id (0 .. 2**31 - 1) as pickle writes an int: BININT1, BININT2 or
       BININT with 1, 2 or 4 little-endian bytes; branch-free like the CBOR one. */
    static inline Py_ssize_t pagetable_pickle_token(unsigned char* out, uint32_t value) {
        uint32_t two = value >= 0x100, four = value >= 0x10000;
        out[0] = (unsigned char)(0x4B + 2 * two - 3 * four);   /* 'K', 'M', 'J' */
        out[1] = (unsigned char)value;                          /* little-endian on any host */
        out[2] = (unsigned char)(value >> 8);
        out[3] = (unsigned char)(value >> 16);
        out[4] = (unsigned char)(value >> 24);
        return 2 + (Py_ssize_t)(two + 2 * four);
    }
    """
    Py_ssize_t _pickle_int "pagetable_pickle_token"(uint8_t* out, uint32_t value) noexcept nogil


cdef inline Py_ssize_t _pickle_block(uint8_t* out, const uint8_t* parent, int32_t digest_size,
                                     const int32_t* token_ids, int64_t count) noexcept nogil:
    """``pickle.dumps((parent, tuple(token_ids), None), protocol=5)``, byte for byte.

    What CPython's pickler writes for that one shape: the protocol, one frame, the
    parent as SHORT_BINBYTES, the ids as BININT1/2/BININT in a MARK ... TUPLE (or
    TUPLE1..3 for up to three), None, TUPLE3, with a MEMOIZE after each bytes and
    tuple object.  Only for frames below 64 KiB (the pickler's frame size), which
    ``compute`` checks; the tests hold it against pickle itself.
    """
    cdef Py_ssize_t n = 11, frame
    cdef int64_t i
    out[0] = 0x80                          # PROTO 5
    out[1] = 5
    out[2] = 0x95                          # FRAME, its 8-byte length filled in below
    out[n] = 0x43                          # SHORT_BINBYTES
    out[n + 1] = <uint8_t>digest_size
    memcpy(out + n + 2, parent, <size_t>digest_size)
    n += 2 + digest_size
    out[n] = 0x94                          # MEMOIZE
    n += 1
    if count > 3:
        out[n] = 0x28                      # MARK
        n += 1
    for i in range(count):
        n += _pickle_int(out + n, <uint32_t>token_ids[i])
    out[n] = 0x74 if count > 3 else 0x84 + <uint8_t>count   # TUPLE, or TUPLE1 .. TUPLE3
    out[n + 1] = 0x94                      # MEMOIZE
    out[n + 2] = 0x4E                      # NONE
    out[n + 3] = 0x87                      # TUPLE3
    out[n + 4] = 0x94                      # MEMOIZE
    out[n + 5] = 0x2E                      # STOP
    n += 6
    frame = n - 11
    for i in range(8):
        out[3 + i] = <uint8_t>(frame >> (8 * i))
    return n


@cython.final
cdef class PrefixCache:
    """Block hashes, the hash -> block map and the token ids of every block (C use only)."""

    def __cinit__(self):
        self._allocator = None
        self.events = None
        self._extra = None

    # -- hashing --------------------------------------------------------------------
    cdef int compute(self, const uint8_t* parent, const int32_t* token_ids, object extra,
                     uint8_t* out) except -1:
        """The hash of one full block into ``out`` (``digest_size`` bytes)."""
        cdef Py_ssize_t n
        cdef object data
        cdef uint8_t* buffer = <uint8_t*>PyByteArray_AS_STRING(self._buffer)
        if self._cbor:
            n = _cbor_block(buffer, parent, self.digest_size, token_ids, self._block_size)
            if extra is None:
                buffer[n] = 0xF6   # null
                if self._c_xxhash:
                    c_xxh3_128(buffer, n + 1, out)
                    return 0
                data = PyBytes_FromStringAndSize(<char*>buffer, n + 1)
            else:
                data = (PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._buffer), n)
                        + self._cbor_dumps(extra, canonical=True))
        elif extra is None and self._block_size <= MAX_HAND_PICKLED:
            n = _pickle_block(buffer, parent, self.digest_size, token_ids, self._block_size)
            if self._c_xxhash:
                c_xxh3_128(buffer, n, out)
                return 0
            data = PyBytes_FromStringAndSize(<char*>buffer, n)
        else:
            data = pickle.dumps(
                (PyBytes_FromStringAndSize(<const char*>parent, self.digest_size),
                 tuple([token_ids[i] for i in range(self._block_size)]), extra),
                protocol=pickle.HIGHEST_PROTOCOL)
        if self._sha256 is not None:
            digest = self._sha256(data).digest()
        elif self._c_xxhash:
            c_xxh3_128(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), out)
            return 0
        else:
            digest = self._digest_fn(data)
        if type(digest) is not bytes or PyBytes_GET_SIZE(digest) != self.digest_size:
            raise RuntimeError(f"the hash function returned {digest!r}, not {self.digest_size} bytes")
        memcpy(out, PyBytes_AS_STRING(digest), <size_t>self.digest_size)
        return 0

    cdef int prompt_hashes(self, const int32_t* token_ids, int64_t num_full, object keys,
                           uint8_t* out) except -1:
        """The chained hashes of a prompt's first ``num_full`` blocks, one after another."""
        cdef int64_t k
        cdef const uint8_t* parent = self.root()
        for k in range(num_full):
            self.compute(parent, token_ids + k * self._block_size,
                         None if keys is None else keys._keys(k, self._block_size),
                         out + k * self.digest_size)
            parent = out + k * self.digest_size
        return 0

    cdef object event_hash(self, const uint8_t* digest):
        """A hash as events carry it: the low 64 bits read big-endian, or the bytes."""
        cdef uint64_t value = 0
        cdef int i
        if not self._int_hashes:
            return PyBytes_FromStringAndSize(<const char*>digest, self.digest_size)
        for i in range(self.digest_size - 8, self.digest_size):
            value = (value << 8) | digest[i]
        return value

    cdef object recompute(self, block_id_t block):
        """The hash of ``block`` recomputed from its parent, tokens and extra keys (bytes)."""
        out = bytearray(self.digest_size)
        self.compute(self._parent + <int64_t>block * self.digest_size,
                     self.tokens + <int64_t>block * self._block_size,
                     self._extra[block] if self._extra_used else None,
                     <uint8_t*>PyByteArray_AS_STRING(out))
        return bytes(out)

    # -- the map ----------------------------------------------------------------------
    # -- the manager's calls ------------------------------------------------------------
    cdef int taken(self, const block_id_t* blocks, int64_t n) except -1:
        """After a take: evict the cached-free blocks among ``blocks``; forget their contents."""
        cdef int64_t i
        for i in range(n):
            if self._allocator.is_cached(blocks[i]):
                self.evictions += 1
            self.forget(blocks[i])
        return 0

    cdef int forget(self, block_id_t block) except -1:
        """A block's content is no longer final (a truncation cut into it): drop its hash.

        A registered block leaves the map (one ``BlockRemoved`` event); either way it
        is no longer known, so it is hashed afresh when it fills again.
        """
        if self._allocator.is_cached(block):
            if self.events is not None:
                self.events.append(self._removed(
                    [self.event_hash(self._hash + <int64_t>block * self.digest_size)],
                    self.medium, self.group_idx))
            self._unregister(block)
        self._known[block] = 0
        if self._extra_used:
            self._extra[block] = None
        return 0

    cdef int filled(self, const block_id_t* row, int64_t first, int64_t end, object keys,
                    const uint8_t* digests, const uint8_t* chain=NULL) except -1:
        """Blocks ``row[first .. end - 1]`` of one sequence just became full.

        ``record`` then ``register`` (see there): what a call whose blocks fill in one
        sequence does.
        """
        self.record(row, first, end, keys, digests, chain)
        return self.register(row, first, end, keys, chain)

    cdef int record(self, const block_id_t* row, int64_t first, int64_t end, object keys,
                    const uint8_t* digests, const uint8_t* chain=NULL) except -1:
        """Record the content hashes of blocks ``row[first .. end - 1]``, just full.

        Each comes from ``digests`` (one per block) when the caller has them, else is
        computed from the token ids the block holds.  The map slot each will probe is
        prefetched: a decode step records every block that filled, then registers
        them, so that the map's cache misses overlap instead of queueing.
        """
        cdef int64_t k
        cdef block_id_t block
        cdef const uint8_t* parent
        cdef uint8_t* digest
        for k in range(first, end):
            block = row[k]
            parent = self.parent_of(row, k, chain)
            if parent == NULL:
                raise AssertionError("a released block's chain tail is missing (internal error)")
            extra = None if keys is None else keys._keys(k, self._block_size)
            digest = self._hash + <int64_t>block * self.digest_size
            if digests != NULL:
                memcpy(digest, digests + (k - first) * self.digest_size, <size_t>self.digest_size)
            else:
                self.compute(parent, self.tokens + <int64_t>block * self._block_size, extra, digest)
            idmap_prefetch(&self._map, hash_key(digest))
            memcpy(self._parent + <int64_t>block * self.digest_size, parent, <size_t>self.digest_size)
            self._known[block] = 1
            if extra is not None:
                if not self._extra_used:
                    self._extra = [None] * self._num_blocks
                    self._extra_used = True
                self._extra[block] = extra
            elif self._extra_used:
                self._extra[block] = None
        return 0

    cdef int register(self, const block_id_t* row, int64_t first, int64_t end,
                      object keys, const uint8_t* chain=NULL) except -1:
        """Register recorded blocks ``row[first .. end - 1]`` in order, each unless its
        hash is taken; one ``BlockStored`` event per run of consecutive registered ones."""
        cdef int64_t k, run = -1
        for k in range(first, end):
            if self._register(row[k]):
                if run < 0:
                    run = k
            elif run >= 0:
                self._stored_event(row, run, k, keys, chain)
                run = -1
        if run >= 0:
            self._stored_event(row, run, end, keys, chain)
        return 0

    cdef int _stored_event(self, const block_id_t* row, int64_t first, int64_t end,
                           object keys, const uint8_t* chain) except -1:
        if self.events is None:
            return 0
        cdef int64_t k, i, B = self._block_size
        cdef const int32_t* held
        hashes = [self.event_hash(self._hash + <int64_t>row[k] * self.digest_size)
                  for k in range(first, end)]
        token_ids = []
        for k in range(first, end):
            held = self.tokens + <int64_t>row[k] * B
            token_ids.extend([held[i] for i in range(B)])
        parent = None if first == 0 else self.event_hash(self.parent_of(row, first, chain))
        # One entry per block, None where a block has no keys (as vLLM publishes them).
        lora_id = lora_name = None
        if keys is None:
            extra_keys = [None] * (end - first)
        else:
            extra_keys = [event_extra_keys(keys._keys(k, B)) for k in range(first, end)]
            lora_id = keys.lora_id
            lora_name = keys.lora_name
        self.events.append(self._stored(hashes, parent, token_ids, B, lora_id, self.medium,
                                        lora_name, extra_keys, self.group_idx))
        return 0

    cdef int64_t reset(self) except -1:
        """Unregister every block: cached-free ones go to the free stack, head first."""
        cdef int64_t dropped = self.registered
        cdef int32_t block, after
        block = self._allocator.lru_head()
        while block >= 0:
            after = self._allocator.lru_next(block)
            self._allocator.drop_cached_free(block)
            block = after
        cdef int64_t slot
        for slot in range(self._map.mask + 1):
            if self._map.keys[slot] >= 0:
                self._allocator.set_cached(self._map.values[slot], False)
                self._map.keys[slot] = -1
                self._map.values[slot] = -1
        self.registered = 0
        if self.events is not None:
            self.events.append(self._cleared())
        return dropped

    # -- for check() and the state ------------------------------------------------------
    def _arrays(self):
        """Copies of (content hashes, parent hashes, known flags, token store)."""
        return (self._hash_arr.copy(), self._parent_arr.copy(), self._known_arr.copy(),
                self._tokens_arr.copy())

    def _block_extra(self, block):
        return self._extra[block] if self._extra_used else None

    def _lookup(self, digest):
        """The block registered under ``digest`` (bytes), or -1."""
        if len(digest) != self.digest_size:
            return -1
        return self.find(<const uint8_t*><char*>digest)


cdef PrefixCache new_prefix_cache(BlockAllocator allocator, int64_t block_size,
                                  str algorithm, object seed, bint events,
                                  str event_hash_format, str medium):
    """A prefix cache for ``allocator``'s pool (arguments checked by the manager)."""
    cdef PrefixCache cache = PrefixCache.__new__(PrefixCache)
    cdef int64_t num_blocks = allocator.block_count()
    cache._allocator = allocator
    cache._num_blocks = <int32_t>num_blocks
    cache._block_size = block_size
    cache._algorithm = _ALGORITHMS[algorithm]
    cache._cbor = cache._algorithm in (ALG_SHA256_CBOR, ALG_XXHASH_CBOR)
    cache.digest_size = prefix.digest_size(algorithm)
    cache.seed = prefix.resolve_seed(algorithm, seed)
    cache.none_hash = prefix.none_hash(algorithm, cache.seed)
    cache._sha256 = None
    cache._c_xxhash = False
    if cache._algorithm in (ALG_SHA256, ALG_SHA256_CBOR):
        import hashlib
        cache._sha256 = hashlib.sha256
    else:
        import xxhash
        cache._digest_fn = xxhash.xxh3_128_digest
        cache._c_xxhash = C_XXHASH
    if cache._cbor:
        import cbor2
        cache._cbor_dumps = cbor2.dumps
    # A block's CBOR head: array, byte string, token array heads (<= 9 + 2 + 9 bytes),
    # the parent, 5 bytes per id, and the null.
    cache._buffer = bytearray(32 + MAX_DIGEST + 5 * block_size)   # enough for pickle's too
    cdef int64_t capacity = 16
    while capacity < 2 * num_blocks:
        capacity *= 2
    cache._map_storage = idmap_storage(capacity)
    idmap_attach(&cache._map, cache._map_storage)
    cache._hash_arr = np.zeros(num_blocks * cache.digest_size, dtype=np.uint8)
    cache._parent_arr = np.zeros(num_blocks * cache.digest_size, dtype=np.uint8)
    cache._known_arr = np.zeros(num_blocks, dtype=np.uint8)
    cache._tokens_arr = np.zeros(num_blocks * block_size, dtype=np.int32)
    # Touched now, at construction: numpy's zeros are lazily mapped pages, and the
    # first write to each (blocks are first used mid-step) costs a page fault there,
    # a third of a decode step's time while the pool is first filled.
    for array in (cache._hash_arr, cache._parent_arr, cache._known_arr, cache._tokens_arr):
        array.fill(0)
    cache._hash = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>cache._hash_arr)
    cache._parent = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>cache._parent_arr)
    cache._known = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>cache._known_arr)
    cache.tokens = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>cache._tokens_arr)
    cache._extra = None
    cache._extra_used = False
    cache.registered = 0
    cache.requests = cache.queries = cache.hits = cache.evictions = 0
    cache._int_hashes = event_hash_format == "int"
    cache.medium = medium
    if events:
        from pagetable import events as event_types
        # The unchecked constructors: everything the cache passes has the right type.
        cache._stored = event_types._block_stored
        cache._removed = event_types._block_removed
        cache._cleared = event_types.AllBlocksCleared
        cache.events = []
    allocator.enable_lru()
    return cache
