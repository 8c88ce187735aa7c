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

import math
import time
from typing import Any, NamedTuple

import numpy as np

from pagetable._admission import Admission
from pagetable._convert import INT64_MAX, as_index, as_int_array, check_range
# The exception and the result container are shared with the Cython manager, so that
# callers catch one OutOfBlocksError; every decision below is plain Python.
from pagetable._results import AdmissionResult, AppendResult, OutOfBlocksError
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


def _empty_result_has_lookahead() -> bool:
    empty = np.zeros(0, dtype=np.int64)
    return hasattr(AppendResult(empty, empty.astype(np.int32), empty.astype(np.int32)), "lookahead_slots")


# AppendResult gains lookahead_slots (its fifth argument) with docs/HYBRID.md; until the
# compiled class has it, the model's results leave it out (the slots are still decided).
APPEND_RESULT_HAS_LOOKAHEAD = _empty_result_has_lookahead()


def _result(slots: list[int], copy_src: list[int], copy_dst: list[int],
            num_cached_tokens: int = 0, lookahead_slots: list[int] | None = None) -> AppendResult:
    arguments: list[Any] = [
        np.array(slots, dtype=np.int64),
        np.array(copy_src, dtype=np.int32),
        np.array(copy_dst, dtype=np.int32),
        num_cached_tokens,
    ]
    if APPEND_RESULT_HAS_LOOKAHEAD:
        arguments.append(np.array(lookahead_slots or [], dtype=np.int64))
    return AppendResult(*arguments)


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


def _window_length(value: object, name: str) -> int | None:
    """A window or chunk length in tokens: None, or an int >= 1 (not a bool or float)."""
    if value is None:
        return None
    length = as_index(value, name)
    if length < 1:
        raise ValueError(f"{name} must be >= 1 (tokens), got {length}")
    return check_range(length, 1, INT64_MAX, name)


class _Either:
    """Membership in either of two maps: the prefix cache and what a call will add."""

    def __init__(self, first: dict[bytes, Any], second: dict[bytes, Any]) -> None:
        self._first, self._second = first, second

    def __contains__(self, key: object) -> bool:
        return key in self._first or key in self._second


class _Prompt(NamedTuple):
    """One prompt of an admission plan, everything decided."""

    seq: int
    num_tokens: int
    token_ids: list[int | None] | None   # None: unknown (no token_ids given)
    extra_keys: Any
    hashes: list[bytes]
    hit: int                  # H: blocks counted as cached
    low: int                  # lo(H): the row's leading PAD entries
    cached_now: list[int]     # block indices lo(H)..H-1 registered before the call


class _AdmissionPlan(NamedTuple):
    """Steps 1-3 of ``add_sequences``; ``_admit`` carries out step 4."""

    prompts: list[_Prompt]
    need: int
    available: int


class _AppendPlan(NamedTuple):
    """Every check and decision of ``append_tokens``; ``_append`` carries it out."""

    seq_ids: list[int]
    counts: list[int]
    new_tokens: list[list[int | None]]
    num_lookahead: int
    releases: list[tuple[int, list[int], int]]   # (seq, block indices released, new live)
    drops: list[int]          # registered blocks a sole holder writes into: hashes dropped
    new_hashes: dict[int, list[bytes]]
    need: int
    available: int


