# The BlockAllocator's C interface, for the KV-cache manager.
#
# The caller of ``take`` / ``release`` / ``retain`` has checked their arguments: the
# manager plans every step (and checks every id) before it changes anything.
cimport cython
from libc.stdint cimport int32_t, int64_t

from pagetable._types cimport block_id_t
from pagetable._guard cimport Guarded


@cython.final
cdef class BlockAllocator(Guarded):
    cdef:
        int32_t _num_blocks
        int32_t _num_free
        object _refcount_arr      # int32 [num_blocks]
        object _free_stack_arr    # int32 [num_blocks]; entries 0 .. _num_free - 1 are free
        int32_t[::1] _refcount
        int32_t[::1] _free_stack

    # ---- the interface the manager uses -------------------------------------------
    cdef inline int32_t block_count(self) noexcept nogil:
        return self._num_blocks

    cdef inline int32_t free_count(self) noexcept nogil:
        return self._num_free

    # Reference counts, ``block_count()`` entries; read-only for callers.
    cdef inline const int32_t* refcounts(self) noexcept nogil:
        return &self._refcount[0]

    # The per-block loops are inline: the manager runs them once per sequence.
    cdef inline void take(self, int64_t n, block_id_t* out) noexcept nogil:
        """Pop ``n <= free_count()`` blocks into ``out``, each with reference count 1."""
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            self._num_free -= 1
            block = self._free_stack[self._num_free]
            self._refcount[block] = 1
            out[i] = block

    cdef inline void release(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """Drop one reference from each of ``n`` held blocks; a block reaching 0 is free."""
        cdef int64_t i
        cdef block_id_t block
        for i in range(n):
            block = blocks[i]
            self._refcount[block] -= 1
            # The bound holds whenever counts match the table; it keeps a pool that
            # was tampered with from writing past its stack.
            if self._refcount[block] == 0 and self._num_free < self._num_blocks:
                self._free_stack[self._num_free] = block
                self._num_free += 1

    cdef inline void retain(self, const block_id_t* blocks, int64_t n) noexcept nogil:
        """Add one reference to each of ``n`` held blocks."""
        cdef int64_t i
        for i in range(n):
            self._refcount[blocks[i]] += 1
    # Copy counts and stack into int32 arrays of ``block_count()``; return the stack height.
    cdef Py_ssize_t capture(self, object refcount, object free_stack) noexcept

    # ---- inside the allocator -------------------------------------------------------
    cdef int _check_writable(self) except -1
    cdef int64_t _check_ids(self, const int64_t[::1] ids) noexcept nogil
    cdef object _block_ids(self, block_ids)


# A pool with validated counts and stack (from ``_state.allocator_state``).
cdef BlockAllocator allocator_from_arrays(int64_t num_blocks, object refcount, object free_stack)
