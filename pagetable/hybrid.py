"""KV-cache groups: one manager per attention kind, driven as one.

A hybrid model mixes layers of different attention kinds (full attention, sliding
windows, chunked local attention).  Each kind keeps its KV cache in its own pool of
pages, a *KV-cache group*; :class:`HybridKVCacheManager` holds one
:class:`pagetable.KVCacheManager` per group and one set of sequence ids, and makes
every call all-or-nothing across the groups: it plans the call in every group, through
the private hooks of ``docs/HYBRID.md`` ("The hooks a group coordinator uses"), before
any group changes, so a group out of blocks changes nothing anywhere.

Pages are partitioned, not shared: each group has its own pool of ``num_blocks`` pages
(``docs/HYBRID.md``, "KV-cache groups").  A prompt's prefix hit counts only if every
group can serve it, so every group admits it with the same number of cached tokens.

The reference model is the same coordinator over reference managers:
:class:`pagetable.reference.ReferenceHybridKVCacheManager`.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from pagetable._batch import BatchTable
from pagetable._convert import INT32_MAX, INT64_MAX, as_index, as_int_array, check_range
from pagetable._manager import KVCacheManager
from pagetable._results import AppendResult, OutOfBlocksError
from pagetable.events import KVEventBatch

__all__ = ["KVCacheGroupSpec", "HybridKVCacheManager", "HybridResult", "HybridAdmission"]


def _positive(value: object, name: str, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    return check_range(as_index(value, name), 1, INT32_MAX, name)


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """One KV-cache group: its pool of pages and its attention kind.

    Parameters
    ----------
    num_blocks : int
        Pages in this group's own pool (>= 1).
    block_size : int, default 16
        Tokens per page of this group (>= 1).
    sliding_window : int or None, default None
        ``W``: the group's layers attend to the last ``W`` positions (>= 1).
    attention_chunk : int or None, default None
        ``C``: the group's layers attend within chunks of ``C`` positions (>= 1).
        At most one of ``sliding_window`` and ``attention_chunk`` is given; neither
        means full attention.

    Raises
    ------
    TypeError
        A field is not an integer (bools are refused).
    ValueError
        A field is below 1, or both ``sliding_window`` and ``attention_chunk`` are given.
    """

    num_blocks: int
    block_size: int = 16
    sliding_window: int | None = None
    attention_chunk: int | None = None

    def __post_init__(self) -> None:
        # Normalised to Python ints, so that equal specs compare and hash equal.
        object.__setattr__(self, "num_blocks", _positive(self.num_blocks, "num_blocks"))
        object.__setattr__(self, "block_size", _positive(self.block_size, "block_size"))
        object.__setattr__(self, "sliding_window", _positive(self.sliding_window, "sliding_window", True))
        object.__setattr__(self, "attention_chunk", _positive(self.attention_chunk, "attention_chunk", True))
        if self.sliding_window is not None and self.attention_chunk is not None:
            raise ValueError("sliding_window and attention_chunk cannot both be given: a group has one "
                             f"attention kind (got sliding_window={self.sliding_window}, "
                             f"attention_chunk={self.attention_chunk})")

    @property
    def kind(self) -> str:
        """``"full"``, ``"sliding_window"`` or ``"chunked_local"``."""
        if self.sliding_window is not None:
            return "sliding_window"
        if self.attention_chunk is not None:
            return "chunked_local"
        return "full"


class HybridResult:
    """What a growth call gives: one :class:`pagetable.AppendResult` per group, in group
    order, plus the tokens every group found cached.

    Index it by group, iterate or unpack it (``full, window = result``); ``results``
    is the tuple itself and ``num_cached_tokens`` the prefix hit common to every group
    (0 for an append).  Compares with ``==``, pickles, unhashable.
    """

    def __init__(self, results: Sequence[AppendResult], num_cached_tokens: int = 0) -> None:
        self.results: tuple[AppendResult, ...] = tuple(results)
        self.num_cached_tokens: int = int(num_cached_tokens)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, group: int) -> AppendResult:
        return self.results[group]

    def __iter__(self) -> Iterator[AppendResult]:
        return iter(self.results)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridResult):
            return NotImplemented
        return self.results == other.results and self.num_cached_tokens == other.num_cached_tokens

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (HybridResult, (self.results, self.num_cached_tokens))

    def __repr__(self) -> str:
        return f"HybridResult({list(self.results)!r}, num_cached_tokens={self.num_cached_tokens})"


class HybridAdmission(NamedTuple):
    """``can_admit``'s answer: whether the prompt fits in every group now, whether it
    could in every group's empty pool, and each group's fresh blocks after the hit."""

    fits_now: bool
    could_ever_fit: bool
    need: tuple[int, ...]


def _token_total(num_new_tokens: object, n: int) -> int | None:
    """The tokens an append adds, when the counts read cleanly (else the group's own
    checks name the problem)."""
    try:
        if isinstance(num_new_tokens, (list, tuple, np.ndarray)) and np.ndim(num_new_tokens) > 0:
            total = int(as_int_array(num_new_tokens, "num_new_tokens").sum())
        else:
            total = as_index(num_new_tokens, "num_new_tokens") * n
    except (TypeError, ValueError, OverflowError):
        return None
    return total if 0 <= total <= INT64_MAX else None


class HybridKVCacheManager:
    """One KV-cache manager per KV-cache group, one set of sequences, all-or-nothing.

    Parameters
    ----------
    groups : sequence of KVCacheGroupSpec
        The groups, in order (group ``i`` records its events with ``group_idx=i``).
    enable_prefix_caching, hash_algorithm, hash_seed, enable_kv_cache_events, \
