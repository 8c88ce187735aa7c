# The BlockAllocator's C interface, for the KV-cache manager.
#
# The caller of ``take`` / ``release`` / ``retain`` has checked their arguments: the
# manager plans every step (and checks every id) before it changes anything.
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t

from pagetable._types cimport block_id_t
from pagetable._guard cimport Guarded


@cython.final
cdef class BlockAllocator(Guarded):
    cdef:
        int32_t _num_blocks
        int32_t _num_free
        int64_t _shared           # blocks with reference count >= 2: only those are ever copied
        object _refcount_arr      # int32 [num_blocks]
        object _free_stack_arr    # int32 [num_blocks]; entries 0 .. _num_free - 1 are free
        int32_t[::1] _refcount
        int32_t[::1] _free_stack
        # The cached-free blocks of a prefix-caching manager (see enable_lru): a doubly
        # linked list through two int32 arrays, head = least recently freed.  A block
        # with ``_cached[b]`` set is registered in the manager's prefix cache; at
        # reference count 0 it sits on this list instead of the free stack.  All NULL
        # / empty for a pool without a cache.
        object _lru_arr           # int32 [2 * num_blocks]: previous, then next links
        object _cached_arr        # uint8 [num_blocks]
        int32_t* _lru_prev
        int32_t* _lru_next
        uint8_t* _cached
        int32_t _lru_head         # -1 when empty
        int32_t _lru_tail
        int32_t _num_lru

    # ---- the interface the manager uses -------------------------------------------
    cdef inline int32_t block_count(self) noexcept nogil:
        return self._num_blocks

    cdef inline int32_t free_count(self) noexcept nogil:
        """Blocks that can be handed out: the free stack plus the cached-free list."""
        return self._num_free + self._num_lru

    cdef inline int32_t stack_count(self) noexcept nogil:
        """Blocks on the free stack (never cached, or cached no longer)."""
        return self._num_free

    cdef inline int32_t lru_count(self) noexcept nogil:
        return self._num_lru

    cdef inline int32_t lru_head(self) noexcept nogil:
        return self._lru_head

    cdef inline int32_t lru_next(self, int32_t block) noexcept nogil:
        return self._lru_next[block]

    # Reference counts, ``block_count()`` entries; read-only for callers.
    cdef inline int64_t shared_count(self) noexcept nogil:
        """Blocks held more than once.  0 means no write can need a copy, so a step
        skips the copy-on-write check (a random read per sequence)."""
        return self._shared

    cdef inline const int32_t* refcounts(self) noexcept nogil:
        return &self._refcount[0]

    # Whether ``block`` is registered in the prefix cache (always 0 without one).
    cdef inline bint is_cached(self, block_id_t block) noexcept nogil:
        return self._cached != NULL and self._cached[block] != 0

    cdef inline void set_cached(self, block_id_t block, bint cached) noexcept nogil:
        """Mark a block (re)registered or dropped; the caller keeps the lists right.

        Dropping a cached-free block must go through ``drop_cached_free`` instead, so
        that it moves from the list to the free stack.
        """
        self._cached[block] = cached

    cdef inline void _lru_unlink(self, block_id_t block) noexcept nogil:
        cdef int32_t before = self._lru_prev[block], after = self._lru_next[block]
        if before >= 0:
            self._lru_next[before] = after
        else:
            self._lru_head = after
        if after >= 0:
            self._lru_prev[after] = before
        else:
            self._lru_tail = before
        self._lru_prev[block] = -1
        self._lru_next[block] = -1
        self._num_lru -= 1

    cdef inline void _lru_append(self, block_id_t block) noexcept nogil:
        self._lru_prev[block] = self._lru_tail
        self._lru_next[block] = -1
        if self._lru_tail >= 0:
            self._lru_next[self._lru_tail] = block
        else:
            self._lru_head = block
        self._lru_tail = block
        self._num_lru += 1

    cdef inline void drop_cached_free(self, block_id_t block) noexcept nogil:
        """Unregister a cached-free block: it leaves the list for the free stack."""
        self._cached[block] = 0
        self._lru_unlink(block)
        self._free_stack[self._num_free] = block
        self._num_free += 1

    # The per-block loops are inline: the manager runs them once per sequence.
    cdef inline void take(self, int64_t n, block_id_t* out) noexcept nogil:
        """Pop ``n <= free_count()`` blocks into ``out``, each with reference count 1.

        The free stack first; once it is empty, the least recently freed cached-free
        block.  Such a block keeps ``is_cached`` set: the caller evicts it from the
        prefix cache (``set_cached(block, 0)``) and tells whoever listens.
        """
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            if self._num_free > 0:
                self._num_free -= 1
                block = self._free_stack[self._num_free]
            else:
                block = self._lru_head
                self._lru_unlink(block)
            self._refcount[block] = 1
            out[i] = block

    cdef inline void release(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """Drop one reference from each of ``n`` held blocks; a block reaching 0 is free.

        A cached block at 0 joins the tail of the cached-free list (it stays findable
        in the prefix cache until it is evicted); any other goes onto the free stack.
        """
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            block = blocks[i]
            self._refcount[block] -= 1
            if self._refcount[block] == 1:
                self._shared -= 1
            elif self._refcount[block] == 0:
                if self._cached != NULL and self._cached[block]:
                    self._lru_append(block)
                # The bound holds whenever counts match the table; it keeps a pool that
                # was tampered with from writing past its stack.
                elif self._num_free < self._num_blocks:
                    self._free_stack[self._num_free] = block
                    self._num_free += 1

    cdef inline void release_reversed(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """``release`` of ``blocks[n - 1], ..., blocks[0]``: a sequence's tail first."""
        cdef int64_t i
        for i in range(n - 1, -1, -1):
            self.release(blocks + i, 1)

    cdef inline void retain(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """Add one reference to each of ``n`` blocks, held or cached-free.

        A cached-free block (count 0) leaves the cached-free list: a prefix-cache hit
        revives it.
        """
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            block = blocks[i]
            if self._refcount[block] == 0 and self._lru_prev != NULL:
                self._lru_unlink(block)
            self._refcount[block] += 1
            if self._refcount[block] == 2:
                self._shared += 1

    # Give the pool a cached-free list (a prefix-caching manager does, once, at start).
    cdef int enable_lru(self) except -1
    # The cached-free list, head first, into an int32 array of ``block_count()``;
    # returns its length.
    cdef Py_ssize_t capture_lru(self, object out) noexcept
    # The cached flags as a uint8 array (a copy), or None without a cache.
    cdef object cached_flags(self)
    # Copy counts and stack into int32 arrays of ``block_count()``; return the stack height.
    cdef Py_ssize_t capture(self, object refcount, object free_stack) noexcept

    # ---- inside the allocator -------------------------------------------------------
    cdef int _check_writable(self) except -1
    cdef int64_t _check_ids(self, const int64_t[::1] ids) noexcept nogil
    cdef object _block_ids(self, block_ids)


# A pool with validated counts and stack (from ``_state.allocator_state``).
cdef BlockAllocator allocator_from_arrays(int64_t num_blocks, object refcount, object free_stack)
# Give a pool built by allocator_from_arrays its validated cached flags and list.
cdef int restore_lru(BlockAllocator allocator, object cached, object lru) except -1
