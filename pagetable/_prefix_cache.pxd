# The prefix cache of a KVCacheManager: block hashes, the hash -> block map, the token
# ids every block holds, and the events a KV-aware router reads.
#
# The manager owns one when prefix caching is on and calls it at four points: after
# each take (evictions), when blocks become full (hashing and registration), on a
# prompt's lookup, and on reset.  The block states live in the pool: the allocator's
# ``is_cached`` flag marks a registered block, and its cached-free list holds the
# registered blocks no sequence uses (see ``_allocator.pxd``).  The exact rules are in
# docs/PREFIX_CACHING.md.
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, INT64_MAX
from libc.string cimport memcmp, memcpy

from pagetable._types cimport block_id_t
from pagetable._allocator cimport BlockAllocator
from pagetable._idmap cimport IdMap, idmap_find, idmap_insert, idmap_remove


cdef enum:
    ALG_SHA256 = 0          # pickle + SHA-256 (vLLM's default)
    ALG_SHA256_CBOR = 1     # canonical CBOR + SHA-256
    ALG_XXHASH = 2          # pickle + XXH3-128
    ALG_XXHASH_CBOR = 3     # canonical CBOR + XXH3-128
    MAX_DIGEST = 32


cdef inline int64_t hash_key(const uint8_t* digest) noexcept nogil:
    """The map key of a digest: its first 8 bytes, top bit cleared (keys are >= 0).

    A key names a digest only up to 63 bits, so every hit is confirmed against the
    block's full digest; two digests sharing a key simply cannot both be registered.
    """
    cdef uint64_t key
    memcpy(&key, digest, 8)
    return <int64_t>(key & <uint64_t>INT64_MAX)


@cython.final
cdef class PrefixCache:
    cdef:
        BlockAllocator _allocator
        int32_t _num_blocks
        int64_t _block_size
        int _algorithm
        bint _cbor                  # CBOR serialisation (else pickle)
        int32_t digest_size
        str seed                    # the string NONE_HASH was derived from
        bytes none_hash
        object _digest_fn           # bytes -> digest bytes (the XXH3 algorithms)
        object _sha256              # hashlib.sha256 (the SHA-256 algorithms), else None
        bint _c_xxhash              # XXH3 digests by the compiled-in library
        object _cbor_dumps          # cbor2.dumps for extra keys (CBOR algorithms)
        IdMap _map                  # hash key -> block
        object _map_storage
        object _hash_arr            # uint8 [num_blocks * digest_size]: content hash
        object _parent_arr          # uint8 [num_blocks * digest_size]: its parent's hash
        object _known_arr           # uint8 [num_blocks]: content hash recorded
        object _tokens_arr          # int32 [num_blocks * block_size]: slot -> token id
        uint8_t* _hash
        uint8_t* _parent
        uint8_t* _known
        int32_t* tokens             # the manager writes each new token's id at its slot
        list _extra                 # per block: the tagged extra keys of its hash
        bint _extra_used            # some block has extra keys (else all None)
        object _buffer              # bytearray: one block's CBOR serialisation
        int64_t registered          # blocks in the map
        int64_t requests, queries, hits, evictions
        list events                 # None when events are off
        bint _int_hashes            # event hashes as ints (else bytes)
        str medium
        int32_t group_idx           # the KV-cache group events name
        object _stored, _removed, _cleared   # the event classes

    cdef inline const uint8_t* hash_of(self, block_id_t block) noexcept nogil:
        return self._hash + <int64_t>block * self.digest_size

    cdef inline bint is_known(self, block_id_t block) noexcept nogil:
        """Whether a content hash is recorded for what ``block`` holds."""
        return self._known[block] != 0

    cdef inline const uint8_t* root(self) noexcept:
        return <const uint8_t*><char*>self.none_hash

    # The hash block ``k`` of ``row`` chains to: NONE_HASH for block 0, else the hash
    # of block ``k - 1``, or ``chain`` (the sequence's kept chain tail) where a
    # window released that block (its entry is PAD).
    cdef inline const uint8_t* parent_of(self, const block_id_t* row, int64_t k,
                                         const uint8_t* chain) noexcept:
        if k == 0:
            return self.root()
        if row[k - 1] < 0:
            return chain
        return self._hash + <int64_t>row[k - 1] * self.digest_size

    cdef inline int32_t find(self, const uint8_t* digest) noexcept nogil:
        """The block registered under ``digest``, or -1."""
        cdef int32_t block = idmap_find(&self._map, hash_key(digest))
        if block >= 0 and memcmp(self._hash + <int64_t>block * self.digest_size,
                                 digest, self.digest_size) == 0:
            return block
        return -1

    cdef inline bint _register(self, block_id_t block) noexcept nogil:
        """Put ``block`` (content hash recorded) in the map unless its key is taken."""
        cdef int64_t key = hash_key(self._hash + <int64_t>block * self.digest_size)
        if idmap_find(&self._map, key) >= 0:
            return False
        idmap_insert(&self._map, key, block)
        self._allocator.set_cached(block, True)
        self.registered += 1
        return True

    cdef inline void _unregister(self, block_id_t block) noexcept nogil:
        idmap_remove(&self._map, hash_key(self._hash + <int64_t>block * self.digest_size))
        self._allocator.set_cached(block, False)
        self.registered -= 1

    cdef int compute(self, const uint8_t* parent, const int32_t* token_ids, object extra,
                     uint8_t* out) except -1
    cdef int prompt_hashes(self, const int32_t* token_ids, int64_t num_full, object keys,
                           uint8_t* out) except -1
    cdef int taken(self, const block_id_t* blocks, int64_t n) except -1
    cdef int filled(self, const block_id_t* row, int64_t first, int64_t end, object keys,
                    const uint8_t* digests, const uint8_t* chain=*) except -1
    cdef int record(self, const block_id_t* row, int64_t first, int64_t end, object keys,
                    const uint8_t* digests, const uint8_t* chain=*) except -1
    cdef int register(self, const block_id_t* row, int64_t first, int64_t end,
                      object keys, const uint8_t* chain=*) except -1
    cdef int _stored_event(self, const block_id_t* row, int64_t first, int64_t end,
                           object keys, const uint8_t* chain) except -1
    cdef int forget(self, block_id_t block) except -1
    cdef int64_t reset(self) except -1
    cdef object event_hash(self, const uint8_t* digest)
    cdef object recompute(self, block_id_t block)


cdef PrefixCache new_prefix_cache(BlockAllocator allocator, int64_t block_size,
                                  str algorithm, object seed, bint events,
                                  str event_hash_format, str medium)
