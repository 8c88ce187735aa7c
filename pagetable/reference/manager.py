"""A slow, obviously-correct pure-Python model of the KV-cache manager.

Same API and the same decisions as :class:`pagetable.KVCacheManager` and
:class:`pagetable.BlockAllocator` (same block handed out next, same copy-on-write
copies, same errors), built from dicts and lists of Python ints.  The tests hold the
Cython classes against it and ``python -m pagetable simulate`` times both side by side.
Nothing here is tuned for speed: every rule is spelled out one block at a time.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from pagetable._convert import INT64_MAX, as_index, as_int_array, check_range
# The exception and the result container are shared with the Cython manager, so that
# callers catch one OutOfBlocksError; every decision below is plain Python.
from pagetable._results import AppendResult, OutOfBlocksError

from pagetable._table import PAD_SLOT_ID
BLOCK_ID_MAX = 2**31 - 1


def _result(slots: list[int], copy_src: list[int], copy_dst: list[int]) -> AppendResult:
    return AppendResult(
        np.array(slots, dtype=np.int64),
        np.array(copy_src, dtype=np.int32),
        np.array(copy_dst, dtype=np.int32),
    )


class ReferenceBlockAllocator:
    """Reference block allocator: a list of reference counts and a LIFO free stack."""

    def __init__(self, num_blocks: int) -> None:
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, BLOCK_ID_MAX, "num_blocks")
        self._refcount = [0] * num_blocks
        # Top of the stack is the end of the list; block 0 is handed out first.
        self._free_stack = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return len(self._refcount)

    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    def _ids(self, block_ids: object) -> list[int]:
        ids = [int(b) for b in as_int_array(block_ids, "block_ids")]
        for i, b in enumerate(ids):
            if not 0 <= b < len(self._refcount):
                raise ValueError(f"block_ids[{i}] = {b} is out of range 0..{len(self._refcount) - 1}")
        return ids

    def allocate(self, n: int) -> np.ndarray:
        n = as_index(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free_stack):
            raise OutOfBlocksError(n, len(self._free_stack))
        taken = []
        for _ in range(n):
            block = self._free_stack.pop()
            self._refcount[block] = 1
            taken.append(block)
        return np.array(taken, dtype=np.int32)

    def free(self, block_ids: object) -> None:
        ids = self._ids(block_ids)
        pending: dict[int, int] = {}
        for i, b in enumerate(ids):
            pending[b] = pending.get(b, 0) + 1
            if pending[b] > self._refcount[b]:
                raise ValueError(f"block_ids[{i}] = {b} is already free")
        for b in ids:
            self._release(b)

    def _release(self, block: int) -> None:
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free_stack.append(block)

    def incref(self, block_ids: object) -> None:
        ids = self._ids(block_ids)
        for i, b in enumerate(ids):
            if self._refcount[b] == 0:
                raise ValueError(f"block_ids[{i}] = {b} is free; only allocated blocks can be shared")
        for b in ids:
            self._refcount[b] += 1

    def refcount(self, block_ids: object) -> np.ndarray:
        return np.array([self._refcount[b] for b in self._ids(block_ids)], dtype=np.int32)


def _seq_id(value: object, name: str) -> int:
    return check_range(as_index(value, name), 0, INT64_MAX, name)


class ReferenceKVCacheManager:
    """Reference KV-cache manager: ``{seq_id: [block, ...]}`` and ``{seq_id: tokens}``."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        block_size = check_range(as_index(block_size, "block_size"), 1, BLOCK_ID_MAX, "block_size")
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, BLOCK_ID_MAX, "num_blocks")
        if num_blocks * block_size > BLOCK_ID_MAX:
            raise ValueError(
                f"num_blocks * block_size must be below 2**31, got {num_blocks} * {block_size}"
            )
        self._block_size = block_size
        self._allocator = ReferenceBlockAllocator(num_blocks)
        self._blocks: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}

    # -- properties -------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def allocator(self) -> ReferenceBlockAllocator:
        return self._allocator

    @property
    def num_blocks(self) -> int:
        return self._allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._allocator.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self._allocator.num_free / self._allocator.num_blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._blocks

    # -- helpers ----------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self._block_size)

    def _known(self, seq_ids: object, name: str = "seq_ids", distinct: bool = False) -> list[int]:
        """The ids, checked entry by entry in order: negative, unknown, or (when
        ``distinct``) repeated; the first bad entry names the error."""
        ids = [int(s) for s in as_int_array(seq_ids, name)]
        seen: set[int] = set()
        for i, s in enumerate(ids):
            if s < 0:
                raise ValueError(f"{name}[{i}] = {s} is negative; sequence ids are 0..2**63-1")
            if s not in self._blocks:
                raise KeyError(f"{name}[{i}] = {s} is not a sequence of this manager")
            if distinct:
                if s in seen:
                    raise ValueError(f"{name}[{i}] = {s} appears more than once")
                seen.add(s)
        return ids

    def _counts(self, num_new_tokens: object, n: int) -> list[int]:
        if isinstance(num_new_tokens, np.ndarray) and num_new_tokens.ndim == 0:
            num_new_tokens = num_new_tokens.item()
        if isinstance(num_new_tokens, (list, tuple, np.ndarray)):
            counts = [int(c) for c in as_int_array(num_new_tokens, "num_new_tokens")]
            if len(counts) != n:
                raise ValueError(
                    f"num_new_tokens must have one entry per sequence ({n}), got {len(counts)}"
                )
        else:
            # One count for every sequence: checked as itself, even for no sequence.
            count = as_index(num_new_tokens, "num_new_tokens")
            if count < 0:
                raise ValueError(f"num_new_tokens[0] = {count} is negative")
            if count > INT64_MAX:
                raise OverflowError(f"num_new_tokens = {count} does not fit in 64 bits")
            counts = [count] * n
        for i, c in enumerate(counts):
            if c < 0:
                raise ValueError(f"num_new_tokens[{i}] = {c} is negative")
        return counts

    def _plan(self, ids: list[int], counts: list[int]) -> int:
        """Blocks the call needs: new blocks plus one per copy-on-write, in input order."""
        need = 0
        pending_release: dict[int, int] = {}
        for s, k in zip(ids, counts):
            if k == 0:
                continue
            tokens = self._tokens[s]
            blocks = self._blocks[s]
            if tokens % self._block_size:
                last = blocks[-1]
                if self._allocator._refcount[last] - pending_release.get(last, 0) > 1:
                    need += 1
                    pending_release[last] = pending_release.get(last, 0) + 1
            need += self._blocks_for(tokens + k) - len(blocks)
        return need

    # -- growth -----------------------------------------------------------------------
    def add_sequence(self, seq_id: object, num_tokens: object) -> AppendResult:
        seq = _seq_id(seq_id, "seq_id")
        n = as_index(num_tokens, "num_tokens")
        if n < 0:
            raise ValueError(f"num_tokens must be >= 0, got {n}")
        if seq in self._blocks:
            raise ValueError(f"seq_id = {seq} already exists")
        need = self._blocks_for(n)
        if need > self._allocator.num_free:
            raise OutOfBlocksError(need, self._allocator.num_free)
        self._blocks[seq] = [int(b) for b in self._allocator.allocate(need)]
        self._tokens[seq] = n
        slots = [self._slot(seq, p) for p in range(n)]
        return _result(slots, [], [])

    def _slot(self, seq: int, position: int) -> int:
        block = self._blocks[seq][position // self._block_size]
        return block * self._block_size + position % self._block_size

    def append_tokens(self, seq_ids: object, num_new_tokens: object = 1) -> AppendResult:
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        need = self._plan(ids, counts)
        if need > self._allocator.num_free:
            raise OutOfBlocksError(need, self._allocator.num_free)
        slots: list[int] = []
        copy_src: list[int] = []
        copy_dst: list[int] = []
        for s, k in zip(ids, counts):
            if k == 0:
                continue
            tokens = self._tokens[s]
            blocks = self._blocks[s]
            if tokens % self._block_size:
                last = blocks[-1]
                if self._allocator._refcount[last] > 1:
                    fresh = int(self._allocator.allocate(1)[0])
                    copy_src.append(last)
                    copy_dst.append(fresh)
                    self._allocator._release(last)
                    blocks[-1] = fresh
            while len(blocks) < self._blocks_for(tokens + k):
                blocks.append(int(self._allocator.allocate(1)[0]))
            for p in range(tokens, tokens + k):
                slots.append(self._slot(s, p))
            self._tokens[s] = tokens + k
        return _result(slots, copy_src, copy_dst)

    def can_append(self, seq_ids: object, num_new_tokens: object = 1) -> bool:
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        return self._plan(ids, counts) <= self._allocator.num_free

    def fork(self, parent_id: object, child_id: object) -> None:
        parent = _seq_id(parent_id, "parent_id")
        child = _seq_id(child_id, "child_id")
        if parent not in self._blocks:
            raise KeyError(f"parent_id = {parent} is not a sequence of this manager")
        if child in self._blocks:
            raise ValueError(f"child_id = {child} already exists")
        blocks = self._blocks[parent]
        if blocks:
            self._allocator.incref(blocks)
        self._blocks[child] = list(blocks)
        self._tokens[child] = self._tokens[parent]

    def free_sequence(self, seq_ids: object) -> None:
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        ids = self._known(seq_ids, distinct=True)
        for s in ids:
            for b in self._blocks.pop(s):
                self._allocator._release(b)
            del self._tokens[s]

    # -- queries ----------------------------------------------------------------------
    def seq_lens(self, seq_ids: object) -> np.ndarray:
        return np.array([self._tokens[s] for s in self._known(seq_ids)], dtype=np.int32)

    def block_table(self, seq_ids: object) -> np.ndarray:
        ids = self._known(seq_ids)
        width = max((len(self._blocks[s]) for s in ids), default=0)
        table = np.full((len(ids), width), PAD_SLOT_ID, dtype=np.int32)
        for i, s in enumerate(ids):
            for j, b in enumerate(self._blocks[s]):
                table[i, j] = b
        return table

    def flashinfer_layout(self, seq_ids: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = self._known(seq_ids)
        indptr = [0]
        indices: list[int] = []
        last_page_len = []
        for s in ids:
            indices.extend(self._blocks[s])
            indptr.append(len(indices))
            tokens = self._tokens[s]
            last_page_len.append((tokens - 1) % self._block_size + 1 if tokens else 0)
        return (
            np.array(indptr, dtype=np.int32),
            np.array(indices, dtype=np.int32),
            np.array(last_page_len, dtype=np.int32),
        )

    def check(self) -> None:
        references = [0] * self.num_blocks
        for s, blocks in self._blocks.items():
            if len(blocks) != self._blocks_for(self._tokens[s]):
                raise AssertionError(
                    f"sequence {s} holds {self._tokens[s]} tokens in {len(blocks)} blocks"
                )
            for b in blocks:
                references[b] += 1
        for b, count in enumerate(references):
            if self._allocator._refcount[b] != count:
                raise AssertionError(
                    f"block {b}: refcount {self._allocator._refcount[b]}, table references {count}"
                )
        free = self._allocator._free_stack
        if len(set(free)) != len(free) or any(references[b] for b in free):
            raise AssertionError("free stack holds a duplicate or referenced block")
        if len(free) + sum(1 for c in references if c) != self.num_blocks:
            raise AssertionError("free and used blocks do not partition the pool")

    def __repr__(self) -> str:
        return (
            f"ReferenceKVCacheManager(num_blocks={self.num_blocks}, block_size={self._block_size}, "
            f"sequences={len(self._blocks)}, free_blocks={self.num_free_blocks})"
        )
