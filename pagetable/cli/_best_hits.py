"""The most prefix-cache hits a trace of requests allows, computed from the trace alone.

The bound is what a cache that never evicts would hit under the manager's own rules
(``docs/PREFIX_CACHING.md``): only full blocks are cached, a block hits only if its
whole prefix is identical (the hashes are chained), a prompt's hit is its longest run
of cached blocks from block 0, capped at ``(num_tokens - 1) // block_size`` blocks (the
last token is always computed), and everything a request holds (its prompt and each
sample's tokens after it) is cached once the request has been admitted, for every
later request.

Blocks are told apart by their content and their parent, as the chained hash does,
without hashing: each distinct chain of full blocks is one node of a trie, so the
bound is exact (no collisions) and independent of the hash algorithm.  Depends on numpy
only, as the rest of the benchmark harness.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BestHits:
    """The bound over a trace: tokens queried and hit, blocks hit, per request too."""

    block_size: int
    requests: int = 0
    queries: int = 0          # prompt tokens
    hits: int = 0             # prompt tokens that a cache without eviction would hit
    per_request: list[int] = field(default_factory=list)   # hit tokens, request by request

    @property
    def hit_blocks(self) -> int:
        return self.hits // self.block_size

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class _Chains:
    """The full blocks seen so far, as a trie: (parent node, block content) -> node."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.nodes: dict[tuple[int, bytes], int] = {}

    def _key(self, parent: int, tokens: np.ndarray, k: int) -> tuple[int, bytes]:
        return parent, tokens[k * self.block_size:(k + 1) * self.block_size].tobytes()

    def longest(self, tokens: np.ndarray, limit: int) -> tuple[int, int]:
        """(blocks, last node) of the longest cached run from block 0, at most ``limit``."""
        parent, k = -1, 0
        while k < limit:
            node = self.nodes.get(self._key(parent, tokens, k))
            if node is None:
                break
            parent, k = node, k + 1
        return k, parent

    def store(self, tokens: np.ndarray, start: int = 0, parent: int = -1) -> int:
        """Registers every full block of ``tokens`` from block ``start``, whose parent
        node is ``parent``; returns the node of the last full block (``parent`` if none)."""
        for k in range(start, len(tokens) // self.block_size):
            parent = self.nodes.setdefault(self._key(parent, tokens, k), len(self.nodes))
        return parent


def best_hits(block_size: int, trace: Iterable[tuple[object, Sequence[object]]]) -> BestHits:
    """The bound over ``trace``: ``(prompt token ids, [each sample's generated token
    ids])`` in admission order."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    chains = _Chains(block_size)
    bound = BestHits(block_size)
    for prompt, outputs in trace:
        tokens = np.ascontiguousarray(prompt, dtype=np.int64)
        cap = (len(tokens) - 1) // block_size if len(tokens) else 0
        blocks, node = chains.longest(tokens, min(cap, len(tokens) // block_size))
        bound.requests += 1
        bound.queries += len(tokens)
        bound.hits += blocks * block_size
        bound.per_request.append(blocks * block_size)
        # The prompt's full blocks past the hit, then each sample's blocks after them
        # (the first of which holds the prompt's partly filled last block).
        full = len(tokens) // block_size
        node = chains.store(tokens, blocks, node)
        for output in outputs:
            generated = np.ascontiguousarray(output, dtype=np.int64)
            if generated.size:
                chains.store(np.concatenate([tokens, generated]), full, node)
    return bound
