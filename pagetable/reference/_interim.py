"""The event, statistics and result types the model hands out.

The project's own types are used where they exist (``pagetable.events``,
``pagetable.prefix.PrefixCacheStats``, an ``AppendResult`` with
``num_cached_tokens``).  Where one is not there yet, a minimal class with the same
fields stands in for it, so that the model can be built and tested first; each
stand-in is dropped once the real type lands.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from pagetable._results import AppendResult

def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class _Event:
    _fields: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"


class _BlockStored(_Event):
    _fields = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
               "medium", "lora_name", "extra_keys", "group_idx")

    def __init__(self, block_hashes: list[Any], parent_block_hash: Any, token_ids: list[int],
                 block_size: int, lora_id: Any, medium: Any, lora_name: Any,
                 extra_keys: Any = None, group_idx: Any = None) -> None:
        self.block_hashes = block_hashes
        self.parent_block_hash = parent_block_hash
        self.token_ids = token_ids
        self.block_size = block_size
        self.lora_id = lora_id
        self.medium = medium
        self.lora_name = lora_name
        self.extra_keys = extra_keys
        self.group_idx = group_idx


class _BlockRemoved(_Event):
    _fields = ("block_hashes", "medium", "group_idx")

    def __init__(self, block_hashes: list[Any], medium: Any, group_idx: Any = None) -> None:
        self.block_hashes = block_hashes
        self.medium = medium
        self.group_idx = group_idx


class _AllBlocksCleared(_Event):
    pass


class _KVEventBatch(_Event):
    _fields = ("ts", "events", "data_parallel_rank")

    def __init__(self, ts: float, events: list[Any], data_parallel_rank: Any = None) -> None:
        self.ts = ts
        self.events = events
        self.data_parallel_rank = data_parallel_rank


class _PrefixCacheStats:
    def __init__(self, requests: int = 0, queries: int = 0, hits: int = 0, evictions: int = 0) -> None:
        self.requests = requests
        self.queries = queries
        self.hits = hits
        self.evictions = evictions

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _PrefixCacheStats):
            return NotImplemented
        return (self.requests, self.queries, self.hits, self.evictions) == (
            other.requests, other.queries, other.hits, other.evictions)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"PrefixCacheStats(requests={self.requests}, queries={self.queries}, "
                f"hits={self.hits}, evictions={self.evictions})")


_events = _module("pagetable.events")
_prefix = _module("pagetable.prefix")
BlockStored: Any = getattr(_events, "BlockStored", _BlockStored)
BlockRemoved: Any = getattr(_events, "BlockRemoved", _BlockRemoved)
AllBlocksCleared: Any = getattr(_events, "AllBlocksCleared", _AllBlocksCleared)
KVEventBatch: Any = getattr(_events, "KVEventBatch", _KVEventBatch)
PrefixCacheStats: Any = getattr(_prefix, "PrefixCacheStats", _PrefixCacheStats)


_RESULT_HAS_CACHED_TOKENS = hasattr(AppendResult, "num_cached_tokens")


class _AddResult:
    """What ``add_sequence`` returns with caching on, until AppendResult carries
    ``num_cached_tokens`` itself."""

    def __init__(self, result: AppendResult, num_cached_tokens: int) -> None:
        self.slots = result.slots
        self.copy_src = result.copy_src
        self.copy_dst = result.copy_dst
        self.num_cached_tokens = num_cached_tokens

    def __repr__(self) -> str:
        return f"AppendResult(slots={self.slots!r}, num_cached_tokens={self.num_cached_tokens})"


def make_result(slots: list[int], copy_src: list[int], copy_dst: list[int],
                num_cached_tokens: int | None = None) -> Any:
    """An AppendResult; with ``num_cached_tokens`` for an add under prefix caching."""
    arrays = (np.array(slots, dtype=np.int64), np.array(copy_src, dtype=np.int32),
              np.array(copy_dst, dtype=np.int32))
    if _RESULT_HAS_CACHED_TOKENS:
        return AppendResult(*arrays, num_cached_tokens or 0)  # type: ignore[call-arg]
    result = AppendResult(*arrays)
    if num_cached_tokens is None:
        return result
    return _AddResult(result, num_cached_tokens)