class ReferenceKVCacheManager:
    """Reference KV-cache manager: ``{seq_id: [block, ...]}`` and ``{seq_id: tokens}``.

    With ``enable_prefix_caching=True`` it also keeps the prefix cache of
    ``docs/PREFIX_CACHING.md``: a dict ``hash -> block``, each block's registration,
    and the LRU list of cached-free blocks (head first).  Whether caching is on or
    not, it records the token id every slot of every block holds (``None`` where the
    caller gave no ids) and each sequence's own token list, so that the tests can
    see that a sequence's blocks hold exactly its tokens.

    With a sliding window or chunked-local attention (``docs/HYBRID.md``) a row's
    entries before the sequence's ``live`` index are ``PAD_SLOT_ID``: blocks given
    back.  A sequence keeps the hash of every full block it ever held (of which the
    Cython manager keeps only the chain tail; the hashes agree).  A row may hold
    reserved lookahead blocks past the sequence's length.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        sliding_window: int | None = None,
        attention_chunk: int | None = None,
        group_idx: int = 0,
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
        window = _window_length(sliding_window, "sliding_window")
        chunk = _window_length(attention_chunk, "attention_chunk")
        if window is not None and chunk is not None:
            raise ValueError("give at most one of sliding_window and attention_chunk")
        group_idx = check_range(as_index(group_idx, "group_idx"), 0, BLOCK_ID_MAX, "group_idx")
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
        self._window = window
        self._chunk = chunk
        self._group_idx = group_idx
        self._allocator = ReferenceBlockAllocator(num_blocks)
        # Each sequence's row: PAD_SLOT_ID for released blocks, then held blocks
        # (reserved lookahead blocks past its length included).
        self._blocks: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}
        self._live: dict[int, int] = {}
        # Draft positions each sequence's last growth call reserved past its tokens.
        self._reserved: dict[int, int] = {}
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
    def sliding_window(self) -> int | None:
        return self._window

    @property
    def attention_chunk(self) -> int | None:
        return self._chunk

    @property
    def group_idx(self) -> int:
        return self._group_idx

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

    def _first_needed(self, position: int) -> int:
        """The first position the token at ``position`` attends to."""
        if self._window is not None:
            return max(0, position - self._window + 1)
        if self._chunk is not None:
            return position // self._chunk * self._chunk
        return 0

    def _low(self, hit: int) -> int:
        """lo(H): the first block a hit of ``hit`` blocks needs."""
        return self._first_needed(hit * self._block_size) // self._block_size

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

    def _counts(self, num_new_tokens: object, n: int, name: str = "num_new_tokens") -> list[int]:
        if isinstance(num_new_tokens, np.ndarray) and num_new_tokens.ndim == 0:
            num_new_tokens = num_new_tokens.item()
        if isinstance(num_new_tokens, (list, tuple, np.ndarray)):
            counts = [int(c) for c in as_int_array(num_new_tokens, name)]
            if len(counts) != n:
                raise ValueError(
                    f"{name} must have one entry per sequence ({n}), got {len(counts)}"
                )
        else:
            # One count for every sequence: checked as itself, even for no sequence.
            count = as_index(num_new_tokens, name)
            if count < 0:
                raise ValueError(f"{name}[0] = {count} is negative")
            if count > INT64_MAX:
                raise OverflowError(f"{name} = {count} does not fit in 64 bits")
            counts = [count] * n
        for i, c in enumerate(counts):
            if c < 0:
                raise ValueError(f"{name}[{i}] = {c} is negative")
        return counts

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

    def _mask(self, hashes: list[bytes], num_tokens: int, registered: Any = None) -> list[bool]:
        """Entry H: whether blocks lo(H)..H-1 of ``hashes`` are all registered (in the
        map, or in ``registered`` when given), for H = 0 .. min(F, (n-1)//B)."""
        size = self._block_size
        cap = min(num_tokens // size, max(0, (num_tokens - 1) // size))
        known = self._cache if registered is None else registered
        mask = [True]
        for hit in range(1, min(cap, len(hashes) if self._caching else 0) + 1):
            mask.append(all(hashes[k] in known for k in range(self._low(hit), hit)))
        # Past the known hashes (or without caching) no hit: the rest is False.
        return mask + [False] * (cap + 1 - len(mask))

    def _hit_length(self, hashes: list[bytes], num_tokens: int, registered: Any = None) -> int:
        """H: the largest hit the mask accepts (the last token is always computed)."""
        cap = min(num_tokens // self._block_size, max(0, (num_tokens - 1) // self._block_size))
        mask = self._mask(hashes, min(num_tokens, len(hashes) * self._block_size + 1)
                          if cap > len(hashes) else num_tokens, registered)
        return max(hit for hit, ok in enumerate(mask) if ok)

    def _take(self, n: int) -> list[int]:
        """``n`` fresh blocks: the free stack's top while it lasts, then the LRU head
        (evicted: its hash leaves the map and a BlockRemoved is recorded)."""
        taken = []
        for _ in range(n):
            if self._allocator._free_stack:
                block = self._allocator._free_stack.pop()
            else:
                block = self._lru.pop(0)
                self._evictions += 1
                self._unregister(block)
            self._allocator._refcount[block] = 1
            self._contents[block] = []
            taken.append(block)
        return taken

    def _unregister(self, block: int) -> None:
        """The block's hash leaves the map (a BlockRemoved event)."""
        block_hash = self._registered.pop(block)
        del self._registered_from[block]
        del self._cache[block_hash]
        self._record(BlockRemoved(block_hashes=[self._event_hash(block_hash)],
                                  medium=self._medium, group_idx=self._group_idx))

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
            # The parent is the chain tail even where block k-1 was released.
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
                group_idx=self._group_idx,
            ))

    def _event_hash(self, block_hash: bytes) -> int | bytes:
        return event_hash(block_hash, self._event_hash_format)

    def _record(self, event: Any) -> None:
        if self._events_on:
            self._events.append(event)

    def _write(self, seq: int, start: int, token_ids: list[int | None]) -> None:
        """Put ``token_ids`` at positions ``start, ...`` of the sequence's blocks.

        A block the sequence owns may hold more than its length (it was truncated
        while shared, then the others let go): the write replaces that tail."""
        size = self._block_size
        for offset, token in enumerate(token_ids):
            position = start + offset
            block = self._blocks[seq][position // size]
            contents = self._contents[block]
            if len(contents) > position % size:
                if self._allocator._refcount[block] != 1 or block in self._registered:
                    raise AssertionError(f"sequence {seq} overwrites position {position} in a shared or registered block")
                del contents[position % size:]
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
        self._live[seq] = 0
        self._token_ids[seq] = [None] * num_tokens
        self._extra_keys[seq] = None
        for j, b in enumerate(blocks):
            self._contents[b] = [None] * min(size, num_tokens - j * size)

    # -- admission --------------------------------------------------------------------
    def _prompt_arguments(self, n: object, token_ids: object, extra_keys: Any,
                          what: str) -> tuple[int, list[int | None] | None]:
        """One prompt's checks, as ``add_sequence`` makes them: (its length, its ids)."""
        ids: list[int | None] | None = None
        if token_ids is not None:
            ids = list(_token_ids(token_ids))
        elif self._caching:
            raise ValueError("token_ids is required when prefix caching is on")
        if extra_keys is not None and not self._caching:
            raise ValueError("extra_keys is only used with enable_prefix_caching=True")
        if n is None:
            if ids is None:
                raise TypeError(f"{what} needs num_tokens or token_ids")
            return len(ids), ids
        count = as_index(n, "num_tokens")
        if count < 0:
            raise ValueError(f"num_tokens must be >= 0, got {count}")
        if ids is not None and len(ids) != count:
            raise ValueError(f"num_tokens = {count} but token_ids holds {len(ids)} tokens")
        return count, ids

    def _plan_prompts(self, entries: list[tuple[int, int, list[int | None] | None, Any]],
                      hits: list[int] | None) -> _AdmissionPlan:
        """Steps 2-3: the hit of each prompt in order (against the map plus what the
        earlier prompts will register, unless ``hits`` fixes them), need, available."""
        will_register: dict[bytes, None] = {}
        prompts = []
        for i, (seq, n, ids, keys) in enumerate(entries):
            # Every hash before anything changes: a key that cannot be hashed raises here.
            hashes = self._chain(None, ids, keys, 0) if self._caching and ids is not None else []
            if hits is None:
                hit = self._hit_length(hashes, n, _Either(self._cache, will_register))
            else:
                hit = hits[i]
                mask = self._mask(hashes, n)
                if not 0 <= hit < len(mask) or not mask[hit]:
                    raise ValueError(f"hit_blocks[{i}] = {hit} is not a hit this manager can serve")
            low = self._low(hit)
            cached_now = [k for k in range(low, hit) if hashes[k] in self._cache]
            for k in range(hit, len(hashes)):
                if hashes[k] not in self._cache and hashes[k] not in will_register:
                    will_register[hashes[k]] = None
            prompts.append(_Prompt(seq, n, ids, keys, hashes, hit, low, cached_now))
        need = sum(self._blocks_for(p.num_tokens) - p.hit for p in prompts)
        hit_blocks = {self._cache[p.hashes[k]] for p in prompts for k in p.cached_now}
        available = self.num_free_blocks - sum(1 for b in hit_blocks if self._allocator._refcount[b] == 0)
        return _AdmissionPlan(prompts, need, available)

    def _admit(self, plan: _AdmissionPlan) -> list[AppendResult]:
        """Step 4 of ``add_sequences``: every hit block registered before the call
        gains its references first, then prompt by prompt one take, the row, the
        registration."""
        if plan.need > plan.available:
            raise OutOfBlocksError(plan.need, plan.available)
        size = self._block_size
        for p in plan.prompts:
            for k in p.cached_now:
                block = self._cache[p.hashes[k]]
                if self._allocator._refcount[block] == 0:
                    self._lru.remove(block)
                self._allocator._refcount[block] += 1
        results = []
        for p in plan.prompts:
            seq, n, hit, low = p.seq, p.num_tokens, p.hit, p.low
            token_ids: list[int | None] = p.token_ids if p.token_ids is not None else [None] * n
            hit_blocks = []
            for k in range(low, hit):
                block = self._cache[p.hashes[k]]     # registered now: before, or by an earlier prompt
                if k not in p.cached_now:
                    self._allocator._refcount[block] += 1
                hit_blocks.append(block)
            self._blocks[seq] = [PAD_SLOT_ID] * low + hit_blocks + self._take(self._blocks_for(n) - hit)
            self._tokens[seq] = n
            self._live[seq] = low
            self._token_ids[seq] = list(token_ids[:hit * size])
            self._extra_keys[seq] = p.extra_keys
            self._write(seq, hit * size, token_ids[hit * size:])
            slots = [self._slot(seq, q) for q in range(hit * size, n)]
            if not self._caching:
                results.append(_result(slots, [], []))
                continue
            self._hashes[seq] = p.hashes
            self._register(seq, hit)
            self._requests += 1
            self._queries += n
            self._hits += hit * size
            results.append(_result(slots, [], [], hit * size))
        return results

    def add_sequence(self, seq_id: object, num_tokens: object = None, token_ids: object = None,
                     extra_keys: Any = None) -> AppendResult:
        seq = _seq_id(seq_id, "seq_id")
        n, ids = self._prompt_arguments(num_tokens, token_ids, extra_keys, "add_sequence")
        if seq in self._blocks:
            raise ValueError(f"seq_id = {seq} already exists")
        return self._admit(self._plan_prompts([(seq, n, ids, extra_keys)], None))[0]

    def _admission_plan(self, seq_ids: object, num_tokens: object = None, token_ids: object = None,
                        extra_keys: object = None, hit_blocks: object = None) -> _AdmissionPlan:
        """Steps 1-3 of ``add_sequences``; ``hit_blocks`` (one H per prompt) fixes the
        hits instead, each one ``_hit_mask`` accepts, with no hits within the call."""
        ids = [int(s) for s in as_int_array(seq_ids, "seq_ids")]
        counts: list[Any]
        if num_tokens is None:
            counts = [None] * len(ids)
        elif isinstance(num_tokens, (list, tuple, np.ndarray)):
            counts = [int(c) for c in as_int_array(num_tokens, "num_tokens")]
            if len(counts) != len(ids):
                raise ValueError(f"num_tokens has {len(counts)} counts for {len(ids)} seq_ids")
        else:
            raise TypeError(f"num_tokens must be None or one count per sequence, got {type(num_tokens).__name__}")
        prompts: list[Any]
        if token_ids is None:
            if self._caching:
                raise ValueError("token_ids is required when prefix caching is on")
            if num_tokens is None:
                raise TypeError("add_sequences needs num_tokens or token_ids")
            prompts = [None] * len(ids)
        elif not isinstance(token_ids, (list, tuple)):
            raise TypeError(f"token_ids must be a list of arrays, one per sequence, got {type(token_ids).__name__}")
        elif len(token_ids) != len(ids):
            raise ValueError(f"token_ids has {len(token_ids)} prompts for {len(ids)} seq_ids")
        else:
            prompts = list(token_ids)
        keys: list[Any]
        if extra_keys is None:
            keys = [None] * len(ids)
        elif not isinstance(extra_keys, (list, tuple)) or len(extra_keys) != len(ids):
            raise ValueError(f"extra_keys must be None or a list of {len(ids)} entries (one per prompt)")
        else:
            keys = list(extra_keys)
        hits: list[int] | None = None
        if hit_blocks is not None:
            hits = [int(h) for h in as_int_array(hit_blocks, "hit_blocks")]
            if len(hits) != len(ids):
                raise ValueError(f"hit_blocks has {len(hits)} entries for {len(ids)} seq_ids")
        seen: set[int] = set()
        entries = []
        for i, s in enumerate(ids):
            if s < 0:
                raise ValueError(f"seq_ids[{i}] = {s} is negative; sequence ids are 0..2**63-1")
            if s in seen:
                raise ValueError(f"seq_ids[{i}] = {s} appears more than once")
            if s in self._blocks:
                raise ValueError(f"seq_ids[{i}] = {s} already exists")
            seen.add(s)
            try:
                n, tokens = self._prompt_arguments(counts[i], prompts[i], keys[i], "add_sequences")
            except (TypeError, ValueError, OverflowError) as error:
                raise type(error)(f"prompt {i}: {error}") from None
            entries.append((s, n, tokens, keys[i]))
        return self._plan_prompts(entries, hits)

    def add_sequences(self, seq_ids: object, num_tokens: object = None, token_ids: object = None,
                      extra_keys: object = None) -> AdmissionResult:
        """Admit every prompt or none (docs/HYBRID.md, "Batched admission")."""
        results = self._admit(self._admission_plan(seq_ids, num_tokens, token_ids, extra_keys))
        lengths = [len(r.slots) for r in results]
        return AdmissionResult(
            np.array([q for r in results for q in r.slots.tolist()], dtype=np.int64),
            np.array([r.num_cached_tokens for r in results], dtype=np.int64),
            np.array([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=np.int64))

    def can_admit(self, num_tokens: object, token_ids: object = None, extra_keys: Any = None,
                  watermark: object = 0.0) -> Admission:
        """Whether ``add_sequence`` of this prompt would fit now, and ever could."""
        if isinstance(watermark, (bool, np.bool_)) or not isinstance(watermark, (int, float, np.integer, np.floating)):
            raise TypeError(f"watermark must be a float in [0, 1), got {type(watermark).__name__}")
        if not 0.0 <= float(watermark) < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        ids: list[int | None] | None = None
        if token_ids is None:
            n = self._no_ids_count(num_tokens, extra_keys)
        else:
            n, ids = self._prompt_arguments(num_tokens, token_ids, extra_keys, "can_admit")
        hashes = self._chain(None, ids, extra_keys, 0) if self._caching and ids is not None else []
        hit = self._hit_length(hashes, n)
        low = self._low(hit)
        need = self._blocks_for(n) - hit
        hit_blocks = {self._cache[hashes[k]] for k in range(low, hit)}
        available = self.num_free_blocks - sum(1 for b in hit_blocks if self._allocator._refcount[b] == 0)
        kept = math.ceil(float(watermark) * self.num_blocks)
        return Admission(need <= available - kept, self._blocks_for(n) <= self.num_blocks - kept, need)

    def _no_ids_count(self, num_tokens: object, extra_keys: Any) -> int:
        """``can_admit`` without token ids: no hits, even with caching on."""
        if extra_keys is not None and not self._caching:
            raise ValueError("extra_keys is only used with enable_prefix_caching=True")
        if num_tokens is None:
            raise TypeError("can_admit needs num_tokens or token_ids")
        count = as_index(num_tokens, "num_tokens")
        if count < 0:
            raise ValueError(f"num_tokens must be >= 0, got {count}")
        return count

    def _hit_mask(self, token_ids: object, extra_keys: Any = None) -> np.ndarray:
        """Entry H: whether this manager could serve a hit of H blocks now."""
        ids: list[int | None] = list(_token_ids(token_ids))
        if extra_keys is not None and not self._caching:
            raise ValueError("extra_keys is only used with enable_prefix_caching=True")
        hashes = self._chain(None, ids, extra_keys, 0) if self._caching else []
        return np.array(self._mask(hashes, len(ids)), dtype=bool)

    def _slot(self, seq: int, position: int) -> int:
        block = self._blocks[seq][position // self._block_size]
        if block == PAD_SLOT_ID:
            raise AssertionError(f"sequence {seq}'s position {position} is in a released block")
        return block * self._block_size + position % self._block_size

    # -- growth -----------------------------------------------------------------------
    def _append_plan(self, seq_ids: object, num_new_tokens: object = 1, token_ids: object = None,
                     num_lookahead: object = 0) -> _AppendPlan:
        """Every check and decision of ``append_tokens``; changes nothing."""
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        lookahead = as_index(num_lookahead, "num_lookahead")
        if lookahead < 0:
            raise ValueError(f"num_lookahead must be >= 0, got {lookahead}")
        check_range(lookahead, 0, INT64_MAX, "num_lookahead")
        flat: list[int | None] | None = None
        if token_ids is not None:
            flat = list(_token_ids(token_ids))
            if len(flat) != sum(counts):
                raise ValueError(
                    f"token_ids must hold one id per new token ({sum(counts)}), got {len(flat)}"
                )
        elif self._caching:
            raise ValueError("token_ids is required when prefix caching is on")
        releases, drops, need, available = self._growth_plan(ids, counts, lookahead)
        # Each sequence's new token ids (unknown ones as None only once they fit: a
        # count too large for the pool must not build a list that large).
        new_tokens: list[list[int | None]] = []
        if flat is not None:
            start = 0
            for k in counts:
                new_tokens.append(flat[start:start + k])
                start += k
        # Every hash before anything changes.
        new_hashes = {}
        if self._caching:
            for s, tokens in zip(ids, new_tokens):
                known = self._hashes[s]
                new_hashes[s] = self._chain(known[-1] if known else None,
                                            self._token_ids[s] + tokens, self._extra_keys[s], len(known))
        return _AppendPlan(ids, counts, new_tokens, lookahead, releases, drops, new_hashes,
                           need, available)

    def _growth_plan(self, ids: list[int], counts: list[int], lookahead: int
                     ) -> tuple[list[tuple[int, list[int], int]], list[int], int, int]:
        """(releases, dropped hashes, need, available) of growing ``ids`` by ``counts``
        committed tokens and ``lookahead`` reserved positions."""
        size = self._block_size
        refcount = list(self._allocator._refcount)
        # 1. Releases, sequence by sequence, each ascending; a block counts as freed
        #    when its last holder in the call lets it go.
        releases = []
        freed = 0
        for s, k in zip(ids, counts):
            if k == 0 and lookahead == 0:
                continue
            live = self._live[s]
            first_kept = self._first_needed(self._tokens[s]) // size
            if first_kept > live:
                indices = list(range(live, first_kept))
                for j in indices:
                    block = self._blocks[s][j]
                    refcount[block] -= 1
                    freed += refcount[block] == 0
                releases.append((s, indices, first_kept))
        # 2. Copy-on-write of the block holding position c, in input order; a
        #    registered block its sole holder writes into loses its hash.
        need = 0
        drops = []
        for s, k in zip(ids, counts):
            if k == 0 and lookahead == 0:
                continue
            length = self._tokens[s]
            row = self._blocks[s]
            j = length // size
            if j < len(row):
                block = row[j]
                if refcount[block] > 1:
                    need += 1
                    refcount[block] -= 1
                elif block in self._registered:
                    drops.append(block)
            need += max(0, self._blocks_for(length + k + lookahead) - len(row))
        return releases, drops, need, self.num_free_blocks + freed

    def _append(self, plan: _AppendPlan) -> AppendResult:
        """Carry out an append plan: releases, dropped hashes, one take, then sequence
        by sequence copy-on-write, new blocks, writes and registration."""
        if plan.need > plan.available:
            raise OutOfBlocksError(plan.need, plan.available)
        for s, indices, first_kept in plan.releases:
            row = self._blocks[s]
            for j in indices:
                block = row[j]
                row[j] = PAD_SLOT_ID
                self._release(block)
            self._live[s] = first_kept
        for block in plan.drops:
            self._unregister(block)
        fresh = self._take(plan.need)
        size = self._block_size
        lookahead = plan.num_lookahead
        new_tokens: list[list[int | None]] = plan.new_tokens or [[None] * k for k in plan.counts]
        slots: list[int] = []
        lookahead_slots: list[int] = []
        copy_src: list[int] = []
        copy_dst: list[int] = []
        for s, k, tokens in zip(plan.seq_ids, plan.counts, new_tokens):
            if k == 0 and lookahead == 0:
                continue
            length = self._tokens[s]
            row = self._blocks[s]
            j = length // size
            if j < len(row) and self._allocator._refcount[row[j]] > 1:
                shared = row[j]
                copy = fresh.pop(0)
                copy_src.append(shared)
                copy_dst.append(copy)
                # The copy carries this sequence's tokens of the block, no more.
                self._contents[copy] = list(self._contents[shared][:length % size])
                self._release(shared)
                row[j] = copy
            while len(row) < self._blocks_for(length + k + lookahead):
                row.append(fresh.pop(0))
            self._write(s, length, tokens)
            slots.extend(self._slot(s, p) for p in range(length, length + k))
            lookahead_slots.extend(self._slot(s, p) for p in range(length + k, length + k + lookahead))
            self._tokens[s] = length + k
            self._reserved[s] = lookahead
            if self._caching:
                first = len(self._hashes[s])
                self._hashes[s].extend(plan.new_hashes[s])
                self._register(s, first)
        if fresh:
            raise AssertionError("an append plan took more blocks than it used")
        return _result(slots, copy_src, copy_dst, 0, lookahead_slots)

    def append_tokens(self, seq_ids: object, num_new_tokens: object = 1,
                      token_ids: object = None, num_lookahead: object = 0) -> AppendResult:
        return self._append(self._append_plan(seq_ids, num_new_tokens, token_ids, num_lookahead))

    def can_append(self, seq_ids: object, num_new_tokens: object = 1) -> bool:
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, len(ids))
        _, _, need, available = self._growth_plan(ids, counts, 0)
        return need <= available

    # -- shrinking --------------------------------------------------------------------
    def _truncate_targets(self, seq_ids: object, values: object, name: str,
                          rejected: bool) -> list[tuple[int, int]]:
        """(seq, new length) of each sequence, every argument checked first."""
        ids = self._known(seq_ids, distinct=True)
        counts = self._counts(values, len(ids), name)
        targets = []
        for i, (s, count) in enumerate(zip(ids, counts)):
            length = self._tokens[s]
            if count > length:
                raise ValueError(f"{name}[{i}] = {count} is more than sequence {s}'s {length} tokens")
            new_length = length - count if rejected else count
            if new_length > 0 and self._first_needed(new_length) // self._block_size < self._live[s]:
                raise ValueError(
                    f"sequence {s} cannot go back to {new_length} tokens: the next token's window "
                    f"starts in block {self._first_needed(new_length) // self._block_size}, "
                    f"already released (its first held block is {self._live[s]})"
                )
            targets.append((s, new_length))
        return targets

    def _truncate_check(self, seq_ids: object, num_tokens: object) -> None:
        """Raise what ``truncate`` would raise; change nothing."""
        self._truncate_targets(seq_ids, num_tokens, "num_tokens", rejected=False)

    def _shrink(self, targets: list[tuple[int, int]]) -> None:
        size = self._block_size
        for s, new_length in targets:
            row = self._blocks[s]
            keep = self._blocks_for(new_length)
            # Step 2: the tail leaves the table, last block first.
            for j in range(len(row) - 1, keep - 1, -1):
                if row[j] != PAD_SLOT_ID:
                    self._release(row[j])
            del row[keep:]
            self._tokens[s] = new_length
            del self._token_ids[s][new_length:]
            if self._caching:
                del self._hashes[s][new_length // size:]
            # Step 3: a now-partial block only this sequence holds is no longer final.
            if new_length % size:
                block = row[new_length // size]
                if self._allocator._refcount[block] == 1:
                    if block in self._registered:
                        self._unregister(block)
                    del self._contents[block][new_length % size:]
            self._reserved.pop(s, None)
            # Step 4.
            if new_length == 0:
                self._live[s] = 0

    def truncate(self, seq_ids: object, num_tokens: object) -> None:
        """Set each sequence's length to its ``num_tokens`` (docs/HYBRID.md)."""
        self._shrink(self._truncate_targets(seq_ids, num_tokens, "num_tokens", rejected=False))

    def rollback(self, seq_ids: object, num_rejected: object) -> None:
        """Drop each sequence's last ``num_rejected`` tokens: ``truncate`` to c - r."""
        self._shrink(self._truncate_targets(seq_ids, num_rejected, "num_rejected", rejected=True))

    # -- sharing and freeing ----------------------------------------------------------
    def fork(self, parent_id: object, child_id: object) -> None:
        parent = _seq_id(parent_id, "parent_id")
        child = _seq_id(child_id, "child_id")
        if parent not in self._blocks:
            raise KeyError(f"parent_id = {parent} is not a sequence of this manager")
        if child in self._blocks:
            raise ValueError(f"child_id = {child} already exists")
        # The blocks covering the parent's length: padded entries as they are, never
        # the parent's reserved lookahead blocks.
        blocks = self._blocks[parent][:self._blocks_for(self._tokens[parent])]
        for b in blocks:
            if b != PAD_SLOT_ID:
                self._allocator._refcount[b] += 1
        self._blocks[child] = list(blocks)
        self._tokens[child] = self._tokens[parent]
        self._live[child] = self._live[parent]
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
            # Last block first with caching on, so that a tail is evicted before its
            # head; released entries are skipped.
            for b in reversed(blocks) if self._caching else blocks:
                if b != PAD_SLOT_ID:
                    self._release(b)
            del self._tokens[s]
            del self._live[s]
            self._reserved.pop(s, None)
            del self._token_ids[s]
            del self._extra_keys[s]
            self._hashes.pop(s, None)

    def reset(self) -> None:
        """Free every sequence (in insertion order), then empty the prefix cache."""
        if self._blocks:
            self.free_sequence(list(self._blocks))
        if self._caching:
            self.reset_prefix_cache()

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
        """The sequence's token ids, position by position (released ones included)."""
        seq = _seq_id(seq_id, "seq_id")
        if seq not in self._blocks:
            raise KeyError(f"seq_id = {seq} is not a sequence of this manager")
        return list(self._token_ids[seq])

    def live_block(self, seq_id: object) -> int:
        """The index of the sequence's first held block (``live``)."""
        seq = _seq_id(seq_id, "seq_id")
        if seq not in self._blocks:
            raise KeyError(f"seq_id = {seq} is not a sequence of this manager")
        return self._live[seq]

    def seq_lens(self, seq_ids: object) -> np.ndarray:
        return np.array([self._tokens[s] for s in self._known(seq_ids)], dtype=np.int32)

    def _kernel_split(self, kernel_block_size: object) -> int:
        """Kernel blocks per block for ``kernel_block_size`` (1 for None)."""
        if kernel_block_size is None:
            return 1
        if isinstance(kernel_block_size, (bool, np.bool_)):
            raise TypeError("kernel_block_size must be an int, got a bool")
        b = as_index(kernel_block_size, "kernel_block_size")
        if b < 1 or self._block_size % b:
            raise ValueError(f"kernel_block_size must divide the block size {self._block_size}, got {b}")
        return self._block_size // b

    def _kernel_row(self, s: int, k: int, count: int) -> list[int]:
        """The first ``count`` kernel blocks of sequence ``s``'s row, ``k`` to a block."""
        out = []
        for b in self._blocks[s]:
            out.extend([PAD_SLOT_ID] * k if b == PAD_SLOT_ID else [b * k + j for j in range(k)])
        return out[:count]

    def block_table(self, seq_ids: object, kernel_block_size: object = None) -> np.ndarray:
        """Rows as the page table holds them: released entries PAD_SLOT_ID, reserved
        lookahead blocks at the end; in kernel blocks, ``ceil((c + K) / b)`` of them."""
        ids = self._known(seq_ids)
        k = self._kernel_split(kernel_block_size)
        if k == 1 and kernel_block_size is None:
            rows = [list(self._blocks[s]) for s in ids]
        else:
            b = self._block_size // k
            rows = [self._kernel_row(s, k, -(-(self._tokens[s] + self._reserved.get(s, 0)) // b))
                    for s in ids]
        width = max((len(row) for row in rows), default=0)
        table = np.full((len(ids), width), PAD_SLOT_ID, dtype=np.int32)
        for i, row in enumerate(rows):
            table[i, :len(row)] = row
        return table

    def flashinfer_layout(self, seq_ids: object, kernel_block_size: object = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = self._known(seq_ids)
        k = self._kernel_split(kernel_block_size)
        page = self._block_size // k
        indptr = [0]
        indices: list[int] = []
        last_page_len = []
        for s in ids:
            # The pages holding the committed tokens: the page count and the last
            # page's length give the length, so reserved lookahead blocks stay out.
            indices.extend(self._kernel_row(s, k, -(-self._tokens[s] // page)))
            indptr.append(len(indices))
            tokens = self._tokens[s]
            last_page_len.append((tokens - 1) % page + 1 if tokens else 0)
        return (
            np.array(indptr, dtype=np.int32),
            np.array(indices, dtype=np.int32),
            np.array(last_page_len, dtype=np.int32),
        )

    def check(self) -> None:
        size = self._block_size
        references = [0] * self.num_blocks
        for s, blocks in self._blocks.items():
            length, live = self._tokens[s], self._live[s]
            covering = self._blocks_for(length)
            if len(blocks) < covering:
                raise AssertionError(f"sequence {s} holds {length} tokens in {len(blocks)} blocks")
            if not 0 <= live <= length // size:
                raise AssertionError(f"sequence {s}: live = {live} with {length} tokens")
            for j, b in enumerate(blocks):
                if (b == PAD_SLOT_ID) != (j < live):
                    raise AssertionError(
                        f"sequence {s}'s entry {j} is {b} with live = {live}: only entries before live are PAD"
                    )
                if b != PAD_SLOT_ID:
                    references[b] += 1
            for b in blocks[covering:]:
                # Reserved lookahead blocks: fresh, unwritten, never registered.
                if self._contents[b] or b in self._registered:
                    raise AssertionError(f"sequence {s}'s reserved block {b} holds tokens or a hash")
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
            # A sequence's held blocks hold exactly its tokens (a partial block it
            # shares may hold more: another holder's).
            tokens = self._token_ids[s]
            length = self._tokens[s]
            if len(tokens) != length:
                raise AssertionError(f"sequence {s} records {len(tokens)} token ids for {length} tokens")
            for j in range(self._live[s], self._blocks_for(length)):
                mine = tokens[j * size:(j + 1) * size]
                held = self._contents[blocks[j]]
                if held[:len(mine)] != mine or (len(mine) == size and len(held) != size):
                    raise AssertionError(f"block {blocks[j]} does not hold sequence {s}'s tokens {j * size}..")
            if self._caching:
                # Its content hashes, the chain tail past released blocks included, are
                # the chain of its own tokens: every full block is chained.
                if self._hashes[s] != self._chain(None, tokens, self._extra_keys[s], 0):
                    raise AssertionError(f"sequence {s}'s block hashes are not the chain of its tokens")
                if all(t is not None for t in tokens) and len(self._hashes[s]) != length // size:
                    raise AssertionError(f"sequence {s}'s full blocks are not all chained")
                for j, block_hash in enumerate(self._hashes[s]):
                    if blocks[j] == PAD_SLOT_ID:
                        continue
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
