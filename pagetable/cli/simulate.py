"""``pagetable simulate``: a continuous-batching serving simulation of the KV-cache manager.

An engine's scheduler drives :class:`pagetable.KVCacheManager` step by step on a
synthetic workload, and the same decisions drive the pure-Python reference manager in
lockstep: every result (slots, copies, block tables, sequence lengths) is checked
equal, and the host time of the table work is measured for both.

Workload (seeded, :func:`pagetable.cli.workloads.serving_requests`): Poisson arrivals
(``--rate`` requests per step); prompt and output lengths lognormal, clipped, with means
matching the datasets in the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): ShareGPT
about 161 prompt / 338 output tokens, Alpaca about 19 / 58.  ``--n`` samples per
request share the prompt through ``fork``.  ``--workload shared-prefix``
(:func:`pagetable.cli.workloads.shared_prefix_requests`): conversations that start from
one of a few long system prompts and resend their whole history each turn, with token
ids; a conversation's next turn arrives a few steps after its answer is finished.

With ``--prefix-caching`` the managers cache full prompt blocks by their chained hash:
each prompt is admitted with its token ids and each decoded token appended with its
id; the summary gives the hit rate next to the best any cache could reach on the same
trace (:func:`pagetable.cli._best_hits.best_hits`: no eviction, same rules).

Each step, as an engine would:

1. decode: every running sequence gets one token (``append_tokens``, all-or-nothing);
   while it raises ``OutOfBlocksError`` the newest running request is preempted by
   recompute (freed, put back at the head of the queue with its progress);
2. admission: waiting requests are admitted in order while the batch has room and the
   pool keeps a 1% watermark free: ``add_sequence`` for the prompt, ``fork`` for the
   other samples, and for a recomputed request ``append_tokens`` of each sample's
   generated tokens;
3. the step's inputs: the slot mapping (new tokens' slots, prefill then decode), the
   block table and sequence lengths of the batch;
4. finished sequences are freed.

"Table work" is the time spent inside manager calls (steps 1-4), nothing else.

``--model hybrid`` runs :class:`pagetable.HybridKVCacheManager` instead, over two
KV-cache groups (full attention, and a ``--window``-token sliding window standing for
``--window-ratio`` layers per full layer), beside the reference hybrid; the summary
adds each group's blocks per request against an all-full-attention model, the blocks
the window released and each group's hit rate.  ``--spec-decode K`` makes each decode
step append ``1 + K`` tokens (one plus ``K`` drafts) and roll back the rejected drafts
(accepted drafts drawn, seeded, with ``--accept-rate``).  ``--kernel-block-size``
exports the block tables in kernel blocks.

A pool too small for the load thrashes: requests are preempted over and over and few
finish.  The summary says so in a ``warning:`` line, since its figures then describe
recomputation rather than serving.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagetable import HybridKVCacheManager, HybridResult, KVCacheManager, OutOfBlocksError
from pagetable.reference import ReferenceHybridKVCacheManager, ReferenceKVCacheManager

from . import _hybrid, _options, workloads
from ._best_hits import best_hits
from ._progress import Progress

HELP = "continuous-batching serving simulation of the KV-cache manager, checked and timed"

# The most sequences (requests x samples) one run may draw: its Python bookkeeping
# costs about a kilobyte each, so this stays within a few gigabytes.
MAX_SEQUENCES = 2_000_000
# A larger pool than any run here fills; the pure-Python reference holds a list entry
# per block (2**22 blocks: about 0.2 GB and 0.2 s to build).
MAX_NUM_BLOCKS = 1 << 22
# The most token ids a run may hold (8 bytes each), for a workload with token ids.
MAX_TOKEN_IDS = 200_000_000
WORKLOADS = (*sorted(workloads.SERVING), "shared-prefix")
# The shared-prefix workload's own options and their defaults.
SHARED_PREFIX_DEFAULTS = {"system_prompts": 4, "system_prompt_tokens": 1024, "turns": 4}
HASH_ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")


@dataclass
class Request:
    """One user request: a prompt and ``n`` samples, each with its own output length."""

    request_id: int
    arrival: int
    prompt_len: int
    output_lens: list[int]
    generated: list[int] = field(default_factory=list)   # per sample, kept across preemption
    seq_ids: list[int] = field(default_factory=list)     # live sequence per sample, -1 when done
    preemptions: int = 0
    # Token ids (int64), when the workload has them or prefix caching needs them.
    prompt_ids: np.ndarray | None = None
    output_ids: list[np.ndarray] | None = None
    # A conversation's next turn: its index in the workload, and the steps it arrives
    # after this request has finished (shared-prefix).
    next_turn: int = -1
    think: int = 0


def make_workload(args: argparse.Namespace) -> list[Request]:
    """Every request of the run, seeded; a later turn of a conversation has arrival -1
    until the turn before it has finished."""
    if args.workload == "shared-prefix":
        turns = workloads.shared_prefix_requests(args.steps, args.rate, args.n, args.seed, args.system_prompts,
                                                 args.system_prompt_tokens, args.turns)
        return [
            Request(i, t.arrival, int(t.prompt.size), [int(o.size) for o in t.outputs], [0] * args.n,
                    [-1] * args.n, prompt_ids=t.prompt, output_ids=t.outputs, next_turn=t.next, think=t.think)
            for i, t in enumerate(turns)
        ]
    steps, prompts, outputs = workloads.serving_requests(args.workload, args.steps, args.rate,
                                                         args.n, args.seed)
    requests = [
        Request(i, int(steps[i]), int(prompts[i]), outputs[i].tolist(), [0] * args.n, [-1] * args.n)
        for i in range(len(prompts))
    ]
    if args.prefix_caching:
        # These workloads have lengths only: random token ids, which share nothing.
        ids = iter(workloads.random_token_ids(args.seed, np.concatenate([prompts, outputs.reshape(-1)])))
        for request in requests:
            request.prompt_ids = next(ids)
        for request in requests:
            request.output_ids = [next(ids) for _ in range(args.n)]
    return requests


class TableWork:
    """Runs each manager call on the fast manager and the reference, timing each.

    The scheduler sees the fast manager's answers; the reference's must be equal.
    """

    def __init__(self, fast: KVCacheManager, reference: ReferenceKVCacheManager | None) -> None:
        self.fast = fast
        self.reference = reference
        self.fast_ns = 0
        self.reference_ns = 0
        self.calls = 0

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        clock = time.perf_counter_ns
        start = clock()
        error: OutOfBlocksError | None = None
        result: Any
        try:
            result = getattr(self.fast, name)(*args, **kwargs)
        except OutOfBlocksError as exc:
            result, error = OutOfBlocksError, exc
        self.fast_ns += clock() - start
        self.calls += 1
        if self.reference is not None:
            start = clock()
            expected: Any
            try:
                expected = getattr(self.reference, name)(*args, **kwargs)
            except OutOfBlocksError:
                expected = OutOfBlocksError
            self.reference_ns += clock() - start
            if not _same(result, expected):
                raise AssertionError(f"{name}{args!r}: pagetable gave {result!r}, the reference {expected!r}")
        if error is not None:
            raise error
        return result

    def query(self, name: str) -> Any:
        """A property read (free blocks, cache figures), timed and compared like a call."""
        clock = time.perf_counter_ns
        start = clock()
        value = getattr(self.fast, name)
        self.fast_ns += clock() - start
        if self.reference is not None:
            start = clock()
            expected = getattr(self.reference, name)
            self.reference_ns += clock() - start
            if not _same(value, expected):
                raise AssertionError(f"{name}: pagetable {value}, the reference {expected}")
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "slots"):
        fields = ("slots", "copy_src", "copy_dst", "num_cached_tokens")
        return all(_same(getattr(a, k, None), getattr(b, k, None)) for k in fields)
    if hasattr(a, "hit_rate"):
        return _cache_stats(a) == _cache_stats(b)
    return a == b


def _cache_stats(stats: Any) -> dict[str, int]:
    """A PrefixCacheStats as plain numbers (the managers' classes may differ)."""
    return {k: int(getattr(stats, k)) for k in ("requests", "queries", "hits", "evictions")}


def _managers(args: argparse.Namespace) -> tuple[Any, Any]:
    """The manager under test and its reference, with or without prefix caching (with
    ``--model hybrid``: the hybrid coordinator over each)."""
    options: dict[str, Any] = {}
    if args.prefix_caching:
        options = {"enable_prefix_caching": True, "hash_algorithm": args.hash_algorithm}
    if args.model == "hybrid":
        groups = _hybrid.group_specs(args)
        hybrid = HybridKVCacheManager(groups, manager_class=KVCacheManager, **options)
        return hybrid, None if args.no_reference else ReferenceHybridKVCacheManager(groups, **options)
    fast = KVCacheManager(args.num_blocks, args.block_size, **options)
    reference = None if args.no_reference else ReferenceKVCacheManager(args.num_blocks, args.block_size, **options)
    return fast, reference


def _fewest(value: Any) -> int:
    """Free blocks: a hybrid's is one count per group, and admission needs every group."""
    return min(value) if isinstance(value, tuple) else int(value)


def _slots(result: Any) -> np.ndarray:
    """The slots of the new tokens; a hybrid's, those of the full-attention group."""
    return result[0].slots if isinstance(result, HybridResult) else result.slots


def _copies(result: Any) -> int:
    return sum(len(r.copy_src) for r in result) if isinstance(result, HybridResult) else len(result.copy_src)


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation and return its figures."""
    _fill_defaults(args)
    requests = make_workload(args)
    block_size = args.block_size
    caching = args.prefix_caching
    fast, reference = _managers(args)
    table = TableWork(fast, reference)
    hybrid = args.model == "hybrid"
    # The full-attention group stands for the whole model in the single-manager figures.
    main_manager = fast.managers[0] if hybrid else fast
    account = _hybrid.HybridAccount(len(fast.groups)) if hybrid else None
    kernel: dict[str, Any] = {} if args.kernel_block_size is None else {"kernel_block_size": args.kernel_block_size}
    kernel_per_block = 1 if args.kernel_block_size is None else block_size // args.kernel_block_size
    drafts = args.spec_decode
    draft_rng = np.random.default_rng([args.seed, 7])
    spec = {"drafts": drafts, "accept_rate": args.accept_rate, "draft_slots": 0, "rolled_back": 0, "accepted": 0}
    committed: dict[int, int] = {}      # seq id -> tokens its last decode step committed
    watermark = max(1, args.num_blocks // 100)

    # Not yet arrived, by (arrival step, request id); later turns join once released.
    pending = [(r.arrival, r.request_id) for r in requests if r.arrival >= 0]
    heapq.heapify(pending)
    waiting: deque[Request] = deque()    # arrived, not running
    running: list[Request] = []          # admission order; the last is the newest
    owner: dict[int, tuple[Request, int]] = {}   # seq id -> (request, sample)
    next_seq = 0
    num_running_seqs = 0
    first_admissions: list[Request] = []          # the trace the best hit rate is computed on
    first_hits = 0                                # tokens those admissions found cached

    per_step_fast = np.zeros(args.steps)
    per_step_reference = np.zeros(args.steps)
    running_seqs = np.zeros(args.steps, dtype=np.int64)
    used_blocks = np.zeros(args.steps, dtype=np.int64)
    sample_every = max(1, args.steps // 250)
    utilisation_steps: list[int] = []
    utilisation: list[float] = []
    shared_saved: list[int] = []
    live_lengths: list[float] = []
    totals = dict(prefill_tokens=0, decode_tokens=0, recomputed_tokens=0, preemptions=0,
                  finished_requests=0, copies=0, admitted=0, rejected=0, arrived=0, cached_tokens=0)
    progress = Progress(args.steps, "steps", enabled=not args.quiet)

    def live_ids(request: Request) -> list[int]:
        return [s for s in request.seq_ids if s >= 0]

    def preempt(request: Request) -> None:
        nonlocal num_running_seqs
        ids = live_ids(request)
        table("free_sequence", np.array(ids, dtype=np.int64))
        for s in ids:
            del owner[s]
        num_running_seqs -= len(ids)
        request.seq_ids = [-1 if s >= 0 else -2 for s in request.seq_ids]  # -2: sample finished
        request.preemptions += 1
        totals["preemptions"] += 1
        running.remove(request)
        waiting.appendleft(request)

    def admit(request: Request) -> list[np.ndarray] | None:
        """Prefill a request's samples; None (and nothing changed) if the pool is short."""
        nonlocal next_seq, num_running_seqs, first_hits
        samples = [i for i, s in enumerate(request.seq_ids) if s != -2]
        room = _fewest(table.query("num_free_blocks")) - watermark
        need = -(-request.prompt_len // block_size) + len(samples)
        if room < need:
            if not caching:
                return None
            # Hit blocks that other sequences hold cost nothing.  The pool is short, so
            # the lookup is worth its hashing; a cached-free hit block is counted free and
            # still taken, so this admission may use the watermark by that many blocks,
            # and add_sequence itself refuses (changing nothing) what cannot fit at all.
            hit_blocks = table("count_cached_tokens", request.prompt_ids) // block_size
            if room < need - hit_blocks:
                return None
        ids = list(range(next_seq, next_seq + len(samples)))
        try:
            if caching:
                added = table("add_sequence", ids[0], request.prompt_len, token_ids=request.prompt_ids)
            else:
                added = table("add_sequence", ids[0], request.prompt_len)
        except OutOfBlocksError:
            return None
        next_seq += len(samples)
        slots = [_slots(added)]
        for child in ids[1:]:
            table("fork", ids[0], child)
        progress_made = [request.generated[i] for i in samples]
        if any(progress_made):
            if not table("can_append", ids, progress_made):
                table("free_sequence", ids)
                return None
            if caching:
                assert request.output_ids is not None
                generated = np.concatenate([request.output_ids[i][:request.generated[i]] for i in samples])
                result = table("append_tokens", ids, progress_made, token_ids=generated)
            else:
                result = table("append_tokens", ids, progress_made)
            slots.append(_slots(result))
            totals["copies"] += _copies(result)
            totals["recomputed_tokens"] += sum(progress_made)
        cached = int(added.num_cached_tokens) if caching else 0
        totals["cached_tokens"] += cached
        if request.preemptions:
            totals["recomputed_tokens"] += request.prompt_len
        else:
            first_admissions.append(request)
            first_hits += cached
        for sample, seq in zip(samples, ids):
            request.seq_ids[sample] = seq
            owner[seq] = (request, sample)
        num_running_seqs += len(ids)
        totals["prefill_tokens"] += request.prompt_len + sum(progress_made)
        totals["admitted"] += 1
        return slots

    # The cyclic garbage collector would otherwise run at random points, inside either
    # manager's timed calls; it runs between steps instead, outside the timing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    wall_start = time.perf_counter()
    for step in range(args.steps):
        if step % 64 == 0:
            gc.collect()
        while pending and pending[0][0] <= step:
            waiting.append(requests[heapq.heappop(pending)[1]])
            totals["arrived"] += 1
        table.fast_ns = table.reference_ns = 0

        # 1. Decode: one token for every running sequence.  append_tokens is
        # all-or-nothing, so the scheduler tries it and preempts while the pool is short.
        # With --spec-decode K each sequence appends 1 + K tokens, K of them drafts.
        decode_slots = []
        committed.clear()
        while running:
            decode_ids = np.array([s for r in running for s in r.seq_ids if s >= 0], dtype=np.int64)
            try:
                if caching:
                    decoded = np.array([t for r in running for i, s in enumerate(r.seq_ids) if s >= 0
                                        for t in _draft(r.output_ids[i], r.generated[i], 1 + drafts)],  # type: ignore[index]
                                       dtype=np.int64)
                    result = table("append_tokens", decode_ids, 1 + drafts, token_ids=decoded)
                else:
                    result = table("append_tokens", decode_ids, 1 + drafts)
            except OutOfBlocksError:
                preempt(running[-1])
                continue
            decode_slots.append(_slots(result))
            totals["copies"] += _copies(result)
            if drafts:
                # The verifier keeps the accepted drafts (never past the output's end) and
                # the rejected ones are rolled back.
                remaining = np.array([r.output_lens[i] - r.generated[i] for r in running
                                      for i, s in enumerate(r.seq_ids) if s >= 0], dtype=np.int64)
                accepted = _hybrid.accepted_drafts(draft_rng, len(decode_ids), drafts, args.accept_rate)
                kept = np.minimum(1 + accepted, remaining)
                rejected = 1 + drafts - kept
                if rejected.any():
                    table("rollback", decode_ids, rejected)
                spec["draft_slots"] += drafts * len(decode_ids)
                spec["rolled_back"] += int(rejected.sum())
                spec["accepted"] += int((kept - 1).sum())
                committed.update(zip(decode_ids.tolist(), kept.tolist()))
                totals["decode_tokens"] += int(kept.sum())
            else:
                totals["decode_tokens"] += len(decode_ids)
            break
        else:
            decode_ids = np.empty(0, dtype=np.int64)

        # 2. Admission, in arrival order (preempted requests first).
        prefill_ids: list[int] = []
        prefill_slots: list[np.ndarray] = []
        while waiting and num_running_seqs + sum(1 for s in waiting[0].seq_ids if s != -2) <= args.max_batch:
            slots = admit(waiting[0])
            if slots is None:
                if not running:
                    # Even an otherwise empty pool cannot hold it: reject, as an engine
                    # rejects a prompt longer than its KV cache.
                    waiting.popleft()
                    totals["rejected"] += 1
                    continue
                break
            request = waiting.popleft()
            running.append(request)
            prefill_ids.extend(live_ids(request))
            prefill_slots.extend(slots)

        # 3. The step's kernel inputs.
        batch = np.concatenate([np.array(prefill_ids, dtype=np.int64), decode_ids])
        step_slots = prefill_slots + decode_slots
        if batch.size:
            start = time.perf_counter_ns()
            slot_mapping = np.concatenate(step_slots) if step_slots else np.empty(0, np.int64)
            table.fast_ns += time.perf_counter_ns() - start
            if hybrid:
                tables = [table("block_table", batch, group=g, **kernel) for g in range(len(fast.groups))]
                assert account is not None
                account.window_table(batch, tables[1], kernel_per_block)
            else:
                table("block_table", batch, **kernel)
            table("seq_lens", batch)
            if reference is not None:
                start = time.perf_counter_ns()
                np.concatenate(step_slots) if step_slots else np.empty(0, np.int64)
                table.reference_ns += time.perf_counter_ns() - start
            del slot_mapping

        # 4. The decoded sequences advance; finished ones are freed, and a finished
        # turn of a conversation sends the next one a few steps later.
        finished = []
        for seq in decode_ids.tolist():
            request, sample = owner[seq]
            request.generated[sample] += committed.get(seq, 1)
            if request.generated[sample] >= request.output_lens[sample]:
                finished.append(seq)
                request.seq_ids[sample] = -2
                del owner[seq]
                if all(s == -2 for s in request.seq_ids):
                    running.remove(request)
                    totals["finished_requests"] += 1
                    if request.next_turn >= 0:
                        follow_up = requests[request.next_turn]
                        follow_up.arrival = step + follow_up.think
                        heapq.heappush(pending, (follow_up.arrival, follow_up.request_id))
        if finished:
            table("free_sequence", np.array(finished, dtype=np.int64))
            num_running_seqs -= len(finished)
            if account is not None:
                account.forget(finished)
        if caching:
            table.query("prefix_cache_stats")
            table.query("num_cached_blocks")

        per_step_fast[step] = table.fast_ns / 1e3
        per_step_reference[step] = table.reference_ns / 1e3
        running_seqs[step] = num_running_seqs
        used_blocks[step] = main_manager.num_blocks - main_manager.num_free_blocks
        if account is not None:
            account.step([m.num_blocks - m.num_free_blocks for m in fast.managers], len(running))
        if step % sample_every == 0 and num_running_seqs:
            stored, allocated, saved, mean_length = _memory(main_manager, [s for r in running for s in live_ids(r)])
            utilisation_steps.append(step)
            utilisation.append(stored / allocated if allocated else 1.0)
            shared_saved.append(saved)
            live_lengths.append(mean_length)
        progress.update(step + 1, f"running {num_running_seqs} waiting {len(waiting)} "
                                  f"free {fast.num_free_blocks}")
    progress.close()
    wall = time.perf_counter() - wall_start
    if gc_was_enabled:
        gc.enable()

    # Everything left is freed: the pool must be whole again.
    leftover = [s for r in running for s in live_ids(r)]
    if leftover:
        table("free_sequence", leftover)
    fast.check()
    if reference is not None:
        reference.check()
    for manager in fast.managers if hybrid else [fast]:
        if manager.num_free_blocks != manager.num_blocks:
            raise AssertionError(f"leak: {manager.num_blocks - manager.num_free_blocks} blocks not returned")

    cache: dict[str, Any] = {"first_admissions": first_admissions, "first_hits": first_hits}
    group_stats: tuple[Any, ...] = table.query("prefix_cache_stats") if hybrid else ()
    if caching:
        stats, cached_blocks = table.query("prefix_cache_stats"), table.query("num_cached_blocks")
        cache["stats"] = _cache_stats(stats[0] if hybrid else stats)
        cache["cached_blocks"] = int(cached_blocks[0] if hybrid else cached_blocks)
    extra: dict[str, Any] = {}
    if account is not None:
        extra["hybrid"] = account.figures(args, group_stats)
    if drafts:
        extra["spec_decode"] = spec
    return _figures(args, dict(extra=extra,
        requests=requests, totals=totals, wall=wall, per_step_fast=per_step_fast,
        per_step_reference=per_step_reference, running_seqs=running_seqs, used_blocks=used_blocks,
        utilisation_steps=utilisation_steps, utilisation=utilisation, shared_saved=shared_saved,
        live_lengths=live_lengths, cache=cache))


def _draft(output_ids: np.ndarray, generated: int, count: int) -> list[int]:
    """The ``count`` tokens a decode step appends: the answer's next tokens (drafts past
    its end are rolled back, whatever they are)."""
    tokens = output_ids[generated:generated + count].tolist()
    return tokens + [0] * (count - len(tokens))


def _memory(manager: KVCacheManager, seq_ids: list[int]) -> tuple[int, int, int, float]:
    """(tokens stored, slots allocated, blocks saved by sharing, mean sequence length) over
    the live sequences."""
    indptr, indices, last = manager.flashinfer_layout(seq_ids)
    pages = indptr[1:] - indptr[:-1]
    lengths = np.where(pages > 0, (pages - 1) * manager.block_size + last, 0)
    fill = np.full(indices.shape[0], manager.block_size, dtype=np.int64)
    has_pages = indptr[1:] > indptr[:-1]
    fill[indptr[1:][has_pages] - 1] = last[has_pages]
    unique, first = np.unique(indices, return_index=True)
    return (int(fill[first].sum()), int(unique.shape[0]) * manager.block_size,
            int(indices.shape[0] - unique.shape[0]), float(lengths.mean()) if lengths.size else 0.0)


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    """p50, p99 and mean of ``values``; None each when there are none (JSON has no nan)."""
    if values.size == 0:
        return {"p50_us": None, "p99_us": None, "mean_us": None}
    return {"p50_us": float(np.percentile(values, 50)), "p99_us": float(np.percentile(values, 99)),
            "mean_us": float(values.mean())}


def _ratio(reference: float | None, fast: float | None) -> float | None:
    return reference / fast if reference is not None and fast else None


def thrashing(figures: dict[str, Any]) -> bool:
    """Whether preemption dominates the run: more preemptions than finished requests.

    The default run preempts 42 times and finishes 564 requests; an eight-block pool
    preempts 923 times and finishes none.  The threshold of ten spares short runs in
    which a handful of preemptions outnumber the few requests that had time to finish.
    """
    preemptions = figures["preemptions"]
    return preemptions >= 10 and preemptions > figures["requests_finished"]


def _figures(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    fast_us, reference_us = run["per_step_fast"], run["per_step_reference"]
    running_seqs = run["running_seqs"]
    active = running_seqs > 0
    full = running_seqs >= args.max_batch
    totals = run["totals"]
    figures: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("plot", "json", "command")},
        "steps": args.steps,
        "requests_arrived": totals["arrived"],
        "requests_finished": totals["finished_requests"],
        "tokens": totals["prefill_tokens"] + totals["decode_tokens"],
        **{k: v for k, v in totals.items() if k not in ("arrived", "cached_tokens")},
        "mean_running_sequences": float(running_seqs.mean()),
        "max_running_sequences": int(running_seqs.max()),
        "max_batch": args.max_batch,
        "steps_at_max_batch": int(full.sum()),
        "peak_used_blocks": int(run["used_blocks"].max()),
        "wall_s": run["wall"],
        "table_work_pagetable": _percentiles(fast_us[active]),
        "kv_utilisation_mean": float(np.mean(run["utilisation"])) if run["utilisation"] else None,
        "live_sequence_tokens_mean": float(np.mean(run["live_lengths"])) if run["live_lengths"] else None,
        "blocks_saved_by_sharing_mean": float(np.mean(run["shared_saved"])) if run["shared_saved"] else 0.0,
        "blocks_saved_by_sharing_max": int(max(run["shared_saved"], default=0)),
        "checked_equal": not args.no_reference,
        "prefix_cache": _prefix_cache_figures(args, run),
        "series": {
            "per_step_pagetable_us": fast_us.tolist(),
            "per_step_reference_us": reference_us.tolist() if not args.no_reference else None,
            "running_sequences": running_seqs.tolist(),
            "utilisation_steps": run["utilisation_steps"],
            "utilisation": run["utilisation"],
        },
    }
    figures.update(run["extra"])
    figures["thrashing"] = thrashing(figures)
    if not args.no_reference:
        fast, reference = figures["table_work_pagetable"], _percentiles(reference_us[active])
        figures["table_work_reference"] = reference
        figures["ratio_p50"] = _ratio(reference["p50_us"], fast["p50_us"])
        figures["ratio_mean"] = _ratio(reference["mean_us"], fast["mean_us"])
        if full.any():
            at: dict[str, Any] = {"pagetable": _percentiles(fast_us[full]),
                                  "reference": _percentiles(reference_us[full])}
            at["ratio_p50"] = _ratio(at["reference"]["p50_us"], at["pagetable"]["p50_us"])
            figures["at_max_batch"] = at
    return figures


def _prefix_cache_figures(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """Hit rate of the first admissions beside the best on that trace, and what was saved.

    The trace is every request's first admission, in order: a re-admission after
    preemption finds its own blocks again, which says nothing about the workload.
    """
    cache, totals = run["cache"], run["totals"]
    first = cache["first_admissions"]
    prompt_tokens = sum(r.prompt_len for r in first)
    figures: dict[str, Any] = {
        "enabled": args.prefix_caching,
        "hash_algorithm": args.hash_algorithm if args.prefix_caching else None,
        "requests": len(first),
        "prompt_tokens": prompt_tokens,
        "hit_tokens": cache["first_hits"],
        "hit_rate": cache["first_hits"] / prompt_tokens if prompt_tokens else 0.0,
        "best_hit_tokens": None,
        "best_hit_rate": None,
        "prefill_tokens_saved": totals["cached_tokens"],
        "blocks_saved": totals["cached_tokens"] // args.block_size,
        "evictions": cache["stats"]["evictions"] if args.prefix_caching else 0,
        "manager_stats": None,
        "cached_blocks_at_end": cache.get("cached_blocks", 0),
    }
    if args.prefix_caching:
        stats = cache["stats"]
        figures["manager_stats"] = dict(stats, hit_rate=stats["hits"] / stats["queries"] if stats["queries"] else 0.0)
    if first and first[0].prompt_ids is not None:
        bound = best_hits(args.block_size, [(r.prompt_ids, r.output_ids) for r in first])
        figures["best_hit_tokens"] = bound.hits
        figures["best_hit_rate"] = bound.hit_rate
    return figures


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _summary(figures: dict[str, Any]) -> str:
    c = figures["config"]
    max_batch = figures["max_batch"]
    workload = c["workload"]
    if workload == "shared-prefix":
        workload += (f" ({c['system_prompts']} system prompts of {c['system_prompt_tokens']} tokens, "
                     f"{c['turns']} turns on average)")
    caching = f", prefix caching ({c['hash_algorithm']})" if c["prefix_caching"] else ""
    lines = [
        f"pagetable simulate: {workload} workload, rate {c['rate']} req/step, n={c['n']}, "
        f"block size {c['block_size']}, {c['num_blocks']} blocks, max batch {max_batch}{caching}, seed {c['seed']}",
        f"  steps              {figures['steps']}  ({figures['wall_s']:.1f} s wall)",
        f"  requests           {figures['requests_arrived']} arrived, {figures['admitted']} admitted "
        f"(incl. re-admissions), {figures['requests_finished']} finished, {figures['preemptions']} preemptions"
        + (f", {figures['rejected']} rejected (larger than the pool)" if figures["rejected"] else ""),
        f"  tokens             {figures['tokens']} ({figures['prefill_tokens']} prefill incl. "
        f"{figures['recomputed_tokens']} recomputed, {figures['decode_tokens']} decode), "
        f"{figures['copies']} copy-on-write copies",
        f"  running sequences  mean {figures['mean_running_sequences']:.0f}, max {figures['max_running_sequences']}, "
        f"{figures['steps_at_max_batch']} steps at {max_batch} (max batch); "
        f"peak blocks used {figures['peak_used_blocks']}",
    ]
    fast = figures["table_work_pagetable"]
    if fast["p50_us"] is None:
        lines.append("  table work / step  none: no step had a running sequence")
    elif "table_work_reference" in figures:
        ref = figures["table_work_reference"]
        lines += [
            "  table work / step  p50 us    p99 us    mean us",
            f"    pagetable        {_us(fast['p50_us']):>8}  {_us(fast['p99_us']):>8}  {_us(fast['mean_us']):>8}",
            f"    reference        {_us(ref['p50_us']):>8}  {_us(ref['p99_us']):>8}  {_us(ref['mean_us']):>8}",
            f"    ratio            {_times(figures['ratio_p50']):>9} (p50)  {_times(figures['ratio_mean'])} (mean); "
            f"results checked equal every step",
        ]
        if "at_max_batch" in figures:
            at = figures["at_max_batch"]
            lines.append(
                f"    at {max_batch} running   pagetable p50 {_us(at['pagetable']['p50_us'])} us, reference p50 "
                f"{_us(at['reference']['p50_us'])} us: {_times(at['ratio_p50'])}")
    else:
        lines.append(f"  table work / step  pagetable p50 {_us(fast['p50_us'])} us, p99 {_us(fast['p99_us'])} us "
                     f"(reference skipped)")
    util = figures["kv_utilisation_mean"]
    if util is None:
        lines.append("  KV utilisation     - (no step had a running sequence)")
    else:
        # What is not used is the unfilled tail of each sequence's last block: under one
        # block per sequence, so the shorter the sequences the larger the share.
        lines += [
            f"  KV utilisation     {100 * util:.1f}% of allocated slots hold tokens ({100 * (1 - util):.1f}% unused)",
            f"                     unused: each sequence's part-filled last block (under {c['block_size']} "
            f"slots each; live sequences average {figures['live_sequence_tokens_mean']:.0f} tokens)",
        ]
    lines += _prefix_cache_summary(figures["prefix_cache"])
    if c["n"] > 1:
        how = "forking the prompt and by prefix-cache hits" if c["prefix_caching"] else "forking the prompt"
        lines.append(f"  sharing            {figures['blocks_saved_by_sharing_mean']:.0f} blocks saved on average "
                     f"(max {figures['blocks_saved_by_sharing_max']}) by {how}")
    lines += _hybrid.summary(figures)
    lines.append("  no leak: every block back in the pool after freeing all sequences; check() passed")
    if figures["thrashing"]:
        lines.append(
            f"warning: the pool thrashes: {figures['preemptions']} preemptions against "
            f"{figures['requests_finished']} finished requests, so the figures above measure "
            f"recomputation, not serving; give it more --num-blocks, or lower --rate or --n")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _prefix_cache_summary(cache: dict[str, Any]) -> list[str]:
    best = cache["best_hit_rate"]
    if not cache["enabled"]:
        if best is None:
            return []
        return [f"  prefix cache       off (--prefix-caching turns it on): hit rate 0.0%; best possible on "
                f"this trace {_percent(best)}"]
    stats = cache["manager_stats"]
    return [
        f"  prefix cache       hit rate {_percent(cache['hit_rate'])} of the prompt tokens of "
        f"{cache['requests']} first admissions; best possible on this trace {_percent(best)}",
        f"                     saved {cache['prefill_tokens_saved']:,} prefill tokens ({cache['blocks_saved']:,} "
        f"blocks) over all admissions; {cache['evictions']:,} evictions; manager: {stats['requests']} "
        f"lookups, hit rate {_percent(stats['hit_rate'])}",
    ]


def _plot(figures: dict[str, Any], path: str) -> None:
    # run() has checked that matplotlib imports.
    import matplotlib  # type: ignore[import-not-found]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    series = figures["series"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(series["utilisation_steps"], [100 * u for u in series["utilisation"]], label="KV utilisation %")
    top.set_ylabel("utilisation %")
    twin = top.twinx()
    twin.plot(series["running_sequences"], color="gray", alpha=0.5, label="running sequences")
    twin.set_ylabel("running sequences")
    top.set_title("pagetable simulate")
    bottom.plot(series["per_step_pagetable_us"], label="pagetable", linewidth=0.7)
    if series["per_step_reference_us"] is not None:
        bottom.plot(series["per_step_reference_us"], label="reference (pure Python)", linewidth=0.7)
    bottom.set_yscale("log")
    bottom.set_ylabel("table work per step (us)")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


EPILOG = (
    "With --prefix-caching the summary (and the JSON's prefix_cache) gives: the hit rate, the "
    "share of the prompt tokens of every request's first admission that were found cached "
    "(re-admissions after preemption find their own blocks and are left out); beside it the best "
    "hit rate possible on that same trace, computed from the trace alone: a cache that never "
    "evicts, under the manager's rules (full blocks only, a block hits only when its whole prefix "
    "is identical, at most num_tokens - 1 tokens hit per prompt, everything an admitted request "
    "holds cached for every later one); the prefill tokens and blocks saved over all admissions; "
    "the evictions; and the manager's own prefix_cache_stats. Without --prefix-caching the "
    "shared-prefix workload still reports the best hit rate, so the two runs compare.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    integer = _options.integer
    parser.add_argument("--workload", choices=WORKLOADS, default="sharegpt",
                        help="sharegpt (the default: ~161 prompt / ~338 output tokens) or alpaca (~19 / ~58): "
                             "lengths only; shared-prefix: conversations with token ids that start from a few "
                             "long system prompts and resend their whole history each turn (user messages "
                             "~64 tokens, answers ~128, a next turn ~50 steps after an answer ends, context "
                             "at most 8192 tokens)")
    parser.add_argument("--steps", type=integer(1, 1_000_000), default=1000,
                        help="engine steps to simulate, 1..1,000,000 (default 1000)")
    parser.add_argument("--rate", type=_options.positive_real(10_000), default=1.0,
                        help="mean request arrivals per step, in (0, 10000] (default 1.0); shared-prefix: "
                             "conversations start at --rate / --turns per step and each later turn arrives "
                             "once the answer before it is done, so about --rate per step in the long run")
    parser.add_argument("--n", type=integer(1, 1024), default=1,
                        help="parallel samples per request, via fork, 1..1024 (default 1)")
    parser.add_argument("--block-size", type=integer(1, 2**31 - 1), default=16,
                        help="tokens per KV block (default 16)")
    parser.add_argument("--num-blocks", type=integer(1, MAX_NUM_BLOCKS), default=7168,
                        help="KV blocks in the pool (default 7168: tight enough that long requests "
                             "cause preemptions)")
    parser.add_argument("--max-batch", type=integer(1, 1_000_000), default=256,
                        help="most running sequences (default 256)")
    parser.add_argument("--seed", type=_options.seed, default=0, help="workload seed, >= 0 (default 0)")
    parser.add_argument("--system-prompts", type=integer(1, 1024), default=None,
                        help="shared-prefix: distinct system prompts, 1..1024 (default 4)")
    parser.add_argument("--system-prompt-tokens", type=integer(1, 4096), default=None,
                        help="shared-prefix: tokens per system prompt, 1..4096 (default 1024)")
    parser.add_argument("--turns", type=integer(1, workloads.SHARED_PREFIX_MAX_TURNS), default=None,
                        help=f"shared-prefix: mean turns per conversation (geometric), "
                             f"1..{workloads.SHARED_PREFIX_MAX_TURNS} (default 4); conversations start at "
                             f"--rate / --turns per step")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="cache full blocks by their chained hash: prompts are admitted with their token "
                             "ids and decoded tokens appended with theirs; the summary gives the hit rate, "
                             "the prefill tokens and blocks saved, the evictions, and the best hit rate "
                             "possible on the same trace (no eviction, same rules); sharegpt and alpaca get "
                             "random token ids, which share nothing")
    parser.add_argument("--hash-algorithm", choices=HASH_ALGORITHMS, default=None,
                        help="with --prefix-caching: the block hash (default sha256)")
    parser.add_argument("--model", choices=("full", "hybrid"), default="full",
                        help="full (the default): one KV-cache manager, every layer full attention; hybrid: "
                             "two KV-cache groups, full attention and a sliding window (--window, "
                             "--window-ratio), driven as one by HybridKVCacheManager; the summary gives each "
                             "group's blocks per request against an all-full model, the blocks the window "
                             "released and each group's prefix hit rate")
    parser.add_argument("--window", type=integer(1, 2**31 - 1), default=None,
                        help=f"with --model hybrid: the sliding window in tokens (default {_hybrid.DEFAULT_WINDOW})")
    parser.add_argument("--window-ratio", type=integer(1, 1024), default=None,
                        help=f"with --model hybrid: sliding-window layers per full-attention layer "
                             f"(default {_hybrid.DEFAULT_WINDOW_RATIO})")
    parser.add_argument("--kernel-block-size", type=integer(1, 2**31 - 1), default=None,
                        help="export the block tables in kernel blocks of this many tokens every step "
                             "(dividing --block-size)")
    parser.add_argument("--spec-decode", type=integer(0, 64), default=0, metavar="K",
                        help="speculative decoding: each decode step appends 1 + K tokens and rolls back the "
                             "rejected drafts, 0..64 (default 0: plain decoding)")
    parser.add_argument("--accept-rate", type=_options.positive_real(1.0), default=None,
                        help="with --spec-decode: the chance each draft in order is accepted, until the first "
                             "rejection, in (0, 1] (default 0.7)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the pure-Python reference run (by default it runs beside, caching too, "
                             "and every result is checked equal)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--plot", metavar="FILE.png", type=_options.output_file,
                        help="draw utilisation and per-step time (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", type=_options.output_file, help="write the figures as JSON")


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults of the options that only some runs read (left None by the parser)."""
    if args.workload == "shared-prefix":
        for name, value in SHARED_PREFIX_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.prefix_caching and args.hash_algorithm is None:
        args.hash_algorithm = "sha256"
    if args.model == "hybrid":
        args.window = _hybrid.DEFAULT_WINDOW if args.window is None else args.window
        args.window_ratio = _hybrid.DEFAULT_WINDOW_RATIO if args.window_ratio is None else args.window_ratio
    if args.spec_decode and args.accept_rate is None:
        args.accept_rate = 0.7


def _token_ids_asked(args: argparse.Namespace) -> float:
    """About how many token ids the run's workload holds."""
    if args.workload == "shared-prefix":
        return workloads.shared_prefix_tokens(args.steps, args.rate, args.n, args.system_prompt_tokens, args.turns)
    if not args.prefix_caching:
        return 0.0
    prompt, output = workloads.SERVING[args.workload]["prompt"][0], workloads.SERVING[args.workload]["output"][0]
    return args.rate * args.steps * (prompt + args.n * output)


def _features_missing(args: argparse.Namespace) -> str | None:
    """What the options need that this build's managers lack (docs/HYBRID.md), or None."""
    managers: list[tuple[str, Any]] = [("KVCacheManager", KVCacheManager)]
    if not args.no_reference:
        managers.append(("reference model", ReferenceKVCacheManager))
    for name, manager in managers:
        if args.model == "hybrid" and not hasattr(manager, "_append_plan"):
            return f"--model hybrid: this build's {name} lacks the KV-cache group hooks (docs/HYBRID.md)"
        if args.spec_decode and not hasattr(manager, "rollback"):
            return f"--spec-decode: this build's {name} has no rollback (docs/HYBRID.md)"
        if args.kernel_block_size is not None:
            try:
                # Called by keyword on whatever this build has: TypeError if it has none.
                export: Any = manager(1, args.block_size).block_table
                export([], kernel_block_size=args.kernel_block_size)
            except TypeError:
                return f"--kernel-block-size: this build's {name} exports no kernel blocks (docs/HYBRID.md)"
            except (ValueError, OverflowError):
                pass     # the option values themselves are refused below
    return None


def check(args: argparse.Namespace) -> str | None:
    """What makes this combination of options unable to run, or None."""
    if args.workload != "shared-prefix":
        for name in SHARED_PREFIX_DEFAULTS:
            if getattr(args, name) is not None:
                return f"--{name.replace('_', '-')} applies to --workload shared-prefix only"
    if args.hash_algorithm is not None and not args.prefix_caching:
        return "--hash-algorithm needs --prefix-caching"
    if args.model != "hybrid":
        for name in ("window", "window_ratio"):
            if getattr(args, name) is not None:
                return f"--{name.replace('_', '-')} needs --model hybrid"
    if args.accept_rate is not None and not args.spec_decode:
        return "--accept-rate needs --spec-decode"
    if args.kernel_block_size is not None and args.block_size % args.kernel_block_size:
        return f"--kernel-block-size ({args.kernel_block_size}) must divide --block-size ({args.block_size})"
    if why := _features_missing(args):
        return why
    _fill_defaults(args)
    if args.n > args.max_batch:
        return f"--n ({args.n}) cannot exceed --max-batch ({args.max_batch})"
    sequences = args.rate * args.steps * args.n
    if sequences > MAX_SEQUENCES:
        return (f"--rate {args.rate:g} x --steps {args.steps} x --n {args.n} asks for about "
                f"{sequences:,.0f} sequences; at most {MAX_SEQUENCES:,}")
    tokens = _token_ids_asked(args)
    if tokens > MAX_TOKEN_IDS:
        return (f"--rate {args.rate:g} x --steps {args.steps} asks for about {tokens:,.0f} token ids "
                f"({args.workload}, --n {args.n}); at most {MAX_TOKEN_IDS:,}")
    if args.plot and (why := _options.matplotlib_missing()):
        return why
    try:
        _managers(argparse.Namespace(**{**vars(args), "no_reference": True}))
    except (ValueError, OverflowError) as exc:
        return str(exc)
    if args.prefix_caching and not args.no_reference:
        caching: dict[str, Any] = {"enable_prefix_caching": True}
        try:
            ReferenceKVCacheManager(1, 1, **caching)
        except TypeError:
            return "--prefix-caching: this build's reference model has no prefix caching; add --no-reference"
    # Admission keeps a 1% watermark free and wants the prompt's blocks plus one per
    # sample; a pool that cannot fit the shortest request admits nothing at all.
    watermark = max(1, args.num_blocks // 100)
    if args.workload == "shared-prefix":
        shortest_prompt = workloads.shared_prefix_shortest_request(args.system_prompt_tokens)
    else:
        shortest_prompt = workloads.serving_shortest_request(args.workload)
    shortest = -(-shortest_prompt // args.block_size) + args.n
    if args.num_blocks - watermark < shortest:
        return (f"--num-blocks {args.num_blocks} cannot hold any request: admission keeps {watermark} "
                f"block{'s' if watermark > 1 else ''} free and the shortest {args.workload} request "
                f"needs {shortest} (use at least {shortest + watermark})")
    return None


def run(args: argparse.Namespace) -> int:
    """Run the simulation and print its summary; returns the exit status."""
    figures = simulate(args)
    print(_summary(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
        print(f"  figures written to {args.json}")
    if args.plot:
        _plot(figures, args.plot)
        print(f"  plot written to {args.plot}")
    return 0