event_hash_format, medium, data_parallel_rank
        As :class:`pagetable.KVCacheManager`, the same for every group.
    manager_class : type, optional
        The class of each group's manager: :class:`pagetable.KVCacheManager` by
        default; :class:`pagetable.reference.ReferenceHybridKVCacheManager` passes
        the reference model.

    Notes
    -----
    Every call that changes anything plans itself in every group first, under one
    lock; if a group lacks blocks it raises :class:`pagetable.OutOfBlocksError` with
    that group's ``need`` and ``available`` (the first such group's) and no group
    changes.  Growth calls return a :class:`HybridResult` (one ``AppendResult`` per
    group).  ``take_events`` merges the groups' events in group order into one batch;
    each event's ``group_idx`` says whose it is.
    """

    def __init__(
        self,
        groups: Sequence[KVCacheGroupSpec],
        *,
        enable_prefix_caching: bool = False,
        hash_algorithm: str = "sha256",
        hash_seed: str | int | None = None,
        enable_kv_cache_events: bool = False,
        event_hash_format: str = "int",
        medium: str = "GPU",
        data_parallel_rank: int | None = 0,
        manager_class: type | None = None,
    ) -> None:
        if isinstance(groups, KVCacheGroupSpec) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a list of KVCacheGroupSpec, got {type(groups).__name__}")
        specs = tuple(groups)
        if not specs:
            raise ValueError("groups must hold at least one KVCacheGroupSpec")
        for i, spec in enumerate(specs):
            if not isinstance(spec, KVCacheGroupSpec):
                raise TypeError(f"groups[{i}] must be a KVCacheGroupSpec, got {type(spec).__name__}")
        if manager_class is None:
            from pagetable._manager import KVCacheManager
            manager_class = KVCacheManager
        self._options: dict[str, Any] = dict(
            enable_prefix_caching=enable_prefix_caching, hash_algorithm=hash_algorithm,
            hash_seed=hash_seed, enable_kv_cache_events=enable_kv_cache_events,
            event_hash_format=event_hash_format, medium=medium, data_parallel_rank=data_parallel_rank)
        self._specs = specs
        self._managers = [
            manager_class(spec.num_blocks, spec.block_size, sliding_window=spec.sliding_window,
                          attention_chunk=spec.attention_chunk, group_idx=i, **self._options)
            for i, spec in enumerate(specs)
        ]
        self._caching = bool(enable_prefix_caching)
        self._events_on = bool(enable_kv_cache_events)
        self._data_parallel_rank = data_parallel_rank
        # A hit counts only in tokens every group's blocks can hold whole.
        self._hit_unit = math.lcm(*(spec.block_size for spec in specs))
        # The sequences, in insertion order (reset frees them in that order).
        self._seq_ids: dict[int, None] = {}
        self._lock = threading.Lock()

    # -- the groups -------------------------------------------------------------------
    @property
    def groups(self) -> tuple[KVCacheGroupSpec, ...]:
        """The groups' specs, in group order."""
        return self._specs

    @property
    def managers(self) -> tuple[Any, ...]:
        """Each group's manager, in group order (read them; change them only through
        this object, or the groups fall out of step)."""
        return tuple(self._managers)

    @property
    def num_free_blocks(self) -> tuple[int, ...]:
        """Free plus cached-free blocks, per group."""
        return tuple(m.num_free_blocks for m in self._managers)

    @property
    def num_cached_blocks(self) -> tuple[int, ...]:
        """Blocks registered in the prefix cache now, per group."""
        return tuple(m.num_cached_blocks for m in self._managers)

    @property
    def prefix_cache_stats(self) -> tuple[Any, ...]:
        """Each group's :class:`pagetable.prefix.PrefixCacheStats`, in group order."""
        return tuple(m.prefix_cache_stats for m in self._managers)

    @property
    def enable_prefix_caching(self) -> bool:
        return self._caching

    def __len__(self) -> int:
        return len(self._seq_ids)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seq_ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(groups={list(self._specs)!r}, sequences={len(self._seq_ids)}, "
                f"free_blocks={self.num_free_blocks})")

    # -- admission --------------------------------------------------------------------
    def _common_hit(self, token_ids: object, extra_keys: object) -> int:
        """``h``: the longest hit, in tokens, that every group's hit rule accepts (a
        multiple of every group's block size, at most ``n - 1``)."""
        masks = [m._hit_mask(token_ids, extra_keys) for m in self._managers]
        sizes = [spec.block_size for spec in self._specs]
        longest = max(0, min((len(mask) - 1) * size for mask, size in zip(masks, sizes)))
        h = longest - longest % self._hit_unit
        while h > 0 and not all(mask[h // size] for mask, size in zip(masks, sizes)):
            h -= self._hit_unit
        return h

    def _hits(self, num_prompts: int, token_ids: Any, extra_keys: Any, check: Any) -> list[int] | None:
        """Each prompt's common hit in tokens, or None without caching.  A prompt the
        masks cannot read is named by ``check()`` (the first group's full checks)."""
        if not self._caching:
            return None
        try:
            keys = [None] * num_prompts if extra_keys is None else list(extra_keys)
            return [self._common_hit(token_ids[i], keys[i]) for i in range(num_prompts)]
        except Exception:
            check()
            raise

    def _plan_admission(self, seq_ids: Any, num_tokens: Any, token_ids: Any,
                        extra_keys: Any) -> tuple[list[Any], list[int] | None]:
        ids = [int(s) for s in as_int_array(seq_ids, "seq_ids")]
        first = self._managers[0]

        def check() -> None:
            first._admission_plan(seq_ids, num_tokens=num_tokens, token_ids=token_ids,
                                  extra_keys=extra_keys, hit_blocks=None)

        if self._caching and (not isinstance(token_ids, (list, tuple)) or len(token_ids) != len(ids)):
            check()   # the group names what is wrong with the prompts
        hits = self._hits(len(ids), token_ids, extra_keys, check)
        plans = []
        for manager, spec in zip(self._managers, self._specs):
            hit_blocks = None if hits is None else [h // spec.block_size for h in hits]
            plans.append(manager._admission_plan(seq_ids, num_tokens=num_tokens, token_ids=token_ids,
                                                 extra_keys=extra_keys, hit_blocks=hit_blocks))
        return plans, hits

    @staticmethod
    def _refuse(plans: Sequence[Any]) -> None:
        for plan in plans:
            if plan.need > plan.available:
                raise OutOfBlocksError(plan.need, plan.available)

    def add_sequences(self, seq_ids: Any, num_tokens: Any = None, token_ids: Any = None,
                      extra_keys: Any = None) -> list[HybridResult]:
        """Admit several prompts at once, in every group, all or none.

        Parameters
        ----------
        seq_ids : array-like of int
            New, distinct sequence ids.
        num_tokens : array-like of int, optional
            Each prompt's length (default: the lengths of ``token_ids``).
        token_ids : list of array-like of int, optional
            Each prompt's token ids (required with prefix caching).
        extra_keys : list of ExtraKeys or None, optional
            Each prompt's extra hash keys.

        Returns
        -------
        list of HybridResult
            One per prompt, in order.

        Raises
        ------
        OutOfBlocksError
            A group lacks the blocks (the first such group's figures); nothing changes.

        Notes
        -----
        Each prompt's hit is the common hit against the cache as it is before the
        call: a prompt does not hit blocks that an earlier prompt of the same call
        registers (the hooks take one fixed hit per prompt).  Admit such prompts in
        separate calls to share them.
        """
        with self._lock:
            plans, hits = self._plan_admission(seq_ids, num_tokens, token_ids, extra_keys)
            self._refuse(plans)
            per_group = [manager._admit(plan) for manager, plan in zip(self._managers, plans)]
            ids = [int(s) for s in as_int_array(seq_ids, "seq_ids")]
            for s in ids:
                self._seq_ids[s] = None
        return [HybridResult(results, 0 if hits is None else hits[i])
                for i, results in enumerate(zip(*per_group))]

    def add_sequence(self, seq_id: int, num_tokens: int | None = None, token_ids: Any = None,
                     extra_keys: Any = None) -> HybridResult:
        """Admit one prompt in every group, with the hit every group can serve.

        Parameters
        ----------
        seq_id : int
            A new sequence id.
        num_tokens : int, optional
            The prompt's length (default: the length of ``token_ids``).
        token_ids : array-like of int, optional
            The prompt's token ids (required with prefix caching).
        extra_keys : ExtraKeys, optional
            The prompt's extra hash keys (LoRA, multimodal items, cache salt).

        Returns
        -------
        HybridResult
            Each group's slots of the tokens to compute; ``num_cached_tokens`` is the
            common hit.

        Raises
        ------
        OutOfBlocksError
            A group lacks the blocks; nothing changes in any group.
        """
        return self.add_sequences(
            [as_index(seq_id, "seq_id")],
            None if num_tokens is None else [num_tokens],
            None if token_ids is None else [token_ids],
            None if extra_keys is None else [extra_keys],
        )[0]

    def count_cached_tokens(self, token_ids: Any, extra_keys: Any = None) -> int:
        """The tokens an ``add_sequence`` of this prompt would find cached now: the
        longest hit every group accepts.  Changes nothing.

        Parameters
        ----------
        token_ids : array-like of int
            The prompt.
        extra_keys : ExtraKeys, optional
            Its extra hash keys.

        Returns
        -------
        int
            A multiple of every group's block size, at most ``len(token_ids) - 1``;
            0 without prefix caching.
        """
        with self._lock:
            if not self._caching:
                # Checked as the groups check a prompt, then nothing can be cached.
                self._managers[0].count_cached_tokens(token_ids, extra_keys)
                return 0
            return self._common_hit(token_ids, extra_keys)

    def can_admit(self, num_tokens: int, token_ids: Any = None, extra_keys: Any = None,
                  watermark: float = 0.0) -> HybridAdmission:
        """Whether a prompt fits in every group now, and could in every empty pool.

        Parameters
        ----------
        num_tokens : int
            The prompt's length.
        token_ids : array-like of int, optional
            Its token ids (with prefix caching: the hit is the common one).
        extra_keys : ExtraKeys, optional
            Its extra hash keys.
        watermark : float, default 0.0
            The share of each group's pool to keep free, in ``[0, 1)``.

        Returns
        -------
        HybridAdmission
            ``fits_now`` and ``could_ever_fit`` hold in every group; ``need`` is each
            group's fresh blocks after the common hit.  Changes nothing.
        """
        watermark = float(watermark)
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        with self._lock:
            # A probe id no sequence has: the plan is thrown away.
            probe = INT64_MAX
            while probe in self._seq_ids:
                probe -= 1
            plans, _ = self._plan_admission(
                [probe], [num_tokens], None if token_ids is None else [token_ids],
                None if extra_keys is None else [extra_keys])
        n = as_index(num_tokens, "num_tokens")
        fits_now = could_ever_fit = True
        for plan, spec in zip(plans, self._specs):
            kept = math.ceil(watermark * spec.num_blocks)
            fits_now &= plan.need <= plan.available - kept
            could_ever_fit &= -(-n // spec.block_size) <= spec.num_blocks - kept
        return HybridAdmission(bool(fits_now), bool(could_ever_fit), tuple(int(p.need) for p in plans))

    # -- growth -----------------------------------------------------------------------
    def _plan_append(self, seq_ids: Any, num_new_tokens: Any, token_ids: Any, num_lookahead: Any) -> list[Any]:
        first = self._managers[0]._append_plan(seq_ids, num_new_tokens=num_new_tokens,
                                               token_ids=token_ids, num_lookahead=num_lookahead)
        plans = [first]
        for m in self._managers[1:]:
            if type(m) is KVCacheManager:
                # The groups' registries move in lockstep: the first group's checked ids
                # and slots serve the others (each confirms them against its records).
                plans.append(m._append_plan(seq_ids, num_new_tokens=num_new_tokens, token_ids=token_ids,
                                            num_lookahead=num_lookahead, like=first))
            else:
                plans.append(m._append_plan(seq_ids, num_new_tokens=num_new_tokens, token_ids=token_ids,
                                            num_lookahead=num_lookahead))
        return plans

    def append_tokens(self, seq_ids: Any, num_new_tokens: Any = 1, token_ids: Any = None,
                      num_lookahead: int = 0) -> HybridResult:
        """Grow sequences in every group, all or nothing.

        Parameters
        ----------
        seq_ids : array-like of int
            Distinct sequences of this manager.
        num_new_tokens : int or array-like of int, default 1
            Tokens each sequence gains (one count for all, or one per sequence).
        token_ids : array-like of int, optional
            Every new token's id, sequence by sequence (required with prefix caching).
        num_lookahead : int, default 0
            Slots to reserve past each sequence's new length (speculative decoding).

        Returns
        -------
        HybridResult
            Each group's ``AppendResult`` (slots, copy-on-write copies, lookahead
            slots).

        Raises
        ------
        OutOfBlocksError
            A group lacks the blocks; nothing changes in any group.
        """
        with self._lock:
            plans = self._plan_append(seq_ids, num_new_tokens, token_ids, num_lookahead)
            self._refuse(plans)
            return HybridResult([m._append(plan) for m, plan in zip(self._managers, plans)])

    def can_append(self, seq_ids: Any, num_new_tokens: Any = 1, num_lookahead: int = 0) -> bool:
        """Whether ``append_tokens`` of these counts would fit in every group now.

        Parameters
        ----------
        seq_ids : array-like of int
            Distinct sequences of this manager.
        num_new_tokens : int or array-like of int, default 1
            Tokens each sequence would gain.
        num_lookahead : int, default 0
            Slots each would reserve past its new length.

        Returns
        -------
        bool
            Changes nothing.
        """
        token_ids = None
        if self._caching:
            # A count check: which tokens they are changes no group's need.
            total = _token_total(num_new_tokens, len(as_int_array(seq_ids, "seq_ids")))
            token_ids = None if total is None else np.zeros(total, dtype=np.int64)
        with self._lock:
            plans = self._plan_append(seq_ids, num_new_tokens, token_ids, num_lookahead)
        return all(plan.need <= plan.available for plan in plans)

    # -- shrinking and sharing --------------------------------------------------------
    def truncate(self, seq_ids: Any, num_tokens: Any) -> None:
        """Cut sequences back to ``num_tokens`` tokens in every group, all or nothing.

        Parameters
        ----------
        seq_ids : array-like of int
            Sequences of this manager.
        num_tokens : int or array-like of int
            Each sequence's new length (one for all, or one per sequence),
            ``0 <= num_tokens <= length``.

        Raises
        ------
        ValueError
            A group refuses (a window would need a block it has released); nothing
            changes.
        """
        with self._lock:
            self._truncate(seq_ids, num_tokens)

    def _truncate(self, seq_ids: Any, num_tokens: Any) -> None:
        for manager in self._managers:
            manager._truncate_check(seq_ids, num_tokens)
        for manager in self._managers:
            manager.truncate(seq_ids, num_tokens)

    def rollback(self, seq_ids: Any, num_rejected: Any) -> None:
        """Drop each sequence's last ``num_rejected`` tokens in every group (rejected
        draft tokens), all or nothing.

        Parameters
        ----------
        seq_ids : array-like of int
            Sequences of this manager.
        num_rejected : int or array-like of int
            Tokens to drop (one for all, or one per sequence), ``0 .. length``.

        Raises
        ------
        ValueError
            A count is out of range or a group refuses; nothing changes.
        """
        with self._lock:
            lengths = self._managers[0].seq_lens(seq_ids).astype(np.int64)
            if isinstance(num_rejected, (list, tuple, np.ndarray)) and np.ndim(num_rejected) > 0:
                rejected = as_int_array(num_rejected, "num_rejected")
                if rejected.shape != lengths.shape:
                    raise ValueError(f"num_rejected must have one entry per sequence ({lengths.size}), "
                                     f"got {rejected.size}")
            else:
                rejected = np.full(lengths.shape, as_index(num_rejected, "num_rejected"), dtype=np.int64)
            for i, (r, c) in enumerate(zip(rejected.tolist(), lengths.tolist())):
                if not 0 <= r <= c:
                    raise ValueError(f"num_rejected[{i}] = {r} is out of range 0..{c} (the sequence's length)")
            self._truncate(seq_ids, lengths - rejected)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares the parent's blocks in every group.

        Parameters
        ----------
        parent_id : int
            A sequence of this manager.
        child_id : int
            A new sequence id.
        """
        with self._lock:
            # Forking takes no blocks: what refuses it (an unknown parent, a taken
            # child id) refuses it in the first group, before any group changes.
            for manager in self._managers:
                manager.fork(parent_id, child_id)
            self._seq_ids[as_index(child_id, "child_id")] = None

    def free_sequence(self, seq_ids: Any) -> None:
        """Free sequences in every group.

        Parameters
        ----------
        seq_ids : int or array-like of int
            Distinct sequences of this manager.
        """
        with self._lock:
            # The first group checks every id before freeing any; the others then agree.
            for manager in self._managers:
                manager.free_sequence(seq_ids)
            ids = [seq_ids] if isinstance(seq_ids, (int, np.integer)) else as_int_array(seq_ids, "seq_ids")
            for s in ids:
                self._seq_ids.pop(int(s), None)

    def reset(self) -> None:
        """Free every sequence in every group, then (with caching) clear every cache."""
        with self._lock:
            for manager in self._managers:
                manager.reset()
            self._seq_ids.clear()

    def reset_prefix_cache(self) -> tuple[int, ...]:
        """Clear every group's prefix cache.

        Returns
        -------
        tuple of int
            The hashes each group dropped.
        """
        with self._lock:
            return tuple(m.reset_prefix_cache() for m in self._managers)

    def take_events(self) -> KVEventBatch:
        """Every group's recorded events, group by group in group order, as one batch
        (each event's ``group_idx`` names its group); empties every record."""
        with self._lock:
            batches = [m.take_events() for m in self._managers]
        events = [event for batch in batches for event in batch.events]
        return KVEventBatch(ts=batches[0].ts, events=events, data_parallel_rank=self._data_parallel_rank)

    # -- exports ----------------------------------------------------------------------
    def seq_lens(self, seq_ids: Any) -> np.ndarray:
        """Each sequence's committed tokens (the same in every group), int32."""
        return self._managers[0].seq_lens(seq_ids)

    def _group(self, group: int) -> Any:
        index = as_index(group, "group")
        if not 0 <= index < len(self._managers):
            raise IndexError(f"group = {index} is out of range 0..{len(self._managers) - 1}")
        return self._managers[index]

    def block_table(self, seq_ids: Any, group: int = 0, kernel_block_size: int | None = None) -> np.ndarray:
        """One group's dense block table (released entries ``PAD_SLOT_ID``).

        Parameters
        ----------
        seq_ids : array-like of int
            Sequences of this manager.
        group : int, default 0
            The group.
        kernel_block_size : int, optional
            Export in kernel blocks of this many tokens (dividing the group's block size).
        """
        return self._group(group).block_table(seq_ids, kernel_block_size=kernel_block_size)

    def batch_table(self, max_rows: int, max_blocks_per_seq: Any,
                    kernel_block_size: Any = None) -> HybridBatchTable:
        """A persistent batch table over every group (docs/BATCH_TABLE.md).

        Parameters
        ----------
        max_rows : int
            Rows: the most sequences held at once.
        max_blocks_per_seq : int or sequence of int
            The most blocks of one sequence, for all groups or one per group.
        kernel_block_size : int or sequence of (int or None), optional
            Kernel block size for all groups or one per group (None: the group's blocks).
        """
        return HybridBatchTable(self, max_rows, max_blocks_per_seq, kernel_block_size)

    def flashinfer_layout(self, seq_ids: Any, group: int = 0,
                          kernel_block_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One group's ``(indptr, indices, last_page_len)`` for FlashInfer.

        Parameters
        ----------
        seq_ids : array-like of int
            Sequences of this manager.
        group : int, default 0
            The group.
        kernel_block_size : int, optional
            Export in kernel blocks of this many tokens.
        """
        return self._group(group).flashinfer_layout(seq_ids, kernel_block_size=kernel_block_size)

    def check(self) -> None:
        """Every group's own check, and the groups in step: the same sequences with the
        same lengths.  Raises ``AssertionError``."""
        with self._lock:
            for manager in self._managers:
                manager.check()
            ids = np.fromiter(self._seq_ids, dtype=np.int64, count=len(self._seq_ids))
            lengths = None
            for i, manager in enumerate(self._managers):
                if len(manager) != len(ids) or not all(int(s) in manager for s in ids):
                    raise AssertionError(f"group {i} holds other sequences than the coordinator")
                group_lengths = manager.seq_lens(ids)
                if lengths is not None and not np.array_equal(lengths, group_lengths):
                    raise AssertionError(f"group {i}'s sequence lengths differ from group 0's")
                lengths = group_lengths

    # -- copying and pickling ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Everything but the lock; each manager pickles itself.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def copy(self) -> HybridKVCacheManager:
        """An independent copy: every group's manager copied."""
        with self._lock:
            return copy.deepcopy(self)

    def __copy__(self) -> HybridKVCacheManager:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> HybridKVCacheManager:
        clone = object.__new__(type(self))
        state = self.__getstate__()
        state["_managers"] = [copy.deepcopy(m, memo) for m in self._managers]
        state["_seq_ids"] = dict(self._seq_ids)
        state["_options"] = dict(self._options)
        clone.__setstate__(state)
        return clone


class HybridBatchTable:
    """One :class:`pagetable.BatchTable` per KV-cache group, with rows kept in step.

    Rows are added, removed, moved, swapped and condensed in every group together,
    so row ``r`` holds the same sequence in every group; :meth:`update` updates each
    group's table from its own page table.  Made by
    :meth:`HybridKVCacheManager.batch_table`.

    Attributes
    ----------
    groups : tuple of BatchTable
        Group ``i``'s table (``groups[i].block_table`` is what its attention layers take).
    """

    def __init__(self, manager: HybridKVCacheManager, max_rows: int, max_blocks_per_seq: Any,
                 kernel_block_size: Any = None) -> None:
        managers = manager.managers
        count = len(managers)
        blocks = self._per_group(max_blocks_per_seq, count, "max_blocks_per_seq")
        kernels = self._per_group(kernel_block_size, count, "kernel_block_size")
        self.groups = tuple(BatchTable(m, max_rows, b, kernel_block_size=k)
                            for m, b, k in zip(managers, blocks, kernels))

    @staticmethod
    def _per_group(value: Any, count: int, name: str) -> list[Any]:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} groups")
            return list(value)
        return [value] * count

    # Every row operation is checked by the first group's table (all hold the same
    # rows), so a bad argument raises there before any group changes.
    def add(self, seq_ids: Any, rows: Any = None) -> np.ndarray:
        """Give each sequence a free row in every group; the rows (int32)."""
        result = self.groups[0].add(seq_ids, rows)
        for table in self.groups[1:]:
            table.add(seq_ids, result)
        return result

    def remove(self, seq_ids: Any) -> np.ndarray:
        """Free these sequences' rows in every group; the rows (int32)."""
        result = self.groups[0].remove(seq_ids)
        for table in self.groups[1:]:
            table.remove(seq_ids)
        return result

    def move(self, src_rows: Any, dst_rows: Any) -> None:
        """Move occupied rows into free rows, pairwise, in every group."""
        self.groups[0].move(src_rows, dst_rows)
        for table in self.groups[1:]:
            table.move(src_rows, dst_rows)

    def swap(self, rows_a: Any, rows_b: Any) -> None:
        """Exchange rows pairwise in every group."""
        for table in self.groups:
            table.swap(rows_a, rows_b)

    def condense(self) -> tuple[np.ndarray, np.ndarray]:
        """Condense every group alike (see BatchTable.condense); the moves made."""
        src, dst = self.groups[0].condense()
        for table in self.groups[1:]:
            table.move(src, dst)
        return src, dst

    def rows(self, seq_ids: Any) -> np.ndarray:
        """Each sequence's row (the same in every group)."""
        return self.groups[0].rows(seq_ids)

    def update(self) -> tuple[int, ...]:
        """Update every group's table; the rows changed in each.

        Every group is checked before any changes: a row too long in one group raises
        ``ValueError`` and no group changes.
        """
        for table in self.groups:
            table._check_update()
        return tuple(table.update() for table in self.groups)

    @property
    def num_rows(self) -> int:
        return self.groups[0].num_rows

    @property
    def seq_ids(self) -> np.ndarray:
        return self.groups[0].seq_ids

    def __len__(self) -> int:
        return len(self.groups[0])

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.groups[0]

    def __repr__(self) -> str:
        return f"HybridBatchTable(groups={len(self.groups)}, num_rows={self.num_rows})"
