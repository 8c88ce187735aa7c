"""A slow, obviously-correct pure-Python model of the KV-cache manager.

Same API and the same decisions as :class:`pagetable.KVCacheManager` and
:class:`pagetable.BlockAllocator` (same block handed out next, same copy-on-write
copies, same errors; with prefix caching the same hits, evictions, events and
counters, rule by rule from ``docs/PREFIX_CACHING.md``), built from dicts and lists
of Python ints.  The tests hold the
Cython classes against it and ``python -m pagetable simulate`` times both side by side.
Nothing here is tuned for speed: every rule is spelled out one block at a time.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pagetable._convert import INT64_MAX, as_index, as_int_array, check_range
# The exception and the result container are shared with the Cython manager, so that
# callers catch one OutOfBlocksError; every decision below is plain Python.
from pagetable._results import AppendResult, OutOfBlocksError
from pagetable._table import PAD_SLOT_ID
# The event and statistics types too: plain containers, no decisions in them.
from pagetable.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from pagetable.prefix import PrefixCacheStats
from pagetable.reference.prefix import (
    EVENT_HASH_FORMATS,
    TOKEN_ID_MAX,
    block_extra_keys,
    event_extra_keys,
    event_hash,
    hash_function,
    lora_of,
    none_hash_seed,
)

BLOCK_ID_MAX = 2**31 - 1


def _result(slots: list[int], copy_src: list[int], copy_dst: list[int],
            num_cached_tokens: int = 0) -> AppendResult:
    return AppendResult(
        np.array(slots, dtype=np.int64),
        np.array(copy_src, dtype=np.int32),
        np.array(copy_dst, dtype=np.int32),
        num_cached_tokens,
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


def _token_ids(values: object, name: str = "token_ids") -> list[int]:
    """Token ids as Python ints, each checked to lie in 0..2**31-1 (below: ValueError,
    above: OverflowError, as for every range the package checks)."""
    ids = [int(t) for t in as_int_array(values, name)]
    for i, t in enumerate(ids):
        if t < 0:
            raise ValueError(f"{name}[{i}] = {t} is negative; token ids are 0..2**31-1")
        if t > TOKEN_ID_MAX:
            raise OverflowError(f"{name}[{i}] = {t} does not fit in int32; token ids are 0..2**31-1")
    return ids


class ReferenceKVCacheManager:
    """Reference KV-cache manager: ``{seq_id: [block, ...]}`` and ``{seq_id: tokens}``.

    With ``enable_prefix_caching=True`` it also keeps the prefix cache of
    ``docs/PREFIX_CACHING.md``: a dict ``hash -> block``, each block's registration,
    and the LRU list of cached-free blocks (head first).  Whether caching is on or
    not, it records the token id every slot of every block holds (``None`` where the
    caller gave no ids) and each sequence's own token list, so that the tests can
    see that a sequence's blocks hold exactly its tokens.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        enable_prefix_caching: bool = False,
        hash_algorithm: str = "sha256",
        hash_seed: str | int | None = None,
        enable_kv_cache_events: bool = False,
        event_hash_format: str = "int",
        medium: str = "GPU",
        data_parallel_rank: int | None = None,
    ) -> None:
        block_size = check_range(as_index(block_size, "block_size"), 1, BLOCK_ID_MAX, "block_size")
        num_blocks = check_range(as_index(num_blocks, "num_blocks"), 1, BLOCK_ID_MAX, "num_blocks")
        if num_blocks * block_size > BLOCK_ID_MAX:
            raise ValueError(
                f"num_blocks * block_size must be below 2**31, got {num_blocks} * {block_size}"
            )
        if event_hash_format not in EVENT_HASH_FORMATS:
            raise ValueError(f"event_hash_format must be 'int' or 'bytes', got {event_hash_format!r}")
        if not isinstance(medium, str):
            raise TypeError(f"medium must be a str, got {type(medium).__name__}")
        if data_parallel_rank is not None:
            check_range(as_index(data_parallel_rank, "data_parallel_rank"), 0, BLOCK_ID_MAX, "data_parallel_rank")
        if enable_kv_cache_events and not enable_prefix_caching:
            # Events describe what the prefix cache holds: without one there are none.
            raise ValueError("enable_kv_cache_events=True needs enable_prefix_caching=True")
        self._hash = hash_function(hash_algorithm)
        self._none_hash = self._hash(none_hash_seed(hash_algorithm, hash_seed))
        self._hash_algorithm = hash_algorithm
        self._caching = bool(enable_prefix_caching)
        self._events_on = bool(enable_kv_cache_events)
        self._event_hash_format = event_hash_format
        self._medium = medium
        self._data_parallel_rank = data_parallel_rank
        self._block_size = block_size
        self._allocator = ReferenceBlockAllocator(num_blocks)
        self._blocks: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}
        # What every slot holds: per block, the token ids written so far, in order.
        self._contents: list[list[int | None]] = [[] for _ in range(num_blocks)]
        self._token_ids: dict[int, list[int | None]] = {}
        self._extra_keys: dict[int, Any] = {}
        # The content hash of each full block of each sequence (caching on only).
        self._hashes: dict[int, list[bytes]] = {}
        # The prefix cache: the map, each registered block's hash (with the parent
        # hash and extra keys it was computed from, for check()), and the LRU list.
        self._cache: dict[bytes, int] = {}
        self._registered: dict[int, bytes] = {}
        self._registered_from: dict[int, tuple[bytes, tuple[Any, ...] | None]] = {}
        self._lru: list[int] = []
        self._requests = self._queries = self._hits = self._evictions = 0
        self._events: list[Any] = []

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
        """Free blocks plus cached-free blocks: both can be taken."""
        return self._allocator.num_free + len(self._lru)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self._allocator.num_blocks

    @property
    def enable_prefix_caching(self) -> bool:
        return self._caching

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(requests=self._requests, queries=self._queries,
                                hits=self._hits, evictions=self._evictions)

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

    # -- the prefix cache, one rule at a time -----------------------------------------
    def _chain(self, parent: bytes | None, token_ids: list[int | None], extra_keys: Any,
               first: int) -> list[bytes]:
        """Hashes of the full blocks ``first, first+1, ...`` of ``token_ids`` (the
        sequence's whole token list), chained on from ``parent`` (h[first-1])."""
        size = self._block_size
        hashes: list[bytes] = []
        for k in range(first, len(token_ids) // size):
            block = token_ids[k * size:(k + 1) * size]
            if any(t is None for t in block):
                break
            before = hashes[-1] if hashes else (self._none_hash if parent is None else parent)
            hashes.append(self._hash((before, tuple(block), block_extra_keys(extra_keys, k, size))))
        return hashes

    def _hit_length(self, hashes: list[bytes], num_tokens: int) -> int:
        """H: the registered run at the head of ``hashes``, capped so that the last
        token is always computed."""
        cap = (num_tokens - 1) // self._block_size if num_tokens else 0
        hit = 0
        while hit < min(len(hashes), cap) and hashes[hit] in self._cache:
            hit += 1
        return hit

    def _take(self, n: int) -> list[int]:
        """``n`` fresh blocks: the free stack's top while it lasts, then the LRU head
        (evicted: its hash leaves the map and a BlockRemoved is recorded)."""
        taken = []
        for _ in range(n):
            if self._allocator._free_stack:
                block = self._allocator._free_stack.pop()
            else:
                block = self._lru.pop(0)
                block_hash = self._registered.pop(block)
                del self._registered_from[block]
                del self._cache[block_hash]
                self._evictions += 1
                self._record(BlockRemoved(block_hashes=[self._event_hash(block_hash)],
                                          medium=self._medium, group_idx=0))
            self._allocator._refcount[block] = 1
            self._contents[block] = []
            taken.append(block)
        return taken

    def _release(self, block: int) -> None:
        """One reference fewer; at none, to the LRU tail if registered, else to the
        free stack."""
        self._allocator._refcount[block] -= 1
        if self._allocator._refcount[block] == 0:
            if block in self._registered:
                self._lru.append(block)
            else:
                self._allocator._free_stack.append(block)

    def _register(self, seq: int, first: int) -> None:
        """Register the sequence's full blocks from ``first`` on, in order, each unless
        its hash is already taken, and record one BlockStored per run of registered
        blocks."""
        size = self._block_size
        hashes = self._hashes[seq]
        extra_keys = self._extra_keys[seq]
        runs: list[list[int]] = []
        for k in range(first, len(hashes)):
            block_hash = hashes[k]
            if block_hash in self._cache:
                continue
            block = self._blocks[seq][k]
            parent = hashes[k - 1] if k else self._none_hash
            self._cache[block_hash] = block
            self._registered[block] = block_hash
            self._registered_from[block] = (parent, block_extra_keys(extra_keys, k, size))
            if runs and runs[-1][-1] == k - 1:
                runs[-1].append(k)
            else:
                runs.append([k])
        lora_id, lora_name = lora_of(extra_keys)
        tokens = self._token_ids[seq]
        for run in runs:
            entries = [event_extra_keys(extra_keys, k, size) for k in run]
            self._record(BlockStored(
                block_hashes=[self._event_hash(hashes[k]) for k in run],
                parent_block_hash=self._event_hash(hashes[run[0] - 1]) if run[0] else None,
                token_ids=[int(t) for t in tokens[run[0] * size:(run[-1] + 1) * size]],  # type: ignore[arg-type]
                block_size=size,
                lora_id=lora_id,
                medium=self._medium,
                lora_name=lora_name,
                extra_keys=entries,
                group_idx=0,
            ))

    def _event_hash(self, block_hash: bytes) -> int | bytes:
        return event_hash(block_hash, self._event_hash_format)

    def _record(self, event: Any) -> None:
        if self._events_on:
            self._events.append(event)

    def _write(self, seq: int, start: int, token_ids: list[int | None]) -> None:
        """Put ``token_ids`` at positions ``start, ...`` of the sequence's blocks."""
        size = self._block_size
        for offset, token in enumerate(token_ids):
            position = start + offset
            contents = self._contents[self._blocks[seq][position // size]]
            if len(contents) != position % size:
                raise AssertionError(f"sequence {seq} writes position {position} out of order")
            contents.append(token)
        self._token_ids[seq].extend(token_ids)

    def _adopt_sequence(self, seq: int, blocks: list[int], num_tokens: int) -> None:
        """Take over a sequence of another manager whose token ids are unknown (a
        mirror of a Cython manager's state); the reference counts are set apart."""
        size = self._block_size
        self._blocks[seq] = list(blocks)
        self._tokens[seq] = num_tokens
        self._token_ids[seq] = [None] * num_tokens
        self._extra_keys[seq] = None
        for j, b in enumerate(blocks):
            self._contents[b] = [None] * min(size, num_tokens - j * size)

    # -- growth -----------------------------------------------------------------------
    def add_sequence(self, seq_id: object, num_tokens: object = None, token_ids: object = None,
                     extra_keys: Any = None) -> AppendResult:
        seq = _seq_id(seq_id, "seq_id")
        ids: list[int | None] | None = None
        if token_ids is not None:
            ids = list(_token_ids(token_ids))
        elif self._caching:
            raise ValueError("token_ids is required when prefix caching is on")
        if extra_keys is not None and not self._caching:
            raise ValueError("extra_keys is only used with enable_prefix_caching=True")
        if num_tokens is None:
            if ids is None:
                raise TypeError("add_sequence needs num_tokens or token_ids")
            n = len(ids)
        else:
            n = as_index(num_tokens, "num_tokens")
            if n < 0:
                raise ValueError(f"num_tokens must be >= 0, got {n}")
            if ids is not None and len(ids) != n:
                raise ValueError(f"num_tokens = {n} but token_ids holds {len(ids)} tokens")
        if seq in self._blocks:
            raise ValueError(f"seq_id = {seq} already exists")
        # Every hash before anything changes: a key that cannot be hashed raises here.
        hashes = self._chain(None, ids, extra_keys, 0) if self._caching and ids is not None else []
        hit = self._hit_length(hashes, n)
        hit_blocks = [self._cache[h] for h in hashes[:hit]]
        need = self._blocks_for(n) - hit
        available = self.num_free_blocks - sum(1 for b in hit_blocks if self._allocator._refcount[b] == 0)
        if need > available:
            raise OutOfBlocksError(need, available)
        if ids is None:
            ids = [None] * n
        for block in hit_blocks:
            if self._allocator._refcount[block] == 0:
                self._lru.remove(block)
            self._allocator._refcount[block] += 1
        self._blocks[seq] = hit_blocks + self._take(need)
        self._tokens[seq] = n
        self._token_ids[seq] = list(ids[:hit * self._block_size])
        self._extra_keys[seq] = extra_keys
        self._write(seq, hit * self._block_size, ids[hit * self._block_size:])
        slots = [self._slot(seq, p) for p in range(hit * self._block_size, n)]
        if not self._caching:
            return _result(slots, [], [])
        self._hashes[seq] = hashes
        self._register(seq, hit)
        self._requests += 1
        self._queries += n
        self._hits += hit * self._block_size
        return _result(slots, [], [], hit * self._block_size)

    def add_sequences(self, seq_ids: object, token_ids: object, extra_keys: object = None) -> list[AppendResult]:
        """``add_sequence`` of each prompt in order, stopping at the first that does not
        fit; every argument is checked before any is added."""
        ids = [int(s) for s in as_int_array(seq_ids, "seq_ids")]
        if not isinstance(token_ids, (list, tuple)):
            raise TypeError(f"token_ids must be a list of arrays, one per sequence, got {type(token_ids).__name__}")
        if len(token_ids) != len(ids):
            raise ValueError(f"token_ids has {len(token_ids)} prompts for {len(ids)} seq_ids")
        if extra_keys is None:
            extra_keys = [None] * len(ids)
        elif not isinstance(extra_keys, (list, tuple)) or len(extra_keys) != len(ids):
            raise ValueError(f"extra_keys must be None or a list of {len(ids)} entries (one per prompt)")
        seen: set[int] = set()
        for i, s in enumerate(ids):
            if s < 0:
                raise ValueError(f"seq_ids[{i}] = {s} is negative; sequence ids are 0..2**63-1")
            if s in seen:
                raise ValueError(f"seq_ids[{i}] = {s} appears more than once")
            if s in self._blocks:
                raise ValueError(f"seq_ids[{i}] = {s} already exists")
            seen.add(s)
            try:
                _token_ids(token_ids[i])
                if extra_keys[i] is not None and not self._caching:
                    raise ValueError("extra_keys is only used with enable_prefix_caching=True")
            except (TypeError, ValueError, OverflowError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
        results = []
        for s, tokens, keys in zip(ids, token_ids, extra_keys):
            try:
                results.append(self.add_sequence(s, token_ids=tokens, extra_keys=keys))
            except OutOfBlocksError:
                break
        return results

    def _slot(self, seq: int, position: int) -> int:
        block = self._blocks[seq][position // self._block_size]
        return block * self._block_size + position % self._block_size

    def append_tokens(self, seq_ids: object, num_new_tokens: object = 1,
                      token_ids: object = None) -> AppendResult:
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        flat: list[int | None] | None = None
        if token_ids is not None:
            flat = list(_token_ids(token_ids))
            if len(flat) != sum(counts):
                raise ValueError(
                    f"token_ids must hold one id per new token ({sum(counts)}), got {len(flat)}"
                )
        elif self._caching:
            raise ValueError("token_ids is required when prefix caching is on")
        need = self._plan(ids, counts)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(need, self.num_free_blocks)
        # Each sequence's new token ids (unknown ones as None, now that they fit).
        new_tokens: list[list[int | None]] = []
        start = 0
        for k in counts:
            new_tokens.append(flat[start:start + k] if flat is not None else [None] * k)
            start += k
        # Every hash before anything changes.
        new_hashes = {}
        if self._caching:
            for s, tokens in zip(ids, new_tokens):
                known = self._hashes[s]
                new_hashes[s] = self._chain(known[-1] if known else None,
                                            self._token_ids[s] + tokens, self._extra_keys[s], len(known))
        fresh = self._take(need)
        slots: list[int] = []
        copy_src: list[int] = []
        copy_dst: list[int] = []
        for s, k, tokens in zip(ids, counts, new_tokens):
            if k == 0:
                continue
            length = self._tokens[s]
            blocks = self._blocks[s]
            if length % self._block_size:
                last = blocks[-1]
                if self._allocator._refcount[last] > 1:
                    copy = fresh.pop(0)
                    copy_src.append(last)
                    copy_dst.append(copy)
                    self._contents[copy] = list(self._contents[last])
                    self._release(last)
                    blocks[-1] = copy
            while len(blocks) < self._blocks_for(length + k):
                blocks.append(fresh.pop(0))
            self._write(s, length, tokens)
            for p in range(length, length + k):
                slots.append(self._slot(s, p))
            self._tokens[s] = length + k
            if self._caching:
                first = len(self._hashes[s])
                self._hashes[s].extend(new_hashes[s])
                self._register(s, first)
        return _result(slots, copy_src, copy_dst)

    def can_append(self, seq_ids: object, num_new_tokens: object = 1) -> bool:
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        return self._plan(ids, counts) <= self.num_free_blocks

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
        self._token_ids[child] = list(self._token_ids[parent])
        self._extra_keys[child] = self._extra_keys[parent]
        if self._caching:
            self._hashes[child] = list(self._hashes[parent])

    def free_sequence(self, seq_ids: object) -> None:
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids = [seq_ids]
        ids = self._known(seq_ids, distinct=True)
        for s in ids:
            blocks = self._blocks.pop(s)
            # Last block first with caching on, so that a tail is evicted before its head.
            for b in reversed(blocks) if self._caching else blocks:
                self._release(b)
            del self._tokens[s]
            del self._token_ids[s]
            del self._extra_keys[s]
            self._hashes.pop(s, None)

    def reset_prefix_cache(self) -> int:
        """Unregister every block; cached-free blocks go to the free stack, LRU head
        first.  Returns the number of hashes dropped."""
        dropped = len(self._cache)
        self._allocator._free_stack.extend(self._lru)
        self._lru = []
        self._cache.clear()
        self._registered.clear()
        self._registered_from.clear()
        self._record(AllBlocksCleared())
        return dropped

    def count_cached_tokens(self, token_ids: object, extra_keys: Any = None) -> int:
        """Tokens an ``add_sequence`` of this prompt would find cached now."""
        ids: list[int | None] = list(_token_ids(token_ids))
        if not self._caching:
            return 0
        return self._hit_length(self._chain(None, ids, extra_keys, 0), len(ids)) * self._block_size

    def take_events(self) -> KVEventBatch:
        if not self._events_on:
            raise RuntimeError("take_events() needs enable_kv_cache_events=True")
        events, self._events = self._events, []
        return KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self._data_parallel_rank)

    # -- queries ----------------------------------------------------------------------
    def block_tokens(self, block_id: object) -> list[int | None]:
        """The token ids block ``block_id`` holds now, slot by slot (a block keeps what
        it holds until it is taken again; ``None`` where no id was given)."""
        block = as_index(block_id, "block_id")
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block_id = {block} is out of range 0..{self.num_blocks - 1}")
        return list(self._contents[block])

    def sequence_tokens(self, seq_id: object) -> list[int | None]:
        """The sequence's token ids, position by position."""
        seq = _seq_id(seq_id, "seq_id")
        if seq not in self._blocks:
            raise KeyError(f"seq_id = {seq} is not a sequence of this manager")
        return list(self._token_ids[seq])

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
        size = self._block_size
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
        if len(set(self._lru)) != len(self._lru):
            raise AssertionError("the LRU list holds a block twice")
        if any(references[b] for b in self._lru):
            raise AssertionError("the LRU list holds a referenced block")
        if set(free) & set(self._lru):
            raise AssertionError("a block is both on the free stack and on the LRU list")
        if len(free) + len(self._lru) + sum(1 for c in references if c) != self.num_blocks:
            raise AssertionError("free, cached-free and used blocks do not partition the pool")
        if any(b not in self._registered for b in self._lru):
            raise AssertionError("the LRU list holds an unregistered block")
        if any(b in self._registered for b in free):
            raise AssertionError("the free stack holds a registered block")
        # The map and each block's registration say the same, one to one.
        if len(self._cache) != len(self._registered):
            raise AssertionError("the map and the blocks' registrations differ in size")
        for block_hash, b in self._cache.items():
            if self._registered.get(b) != block_hash:
                raise AssertionError(f"the map names block {b}, which is not registered under that hash")
        # Every registered block's hash is its chain, recomputed from what it holds.
        for b, block_hash in self._registered.items():
            contents = self._contents[b]
            if len(contents) != size or any(t is None for t in contents):
                raise AssertionError(f"registered block {b} is not full of known tokens")
            parent, extra = self._registered_from[b]
            if self._hash((parent, tuple(contents), extra)) != block_hash:
                raise AssertionError(f"registered block {b}'s hash is not that of its contents")
        for s, blocks in self._blocks.items():
            # A sequence's blocks hold exactly its tokens.
            tokens = self._token_ids[s]
            if len(tokens) != self._tokens[s]:
                raise AssertionError(f"sequence {s} records {len(tokens)} token ids for {self._tokens[s]} tokens")
            for j, b in enumerate(blocks):
                if self._contents[b] != tokens[j * size:(j + 1) * size]:
                    raise AssertionError(f"block {b} does not hold sequence {s}'s tokens {j * size}..")
            if self._caching:
                # Its content hashes are the chain of its own tokens.
                if self._hashes[s] != self._chain(None, tokens, self._extra_keys[s], 0):
                    raise AssertionError(f"sequence {s}'s block hashes are not the chain of its tokens")
                for j, block_hash in enumerate(self._hashes[s]):
                    registered = self._registered.get(blocks[j])
                    if registered is not None and registered != block_hash:
                        raise AssertionError(f"sequence {s}'s block {j} is registered under another hash")
        if not self._caching and (self._cache or self._lru):
            raise AssertionError("a manager without prefix caching holds cached blocks")

    def __repr__(self) -> str:
        return (
            f"ReferenceKVCacheManager(num_blocks={self.num_blocks}, block_size={self._block_size}, "
            f"sequences={len(self._blocks)}, free_blocks={self.num_free_blocks})"
        )
