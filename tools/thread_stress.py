"""Thread-stress scenarios for pagetable, each checked against a replay afterwards.

Run one scenario per process (a crash then kills only this process)::

    python tools/thread_stress.py --scenario table-inplace --seconds 2
    python tools/thread_stress.py --scenario all --seconds 60 --repeat 100   # hours

It prints one JSON object per scenario run on stdout and exits 0 when every check
passed, 1 when one failed (the JSON says which), and dies with the signal when the
library crashes the interpreter (``faulthandler`` prints the threads' stacks).

How a reader scenario is checked
--------------------------------
One writer thread performs a deterministic sequence of operations (generated as it
goes from a seed and from the outcome of the operations so far) and publishes
``done``, the number of operations completed, after each one.  Reader threads call
batched reads in a loop and record ``(done before, digest of the result, done
after)``.  Afterwards the writer's operations are replayed single-threaded on a fresh
object, and each read must equal the same read made on the replay in some state
``k`` with ``before <= k <= after + 1`` (the writer may have finished an operation
without having published it yet).  A read that matches none of those states saw a
mix of states, or a state that never existed, and fails the run.  A read that raises
``RuntimeError`` is allowed by the threading contract (a change was in progress) and
only counted; any other exception is recorded as the read's outcome and must match
the replay too (``KeyError`` for a sequence absent in that state, say).

The writer retries an operation refused with ``RuntimeError`` (a change that must
move storage while a read is in flight) until it succeeds, so the sequence of
operations stays the one the generator produced.  After every refusal it checks that
the refused call changed nothing (the table's counts and the involved sequences are
as before).  While it waits, readers pause, so that it cannot starve.

Writer-against-writer scenarios race several threads changing one object, in rounds;
between rounds (all threads stopped) the object's invariants are checked and each
thread's own sequences are compared with the thread's own model.

Prefix caching
--------------
``manager-caching`` and ``manager-caching-writers`` run a ``KVCacheManager`` with
prefix caching and KV events on a small pool, with ``--hash-algorithm`` (default
``sha256``, which hashes through hashlib and pickle; ``xxhash_cbor`` is computed in
C where the build has xxHash).  Token ids are cut from a few documents that share
prefixes (``Documents``), so admissions hit each other's blocks, the eviction list
fills and empties, and forked sequences copy on write.  In ``manager-caching`` the
writer's results (``num_cached_tokens``, slots, copies) and the events it drains
with ``take_events`` every few operations are part of its outcomes, which the replay
must reproduce; readers add ``count_cached_tokens``, the counters, and copies whose
digest covers the cache.  ``manager-caching-writers`` checks between rounds that
each thread's blocks hold the tokens it passed (their recorded hashes are those
``pagetable.prefix`` computes), that the statistics add up to the admissions the
threads saw succeed, and that the drained events, replayed, name exactly the hashes
cached.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import pickle
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from pagetable import BlockAllocator, KVCacheManager, OutOfBlocksError, PageTable
from pagetable.prefix import ExtraKeys, event_block_hash, hash_block_tokens, hash_prompt
from pagetable.reference import ReferencePageTable

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- digests

def digest(value):
    """A small, comparable fingerprint of a read's outcome (arrays by CRC-32)."""
    if isinstance(value, BaseException):
        return ("raise", type(value).__name__)
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return ("array", array.dtype.str, array.shape, zlib.crc32(array.view(np.uint8).reshape(-1)))
    if isinstance(value, tuple):
        return tuple(digest(v) for v in value)
    if isinstance(value, PageTable):
        return ("table",) + digest(table_contents(value))
    if isinstance(value, KVCacheManager):
        return ("manager",) + digest(manager_contents(value))
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", len(value), zlib.crc32(value))
    if value is None or isinstance(value, (int, bool, str, float)):
        return value
    raise TypeError(f"no digest for {type(value).__name__}")


def table_contents(table):
    """Everything observable about a table nobody else is changing, in public reads:
    block size, sequence ids in insertion order, and each one's blocks (as CSR)."""
    seq_ids = table.sequence_ids()
    indptr, indices = table.to_csr(seq_ids)
    return (np.array(table.block_size), seq_ids, indptr, indices)


def manager_contents(kv):
    """A manager nobody else is changing: its table, token counts and pool (reference
    counts and free-stack order: the order decides which block is handed out next)."""
    seq_ids = kv.page_table.sequence_ids()
    contents = table_contents(kv.page_table) + (
        kv.seq_lens(seq_ids), kv.allocator._refcounts(), kv.allocator._free_blocks())
    return contents + cache_contents(kv) if kv.prefix_caching else contents


def cache_contents(kv):
    """A caching manager's prefix cache, as its state holds it: block hashes, parents
    and token ids, which blocks are cached, the eviction order (the state's free stack
    lists the cached-free blocks first), the statistics and the extra keys."""
    state = kv._state()
    return tuple((key, state[key]) for key in sorted(state) if key.startswith("prefix_")) + (
        state["free_stack"], kv.num_cached_blocks)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- readers

class Reader:
    """One kind of batched read.

    ``call(obj, args)`` performs it; ``queries`` is a list of fixed argument tuples
    (chosen at random per read), or ``dynamic(rng, progress)`` builds arguments from
    what the writer is doing right now (then they are stored with the read).
    ``transform`` maps the result before digesting (for reads whose exact values are
    not reproducible by a replay, e.g. rows created and dropped by refused calls).
    """

    def __init__(self, name, call, queries=None, dynamic=None, transform=None):
        self.name = name
        self.call = call
        self.queries = queries
        self.dynamic = dynamic
        self.transform = transform

    def outcome(self, obj, args):
        try:
            result = self.call(obj, *args)
        except RuntimeError:
            raise
        except Exception as exc:        # part of the outcome; the replay must agree
            return digest(exc), describe(exc)
        if self.transform is not None:
            result = self.transform(result)
        return digest(result), _preview(result)


def _preview(result):
    """The values of a small result, for failure messages (None for large ones)."""
    if isinstance(result, np.ndarray):
        return result.tolist() if result.size <= 16 else None
    if isinstance(result, tuple):
        parts = [_preview(r) for r in result]
        return None if any(p is None and r is not None for p, r in zip(parts, result)) else parts
    if result is None or isinstance(result, (int, str)):
        return result
    return None


def _copy_checked(table):
    clone = table.copy()
    clone._check_invariants()
    return clone


def _pickle_checked(table):
    clone = pickle.loads(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
    clone._check_invariants()
    return clone


def _save_checked(table):
    buffer = io.BytesIO()
    table.save(buffer)
    buffer.seek(0)
    clone = type(table).load(buffer)
    clone._check_invariants()
    return clone


def _checked_manager(kv):
    # The digest compares every sequence, token count and the pool with the replay;
    # the table's own structure (index, rows) is checked here.
    kv.page_table._check_invariants()
    return kv


def presence(result):
    """``versions`` reduced to which sequences exist (stamps may differ in a replay)."""
    return result[0] >= 0


def ok_or_raise(result):
    return "ok"


def table_readers(table_of, batch, tokens, big_tokens, single_ids, exact_rows=True,
                  exact_versions=True):
    """Readers of every batched kind over a PageTable (``table_of(obj)`` gives it).

    ``batch``: sequence ids present in every state (long rows); ``tokens``:
    (seq_ids, positions) for lookups; ``big_tokens``: a slot mapping at least
    2**17 long (split over OpenMP threads); ``single_ids``: ids for per-sequence reads.
    """
    seq_tok, pos_tok = tokens
    seq_big, pos_big = big_tokens
    half = batch[: max(1, len(batch) // 2)]
    return [
        Reader("to_csr", lambda o, ids: table_of(o).to_csr(ids), [(batch,), (half,)]),
        Reader("block_table", lambda o, ids: table_of(o).block_table(ids), [(batch,), (half,)]),
        Reader("slot_mapping", lambda o, s, p: table_of(o).slot_mapping(s, p), [(seq_tok, pos_tok)]),
        Reader("slot_mapping_big", lambda o, s, p: table_of(o).slot_mapping(s, p), [(seq_big, pos_big)]),
        Reader("lookup", lambda o, s, p: table_of(o).lookup(s, p), [(seq_tok, pos_tok)]),
        Reader("num_blocks", lambda o, ids: table_of(o).num_blocks(ids), [(batch,)]),
        Reader("rows", lambda o, ids: table_of(o).rows(ids), [(batch,)],
               transform=None if exact_rows else ok_or_raise),
        Reader("versions", lambda o, ids: table_of(o).versions(ids), [(batch,)],
               transform=None if exact_versions else presence),
        Reader("get_sequence_blocks", lambda o, s: table_of(o).get_sequence_blocks(s),
               [(int(s),) for s in single_ids]),
        Reader("copy", lambda o: _copy_checked(table_of(o)), [()]),
        Reader("pickle", lambda o: _pickle_checked(table_of(o)), [()]),
        Reader("save", lambda o: _save_checked(table_of(o)), [()]),
    ]


def probe_readers(table_of):
    """Reads of the sequences the writer's current operation creates or removes."""

    def single(rng, progress):
        ids = progress.probe
        if not ids:
            return None
        return (int(ids[int(rng.integers(len(ids)))]),)

    def many(rng, progress):
        ids = progress.probe
        if not ids:
            return None
        ids = np.array(ids[:64], dtype=np.int64)
        return (ids, np.zeros(len(ids), dtype=np.int64))

    def batch(rng, progress):
        ids = progress.probe
        return (np.array(ids[:64], dtype=np.int64),) if ids else None

    return [
        Reader("probe_num_blocks", lambda o, s: table_of(o).num_blocks([s]), dynamic=single),
        Reader("probe_get_sequence_blocks", lambda o, s: table_of(o).get_sequence_blocks(s),
               dynamic=single),
        Reader("probe_to_csr", lambda o, s: table_of(o).to_csr([s]), dynamic=single),
        Reader("probe_block_table", lambda o, s: table_of(o).block_table([s]), dynamic=single),
        Reader("probe_slot_mapping", lambda o, s, p: table_of(o).slot_mapping(s, p), dynamic=many),
        Reader("probe_lookup", lambda o, s, p: table_of(o).lookup(s, p), dynamic=many),
        Reader("probe_versions", lambda o, s: table_of(o).versions(s), dynamic=batch,
               transform=presence),
    ]


def manager_readers(batch, single_ids):
    return [
        Reader("kv.seq_lens", lambda o, ids: o.seq_lens(ids), [(batch,)]),
        Reader("kv.block_table", lambda o, ids: o.block_table(ids), [(batch,)]),
        Reader("kv.flashinfer_layout", lambda o, ids: o.flashinfer_layout(ids), [(batch,)]),
        Reader("kv.seq_lens_one", lambda o, s: o.seq_lens([s]), [(int(s),) for s in single_ids]),
        Reader("kv.copy", lambda o: _checked_manager(o.copy()), [()]),
        Reader("kv.pickle", lambda o: _checked_manager(
            pickle.loads(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL))), [()]),
        Reader("kv.save", lambda o: _checked_manager(_saved_manager(o)), [()]),
    ]


def _saved_manager(kv):
    buffer = io.BytesIO()
    kv.save(buffer)
    buffer.seek(0)
    return KVCacheManager.load(buffer)


def manager_probe_readers():
    def single(rng, progress):
        ids = progress.probe
        if not ids:
            return None
        return (int(ids[int(rng.integers(len(ids)))]),)

    def batch(rng, progress):
        ids = progress.probe
        return (np.array(ids[:64], dtype=np.int64),) if ids else None

    return [
        Reader("probe_kv.seq_lens", lambda o, s: o.seq_lens([s]), dynamic=single),
        Reader("probe_kv.block_table", lambda o, s: o.block_table([s]), dynamic=single),
        Reader("probe_kv.flashinfer_layout", lambda o, s: o.flashinfer_layout([s]), dynamic=single),
        Reader("probe_kv.seq_lens_batch", lambda o, s: o.seq_lens(s), dynamic=batch),
    ]


# --------------------------------------------------------------------------- the race

class Progress:
    """What the writer publishes to readers (plain attributes: the GIL orders them)."""

    def __init__(self):
        self.done = 0          # operations completed
        self.probe = None      # ids the operation in progress creates or removes
        self.prompts = None    # (document, tokens) prompts it admits or extends, if any
        self.waiting = False   # the writer was refused and is retrying: readers pause
        self.stop = False


class Failure(Exception):
    pass


class ReaderScenario:
    """A writer (``generator``, ``apply``) against reader threads, then a replay.

    ``make()`` builds the object in its starting state (the same one twice: for the
    race and for the replay).  ``generator(seed)`` has ``next_op(obj)`` and
    ``commit(op, outcome)``; ``apply(obj, op)`` performs ``op`` and returns its
    outcome digest (it may raise RuntimeError: the writer retries).
    ``snapshot(obj, op)`` describes what a refused ``op`` must leave unchanged.
    """

    def __init__(self, name, make, generator, apply, snapshot, readers, reader_groups,
                 max_ops=20000):
        self.name = name
        self.make = make
        self.generator = generator
        self.apply = apply
        self.snapshot = snapshot
        self.readers = readers
        self.reader_groups = reader_groups   # list of lists of reader names, one thread each
        self.max_ops = max_ops

    def run(self, seconds, seed, serialize=False, only=None, exclude=()):
        """Race for ``seconds``, then replay.  ``serialize`` puts one lock around every
        library call (a self-check of the harness: then every read must match);
        ``only`` / ``exclude`` pick reader kinds by name."""
        obj = self.make()
        by_name = {r.name: r for r in self.readers}
        groups = [[n for n in group if (only is None or n in only) and n not in exclude]
                  for group in self.reader_groups]
        groups = [g for g in groups if g]
        call_lock = threading.Lock() if serialize else _NoLock()
        progress = Progress()
        ops = []
        records = []          # (reader name, args key, args, k_before, k_after, digest, text)
        failures = []
        stats = {"reads": {}, "read_runtime_errors": {}, "read_runtime_messages": set(),
                 "writer_refusals": 0, "writer_refusal_messages": set(),
                 "refused_changed_state": 0}
        lock = threading.Lock()   # guards stats and failures (not the object)

        def writer():
            gen = self.generator(seed)
            deadline = time.perf_counter() + seconds
            try:
                while time.perf_counter() < deadline and len(ops) < self.max_ops:
                    op = gen.next_op()
                    progress.probe = op.get("probe")
                    progress.prompts = op.get("prompts")
                    attempts = 0
                    while True:
                        before = self.snapshot(obj, op)
                        try:
                            with call_lock:
                                outcome = self.apply(obj, op)
                            break
                        except RuntimeError as exc:
                            if isinstance(exc, OutOfBlocksError):
                                raise
                            progress.waiting = True
                            after = self.snapshot(obj, op)
                            with lock:
                                stats["writer_refusals"] += 1
                                stats["writer_refusal_messages"].add(str(exc)[:120])
                                if after != before:
                                    stats["refused_changed_state"] += 1
                                    if len(failures) < 20:
                                        failures.append(
                                            f"refused {op['kind']} changed the state: {describe(exc)}; "
                                            f"before {before!r} after {after!r}")
                            attempts += 1
                            if attempts > 100000:
                                raise Failure(f"writer starved on {op['kind']}")
                            time.sleep(0)
                    progress.waiting = False
                    gen.commit(op, outcome)
                    ops.append((op, outcome))
                    progress.done = len(ops)
            except BaseException as exc:
                with lock:
                    failures.append(f"writer died: {describe(exc)}\n{traceback.format_exc()}")
            finally:
                progress.waiting = False
                progress.probe = None
                progress.prompts = None
                progress.stop = True

        def reader(names, reader_seed):
            rng = np.random.default_rng(reader_seed)
            kinds = [by_name[n] for n in names]
            local = []
            counts = {}
            errors = {}
            messages = set()
            try:
                last = False
                while True:
                    if progress.stop:
                        if last:
                            break
                        last = True           # one more round after the writer ends
                    if progress.waiting and not progress.stop:
                        time.sleep(0.0002)
                        continue
                    kind = kinds[int(rng.integers(len(kinds)))]
                    if kind.dynamic is not None:
                        args = kind.dynamic(rng, progress)
                        if args is None:
                            continue
                        key = ("dyn", len(local))
                    else:
                        index = int(rng.integers(len(kind.queries)))
                        args = kind.queries[index]
                        key = ("static", index)
                    k_before = progress.done
                    try:
                        with call_lock:
                            result, text = kind.outcome(obj, args)
                    except RuntimeError as exc:
                        errors[kind.name] = errors.get(kind.name, 0) + 1
                        messages.add(str(exc)[:120])
                        continue
                    k_after = progress.done
                    counts[kind.name] = counts.get(kind.name, 0) + 1
                    local.append((kind.name, key, args if kind.dynamic is not None else None,
                                  k_before, k_after, result, text))
            except BaseException as exc:
                with lock:
                    failures.append(f"reader {names} died: {describe(exc)}\n{traceback.format_exc()}")
            with lock:
                records.extend(local)
                for n, c in counts.items():
                    stats["reads"][n] = stats["reads"].get(n, 0) + c
                for n, c in errors.items():
                    stats["read_runtime_errors"][n] = stats["read_runtime_errors"].get(n, 0) + c
                stats["read_runtime_messages"] |= messages

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        started = time.perf_counter()
        threads = [threading.Thread(target=writer, name="writer")]
        threads += [threading.Thread(target=reader, args=(group, seed * 1000 + i), name=f"reader{i}")
                    for i, group in enumerate(groups)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old_interval)
        race_seconds = time.perf_counter() - started

        started = time.perf_counter()
        final_check = self.final_check(obj, ops, failures)
        mismatches = self.replay(ops, records, by_name, failures)
        replay_seconds = time.perf_counter() - started
        return {
            "scenario": self.name,
            "seed": seed,
            "ok": not failures,
            "serialized": serialize,
            "ops": len(ops),
            "op_kinds": _count(op["kind"] for op, _ in ops),
            "out_of_blocks": sum(1 for _, outcome in ops if outcome == "out of blocks"),
            "reads": stats["reads"],
            "total_reads": sum(stats["reads"].values()),
            "read_runtime_errors": stats["read_runtime_errors"],
            "read_runtime_messages": sorted(stats["read_runtime_messages"]),
            "writer_refusals": stats["writer_refusals"],
            "writer_refusal_messages": sorted(stats["writer_refusal_messages"]),
            "refused_changed_state": stats["refused_changed_state"],
            "mismatches": mismatches,
            "final_check": final_check,
            "final_size": self.size_of(obj),
            "race_seconds": round(race_seconds, 2),
            "replay_seconds": round(replay_seconds, 2),
            "failures": failures[:20],
            **self.extra(obj, ops),
        }

    def extra(self, obj, ops):
        """Scenario-specific figures for the summary."""
        return {}

    def final_check(self, obj, ops, failures):
        """The raced object must end exactly like the replay and pass its invariants."""
        replayed = self.make()
        for op, outcome in ops:
            self.apply(replayed, op)
        try:
            self.check(obj)
        except AssertionError as exc:
            failures.append(f"invariants broken after the race: {exc}")
            return "invariants broken"
        if not self.equal(obj, replayed):
            failures.append("the raced object differs from the replay at the end")
            return "differs from replay"
        return "ok"

    def check(self, obj):
        raise NotImplementedError

    def size_of(self, obj):
        table = obj if isinstance(obj, PageTable) else obj.page_table
        return {"sequences": len(table), "blocks": table.total_blocks}

    def equal(self, a, b):
        raise NotImplementedError

    def replay(self, ops, records, by_name, failures):
        """Check every read against the replayed states it may have seen."""
        obj = self.make()
        total = len(ops)
        records.sort(key=lambda r: r[3])
        position = 0
        open_reads = []
        first_seen = {}
        mismatches = 0
        for k in range(total + 1):
            if k:
                op, outcome = ops[k - 1]
                replayed = self.apply(obj, op)
                if replayed != outcome:
                    failures.append(f"op {k - 1} ({op['kind']}) returned {outcome!r} in the race "
                                    f"but {replayed!r} in the replay")
            while position < len(records) and records[position][3] <= k:
                open_reads.append(records[position])
                position += 1
            cache = {}
            still_open = []
            for record in open_reads:
                name, key, args, k_before, k_after, result, text = record
                cache_key = (name, key if args is None else repr(args))
                if cache_key not in cache:
                    kind = by_name[name]
                    call_args = args if args is not None else kind.queries[key[1]]
                    try:
                        cache[cache_key] = kind.outcome(obj, call_args)
                    except RuntimeError as exc:   # single-threaded: never expected
                        cache[cache_key] = (("raise", "RuntimeError"), None)
                        failures.append(f"replay read {name} raised {describe(exc)}")
                expected, expected_text = cache[cache_key]
                if k == k_before:
                    first_seen[id(record)] = expected_text
                if expected == result:
                    first_seen.pop(id(record), None)
                    continue
                if k >= min(k_after + 1, total):
                    mismatches += 1
                    if len(failures) < 20:
                        shown = "" if args is None else f" args={_short(args)}"
                        got = text if text is not None else result
                        failures.append(
                            f"read {name}{shown} during ops {k_before}..{k_after} "
                            f"({_op_names(ops, k_before, k_after)}) matches no state in "
                            f"{k_before}..{min(k_after + 1, total)}: got {_short(got)}; "
                            f"state {k_before} gives {_short(first_seen.get(id(record)))}, "
                            f"state {k} gives {_short(expected_text if expected_text is not None else expected)}")
                    first_seen.pop(id(record), None)
                    continue
                still_open.append(record)
            open_reads = still_open
        return mismatches


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _count(items):
    counts = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _short(value, limit=200):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _op_names(ops, first, last):
    names = [ops[i][0]["kind"] for i in range(first, min(last + 1, len(ops)))]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


# --------------------------------------------------------------------------- table scenarios

class TableScenario(ReaderScenario):
    def check(self, obj):
        obj._check_invariants()

    def equal(self, a, b):
        return a == b and np.array_equal(a.sequence_ids(), b.sequence_ids())


def table_snapshot(table, op):
    involved = op.get("involved", ())
    return (len(table), table.total_blocks,
            tuple(None if (b := table.get_sequence_blocks(s)) is None else tuple(b.tolist())
                  for s in involved))


def apply_table_op(table, op):
    kind = op["kind"]
    if kind == "append_blocks":
        table.append_blocks(op["seqs"], op["blocks"])
        return None
    if kind == "append_block":
        table.append_block(op["seq"], op["block"])
        return None
    if kind == "set_block":
        return int(table.set_block(op["seq"], op["index"], op["block"]))
    if kind == "remove_sequence":
        return digest(table.remove_sequence(op["seq"]))
    if kind == "fork_sequence":
        table.fork_sequence(op["parent"], op["child"])
        return None
    raise ValueError(kind)


class InplaceTableGenerator:
    """A fixed set of sequences that only grow or change in place (a decode loop).

    Round-robin appends (one block for every sequence: the kind that overran
    ``to_csr``'s output), appends to a subset, single appends and ``set_block``.
    """

    def __init__(self, seed, ids, lengths):
        self.rng = np.random.default_rng(seed)
        self.ids = ids
        self.lengths = dict(zip(ids.tolist(), lengths))

    def next_op(self):
        rng = self.rng
        choice = rng.random()
        if choice < 0.45:
            blocks = rng.integers(0, INT32_MAX, size=len(self.ids), dtype=np.int64).astype(np.int32)
            return {"kind": "append_blocks", "seqs": self.ids, "blocks": blocks, "involved": ()}
        if choice < 0.65:
            subset = np.sort(rng.choice(self.ids, size=len(self.ids) // 4, replace=False))
            per = int(rng.integers(1, 4))
            seqs = np.repeat(subset, per)
            blocks = rng.integers(0, INT32_MAX, size=len(seqs), dtype=np.int64)
            return {"kind": "append_blocks", "seqs": seqs, "blocks": blocks, "involved": ()}
        seq = int(self.ids[int(rng.integers(len(self.ids)))])
        if choice < 0.8:
            return {"kind": "append_block", "seq": seq, "block": int(rng.integers(0, INT32_MAX)),
                    "involved": (seq,)}
        index = int(rng.integers(self.lengths[seq]))
        return {"kind": "set_block", "seq": seq, "index": index,
                "block": int(rng.integers(0, INT32_MAX)), "involved": (seq,)}

    def commit(self, op, outcome):
        if op["kind"] == "append_blocks":
            for s, c in zip(*np.unique(op["seqs"], return_counts=True)):
                self.lengths[int(s)] += int(c)
        elif op["kind"] == "append_block":
            self.lengths[op["seq"]] += 1


def scenario_table_inplace(size="normal"):
    num_seqs, length = (1000, 160) if size == "normal" else (200, 40)
    rng = np.random.default_rng(12345)
    ids = np.sort(rng.choice(2**62, size=num_seqs, replace=False)).astype(np.int64)
    start_blocks = rng.integers(0, INT32_MAX, size=num_seqs * length, dtype=np.int64).astype(np.int32)

    def make():
        table = PageTable(16)
        table.append_blocks(np.repeat(ids, length), start_blocks)
        return table

    tok_seq, tok_pos = _grouped_tokens(rng, ids, length * 16, 8192)
    big_seq, big_pos = _grouped_tokens(rng, ids, length * 16, 2**17 + 4096)
    readers = table_readers(lambda t: t, ids, (tok_seq, tok_pos), (big_seq, big_pos),
                            ids[:8])
    groups = [
        ["to_csr", "block_table", "copy", "pickle", "save"],
        ["slot_mapping_big", "to_csr", "block_table", "versions"],
        ["slot_mapping", "lookup", "num_blocks", "rows", "get_sequence_blocks", "block_table"],
    ]
    return TableScenario(
        "table-inplace", make,
        lambda seed: InplaceTableGenerator(seed, ids, [length] * num_seqs),
        apply_table_op, table_snapshot, readers, groups, max_ops=4000)


def _grouped_tokens(rng, ids, max_pos, count):
    """``count`` (seq, position) pairs, grouped by sequence, some past the mapped end."""
    seqs = np.sort(rng.choice(ids, size=count))
    positions = rng.integers(0, max_pos + max_pos // 4, size=count)
    return seqs.astype(np.int64), positions.astype(np.int64)


class ChurnTableGenerator:
    """Sequences created, grown, forked, edited and removed; a stable set is never removed.

    Ids are handed out in increasing order; the ids an operation creates or removes
    are published as the probe, so that probe readers look at them mid-change.
    """

    def __init__(self, seed, stable, stable_len, first_id, target_live):
        self.rng = np.random.default_rng(seed)
        self.stable = stable
        self.contents = {int(s): stable_len for s in stable}   # seq -> length
        self.churn = []              # live non-stable ids
        self.next_id = first_id
        self.target_live = target_live

    def _new_ids(self, n):
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids

    def next_op(self):
        rng = self.rng
        live = len(self.churn)
        choice = rng.random()
        # Below the target the table grows, above it shrinks: removals make garbage,
        # garbage makes compactions, and compactions run numpy with the GIL released.
        grow_bias = 0.15 if live < self.target_live else -0.15
        if choice < 0.22 + grow_bias:
            n = int(rng.integers(1, 48))
            lengths = rng.integers(1, 40, size=n)
            new = self._new_ids(n)
            seqs = np.repeat(np.array(new, dtype=np.int64), lengths)
            blocks = rng.integers(0, INT32_MAX, size=len(seqs), dtype=np.int64).astype(np.int32)
            if rng.random() < 0.5 and self.churn:
                # New sequences together with old ones that grow: the old rows may have
                # to move after the new ones exist.
                old = rng.choice(self.churn, size=min(len(self.churn), 32), replace=False)
                extra = np.repeat(np.sort(old), 8).astype(np.int64)
                seqs = np.concatenate([seqs, extra])
                blocks = np.concatenate([blocks, rng.integers(0, INT32_MAX, size=len(extra)).astype(np.int32)])
            return {"kind": "append_blocks", "seqs": seqs, "blocks": blocks, "probe": new,
                    "involved": tuple(new)}
        if choice < 0.30:
            seq = self._new_ids(1)[0] if rng.random() < 0.5 or not self.churn else \
                int(self.churn[int(rng.integers(live))])
            return {"kind": "append_block", "seq": seq, "block": int(rng.integers(0, INT32_MAX)),
                    "probe": [seq], "involved": (seq,)}
        if choice < 0.45:
            # One block each for many live sequences, interleaved (a decode step).
            pool = self.churn + [int(s) for s in self.stable]
            k = min(len(pool), int(rng.integers(16, 512)))
            seqs = np.array(rng.choice(pool, size=k, replace=False), dtype=np.int64)
            blocks = rng.integers(0, INT32_MAX, size=k, dtype=np.int64)
            return {"kind": "append_blocks", "seqs": seqs, "blocks": blocks, "probe": None,
                    "involved": ()}
        if choice < 0.70 - grow_bias and self.churn:
            seq = int(self.churn[int(rng.integers(live))])
            return {"kind": "remove_sequence", "seq": seq, "probe": [seq], "involved": (seq,)}
        if choice < 0.85:
            parents = self.churn + [int(s) for s in self.stable]
            parent = int(parents[int(rng.integers(len(parents)))])
            child = self._new_ids(1)[0]
            return {"kind": "fork_sequence", "parent": parent, "child": child,
                    "probe": [child], "involved": (parent, child)}
        seqs = self.churn + [int(s) for s in self.stable]
        seq = int(seqs[int(rng.integers(len(seqs)))])
        index = int(rng.integers(self.contents[seq]))
        return {"kind": "set_block", "seq": seq, "index": index,
                "block": int(rng.integers(0, INT32_MAX)), "probe": None, "involved": (seq,)}

    def commit(self, op, outcome):
        kind = op["kind"]
        if kind == "append_blocks":
            for s, c in zip(*np.unique(op["seqs"], return_counts=True)):
                s = int(s)
                if s not in self.contents:
                    self.contents[s] = 0
                    self.churn.append(s)
                self.contents[s] += int(c)
        elif kind == "append_block":
            if op["seq"] not in self.contents:
                self.contents[op["seq"]] = 0
                self.churn.append(op["seq"])
            self.contents[op["seq"]] += 1
        elif kind == "remove_sequence":
            del self.contents[op["seq"]]
            self.churn.remove(op["seq"])
        elif kind == "fork_sequence":
            self.contents[op["child"]] = self.contents[op["parent"]]
            self.churn.append(op["child"])


def scenario_table_churn(size="normal"):
    num_stable, stable_len, target = (400, 120, 3000) if size == "normal" else (100, 30, 600)
    rng = np.random.default_rng(777)
    stable = np.arange(num_stable, dtype=np.int64) * 7 + 10**15
    stable_blocks = rng.integers(0, INT32_MAX, size=num_stable * stable_len, dtype=np.int64).astype(np.int32)

    def make():
        table = PageTable(16)
        table.append_blocks(np.repeat(stable, stable_len), stable_blocks)
        return table

    tok_seq, tok_pos = _grouped_tokens(rng, stable, stable_len * 16, 8192)
    big_seq, big_pos = _grouped_tokens(rng, stable, stable_len * 16, 2**17 + 4096)
    # Rows and version stamps of a replay can differ from the race's when a refused
    # call created rows and dropped them again; those two are checked for presence.
    readers = table_readers(lambda t: t, stable, (tok_seq, tok_pos), (big_seq, big_pos),
                            stable[:8], exact_rows=False, exact_versions=False)
    readers += probe_readers(lambda t: t)
    probes = [r.name for r in readers if r.name.startswith("probe_")]
    groups = [
        ["to_csr", "block_table", "slot_mapping_big", "copy", "pickle", "save"],
        ["slot_mapping", "lookup", "num_blocks", "rows", "versions", "get_sequence_blocks"],
        probes,
    ]
    return TableScenario(
        "table-churn", make,
        lambda seed: ChurnTableGenerator(seed, stable, stable_len, 1, target),
        apply_table_op, table_snapshot, readers, groups, max_ops=20000)


# --------------------------------------------------------------------------- manager scenario

class ManagerScenario(ReaderScenario):
    def check(self, obj):
        obj.check()
        obj.page_table._check_invariants()

    def equal(self, a, b):
        ids = a.page_table.sequence_ids()
        if not np.array_equal(ids, b.page_table.sequence_ids()):
            return False
        if a.num_free_blocks != b.num_free_blocks or a.page_table != b.page_table:
            return False
        return bool(np.array_equal(a.seq_lens(ids), b.seq_lens(ids)))


def manager_snapshot(kv, op):
    involved = op.get("involved", ())
    return (len(kv), kv.num_free_blocks, kv.page_table.total_blocks,
            tuple(int(kv.seq_lens([s])[0]) if s in kv else None for s in involved))


def apply_manager_op(kv, op):
    kind = op["kind"]
    try:
        if kind == "add_sequence":
            result = kv.add_sequence(op["seq"], op["tokens"])
        elif kind == "append_tokens":
            result = kv.append_tokens(op["seqs"], op["counts"])
        elif kind == "fork":
            kv.fork(op["parent"], op["child"])
            return None
        elif kind == "free_sequence":
            kv.free_sequence(op["seqs"])
            return None
        else:
            raise ValueError(kind)
    except OutOfBlocksError:
        return "out of blocks"
    return digest((result.slots, result.copy_src, result.copy_dst))


class ManagerGenerator:
    """Prefills, decode steps, multi-token appends, forks and frees on a shared pool."""

    def __init__(self, seed, stable, target_live):
        self.rng = np.random.default_rng(seed)
        self.stable = [int(s) for s in stable]
        self.churn = []
        self.next_id = 10**6
        self.target_live = target_live

    def next_op(self):
        rng = self.rng
        choice = rng.random()
        live = self.churn + self.stable
        bias = 0.1 if len(self.churn) < self.target_live else -0.1
        if choice < 0.35:
            seq = self.next_id
            self.next_id += 1
            return {"kind": "add_sequence", "seq": seq, "tokens": int(rng.integers(1, 600)),
                    "probe": [seq], "involved": (seq,)}
        if choice < 0.65:
            k = min(len(live), int(rng.integers(8, 512)))
            seqs = np.array(rng.choice(live, size=k, replace=False), dtype=np.int64)
            counts = 1 if rng.random() < 0.6 else rng.integers(0, 8, size=k)
            return {"kind": "append_tokens", "seqs": seqs, "counts": counts, "probe": None,
                    "involved": ()}
        if choice < 0.8:
            parent = int(live[int(rng.integers(len(live)))])
            child = self.next_id
            self.next_id += 1
            return {"kind": "fork", "parent": parent, "child": child, "probe": [child],
                    "involved": (parent, child)}
        if self.churn:
            # About 0.4 frees per operation below the target (0.5 sequences are made),
            # about 0.9 above it.
            k = min(len(self.churn), int(rng.integers(1, 4 if bias > 0 else 10)))
            seqs = [int(s) for s in rng.choice(self.churn, size=k, replace=False)]
            return {"kind": "free_sequence", "seqs": seqs, "probe": seqs, "involved": tuple(seqs)}
        seq = self.next_id
        self.next_id += 1
        return {"kind": "add_sequence", "seq": seq, "tokens": 5, "probe": [seq], "involved": (seq,)}

    def commit(self, op, outcome):
        if outcome == "out of blocks":
            return
        kind = op["kind"]
        if kind == "add_sequence":
            self.churn.append(op["seq"])
        elif kind == "fork":
            self.churn.append(op["child"])
        elif kind == "free_sequence":
            gone = set(op["seqs"])
            self.churn = [s for s in self.churn if s not in gone]


def scenario_manager(size="normal"):
    num_stable, prefill, target, pool = (300, 1500, 2500, 400_000) if size == "normal" else \
        (60, 300, 400, 60_000)
    stable = np.arange(num_stable, dtype=np.int64) * 3 + 5

    def make():
        kv = KVCacheManager(pool, 16)
        for s in stable.tolist():
            kv.add_sequence(s, prefill)
        return kv

    rng = np.random.default_rng(99)
    tok_seq, tok_pos = _grouped_tokens(rng, stable, prefill, 8192)
    big_seq, big_pos = _grouped_tokens(rng, stable, prefill, 2**17 + 4096)
    readers = manager_readers(stable, stable[:8])
    readers += table_readers(lambda kv: kv.page_table, stable, (tok_seq, tok_pos), (big_seq, big_pos),
                             stable[:8], exact_rows=False, exact_versions=False)
    readers += manager_probe_readers() + probe_readers(lambda kv: kv.page_table)
    probes = [r.name for r in readers if r.name.startswith("probe_")]
    groups = [
        ["kv.seq_lens", "kv.block_table", "kv.flashinfer_layout", "kv.seq_lens_one"],
        # A manager's copy, pickle and save take tens of milliseconds with the GIL
        # held: they share a thread with the table's reads, not the manager's.
        ["to_csr", "block_table", "slot_mapping_big", "slot_mapping", "lookup", "num_blocks",
         "rows", "versions", "get_sequence_blocks", "copy", "pickle", "save",
         "kv.copy", "kv.pickle", "kv.save"],
        probes,
    ]
    return ManagerScenario(
        "manager", make, lambda seed: ManagerGenerator(seed, stable, target),
        apply_manager_op, manager_snapshot, readers, groups, max_ops=20000)


# --------------------------------------------------------------------------- prefix-caching scenario

CACHE_BLOCK_SIZE = 16


def caching_manager(num_blocks, hash_algorithm):
    return KVCacheManager(num_blocks, CACHE_BLOCK_SIZE, enable_prefix_caching=True,
                          hash_algorithm=hash_algorithm, hash_seed="0",
                          enable_kv_cache_events=True)


def _token_ids(rng, count):
    """Token ids, mostly small, some up to 2**31 - 1 (pickle writes those longer)."""
    ids = rng.integers(0, 50_000, size=count)
    large = rng.random(count) < 0.05
    ids[large] = rng.integers(2**16, INT32_MAX + 1, size=int(large.sum()))
    return ids.astype(np.int32)


class Documents:
    """The token streams that prompts and decode steps are cut from.

    A few shared prefixes (of 48, 160, 333 and 96 tokens), each followed by several
    different tails: prompts hit each other's cached blocks, a small pool fills its
    eviction list, and a forked child that continues another document of its group
    diverges from its parent after its copy-on-write copy.  Token ``p`` of document
    ``d`` is ``streams[d][p % length]``, so every id is a function of the operation
    that passes it.  Some documents carry extra keys: a cache salt on tokens a
    document without one shares (they must not hit each other), a LoRA adapter on
    every block, a multimodal item over blocks 1 to 3; hashing those runs Python code
    in the middle of a change.
    """

    PREFIX_LENGTHS = (48, 160, 333, 96)
    TAILS = 5

    def __init__(self, seed=4242, length=1536):
        rng = np.random.default_rng(seed)
        self.streams, self.keys, self.group = [], [], []
        for group, prefix_length in enumerate(self.PREFIX_LENGTHS):
            prefix = _token_ids(rng, prefix_length)
            for tail in range(self.TAILS):
                self.streams.append(np.concatenate([prefix, _token_ids(rng, length - prefix_length)]))
                self.group.append(group)
                self.keys.append(_document_keys(group, tail))

    def __len__(self):
        return len(self.streams)

    def tokens(self, doc, start, stop):
        return np.take(self.streams[doc], np.arange(start, stop), mode="wrap")

    def prompt(self, doc, num_tokens):
        return self.tokens(doc, 0, num_tokens)

    def sibling(self, rng, doc):
        """A document with the same prefix as ``doc`` (possibly ``doc`` itself)."""
        return self.group[doc] * self.TAILS + int(rng.integers(self.TAILS))


def _document_keys(group, tail):
    if group == 1 and tail % 2:
        return ExtraKeys(cache_salt="tenant-b")
    if group == 2:
        return ExtraKeys(lora_name="sql", lora_path="/adapters/sql", lora_id=3)
    if group == 3 and tail == 0:
        return ExtraKeys(mm=[("image-7f3a", 20, 40)])
    return None


def cache_stats(kv):
    stats = kv.prefix_cache_stats
    return (stats.requests, stats.queries, stats.hits, stats.evictions)


def events_digest(batch):
    """A drained event batch without its time stamp: the count and a CRC of the events."""
    events = batch.events
    return ("events", len(events), zlib.crc32(repr(events).encode()),
            _count(type(e).__name__ for e in events))


def _result_digest(result):
    return ("result", result.num_cached_tokens, len(result.copy_src),
            digest((result.slots, result.copy_src, result.copy_dst)))


def apply_caching_op(kv, op):
    kind = op["kind"]
    try:
        if kind == "add_sequence":
            return _result_digest(kv.add_sequence(op["seq"], token_ids=op["token_ids"],
                                                  extra_keys=op["keys"]))
        if kind == "add_sequences":
            results = kv.add_sequences(op["seqs"], token_ids=op["token_ids"], extra_keys=op["keys"])
            return ("admitted", len(results), tuple(_result_digest(r) for r in results))
        if kind == "append_tokens":
            return _result_digest(kv.append_tokens(op["seqs"], op["counts"], token_ids=op["token_ids"]))
        if kind == "fork":
            kv.fork(op["parent"], op["child"])
            return None
        if kind == "free_sequence":
            kv.free_sequence(op["seqs"])
            return None
        if kind == "reset_prefix_cache":
            return ("dropped", kv.reset_prefix_cache())
        if kind == "take_events":
            return events_digest(kv.take_events())
    except OutOfBlocksError:
        return "out of blocks"
    raise ValueError(kind)


def caching_snapshot(kv, op):
    return manager_snapshot(kv, op) + (kv.num_cached_blocks, cache_stats(kv))


class CachingGenerator:
    """Admissions (one prompt, or several in one call), decode steps, forks, frees,
    prefix-cache resets and event drains on a caching manager with a small pool.

    Each sequence follows a document of ``docs``: its prompt is the document's start
    and its decode tokens continue it, up to ``max_tokens``; a forked child continues
    its parent's document or another of the same group.  ``take_events`` comes every
    2 to 7 operations.  Operations carry their token ids (the replay passes the same)
    and, as ``prompts``, the (document, tokens) prompts a probe reader looks up.
    """

    def __init__(self, seed, docs, stable, target_live, max_tokens):
        self.rng = np.random.default_rng(seed)
        self.docs = docs
        # seq -> [document, tokens, extra keys]
        self.sequences = {seq: [doc, n, docs.keys[doc]] for seq, (doc, n) in stable.items()}
        self.stable = list(stable)
        self.churn = []
        self.next_id = 10**6
        self.target_live = target_live
        self.max_tokens = max_tokens
        self.until_events = 3

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _prompt(self):
        rng = self.rng
        doc = int(rng.integers(len(self.docs)))
        choice = rng.random()
        if choice < 0.15:
            n = int(rng.integers(0, 20))
        elif choice < 0.5:     # around the end of the shared prefix
            n = max(0, Documents.PREFIX_LENGTHS[self.docs.group[doc]] + int(rng.integers(-20, 40)))
        else:
            n = int(rng.integers(20, 500))
        return doc, n

    def next_op(self):
        rng = self.rng
        self.until_events -= 1
        if self.until_events <= 0:
            self.until_events = int(rng.integers(2, 8))
            return {"kind": "take_events", "involved": ()}
        choice = rng.random()
        live = self.churn + self.stable
        below = len(self.churn) < self.target_live
        docs = self.docs
        if choice < 0.25 or (choice >= 0.74 and not self.churn):
            seq = self._new_id()
            doc, n = self._prompt()
            return {"kind": "add_sequence", "seq": seq, "doc": doc, "token_ids": docs.prompt(doc, n),
                    "keys": docs.keys[doc], "probe": [seq], "prompts": [(doc, n)], "involved": (seq,)}
        if choice < 0.32:
            seqs = [self._new_id() for _ in range(int(rng.integers(2, 6)))]
            prompts = [self._prompt() for _ in seqs]
            return {"kind": "add_sequences", "seqs": seqs, "docs": [d for d, _ in prompts],
                    "token_ids": [docs.prompt(d, n) for d, n in prompts],
                    "keys": [docs.keys[d] for d, _ in prompts], "probe": seqs, "prompts": prompts,
                    "involved": tuple(seqs)}
        if choice < 0.62:
            k = min(len(live), int(rng.integers(1, 64)))
            seqs = [int(s) for s in rng.choice(live, size=k, replace=False)]
            counts = np.ones(k, dtype=np.int64) if rng.random() < 0.6 else rng.integers(0, 24, size=k)
            counts = np.minimum(counts, [max(0, self.max_tokens - self.sequences[s][1]) for s in seqs])
            pieces = [docs.tokens(self.sequences[s][0], self.sequences[s][1], self.sequences[s][1] + c)
                      for s, c in zip(seqs, counts.tolist())]
            prompts = [(self.sequences[s][0], self.sequences[s][1] + c)
                       for s, c in zip(seqs[:4], counts.tolist())]
            return {"kind": "append_tokens", "seqs": np.array(seqs, dtype=np.int64),
                    "counts": 1 if (counts == 1).all() else counts,
                    "token_ids": np.concatenate(pieces).astype(np.int32), "prompts": prompts,
                    "involved": tuple(seqs[:8])}
        if choice < 0.73:
            parent = int(live[int(rng.integers(len(live)))])
            doc = self.sequences[parent][0]
            if rng.random() < 0.5:
                doc = docs.sibling(rng, doc)
            child = self._new_id()
            return {"kind": "fork", "parent": parent, "child": child, "doc": doc, "probe": [child],
                    "involved": (parent, child)}
        if choice < 0.74:
            return {"kind": "reset_prefix_cache", "involved": ()}
        # About 0.4 frees per operation below the target, 1.4 above it.
        k = min(len(self.churn), int(rng.integers(1, 4 if below else 12)))
        seqs = [int(s) for s in rng.choice(self.churn, size=k, replace=False)]
        return {"kind": "free_sequence", "seqs": seqs, "probe": seqs, "involved": tuple(seqs)}

    def commit(self, op, outcome):
        if outcome == "out of blocks":
            return
        kind = op["kind"]
        if kind == "add_sequence":
            self.sequences[op["seq"]] = [op["doc"], len(op["token_ids"]), op["keys"]]
            self.churn.append(op["seq"])
        elif kind == "add_sequences":
            admitted = outcome[1]
            for seq, doc, ids, keys in list(zip(op["seqs"], op["docs"], op["token_ids"], op["keys"]))[:admitted]:
                self.sequences[seq] = [doc, len(ids), keys]
                self.churn.append(seq)
        elif kind == "append_tokens":
            for s, c in zip(op["seqs"].tolist(), np.broadcast_to(op["counts"], len(op["seqs"])).tolist()):
                self.sequences[s][1] += c
        elif kind == "fork":
            _, tokens, keys = self.sequences[op["parent"]]
            self.sequences[op["child"]] = [op["doc"], tokens, keys]   # the manager copies keys
            self.churn.append(op["child"])
        elif kind == "free_sequence":
            gone = set(op["seqs"])
            self.churn = [s for s in self.churn if s not in gone]
            for s in gone:
                del self.sequences[s]


def caching_readers(docs, queries):
    """Prefix-cache reads: lookups of fixed prompts (``queries``: (document, tokens)),
    of the prompts the writer is admitting or extending, and the counters; with them
    the manager's other scalar reads (free blocks, sequences, membership)."""

    def lookup(kv, doc, num_tokens):
        return kv.count_cached_tokens(docs.prompt(doc, num_tokens), docs.keys[doc])

    def current(rng, progress):
        prompts = progress.prompts
        if not prompts:
            return None
        doc, num_tokens = prompts[int(rng.integers(len(prompts)))]
        return (int(doc), int(num_tokens))

    def probe(rng, progress):
        ids = progress.probe
        return (int(ids[int(rng.integers(len(ids)))]),) if ids else None

    return [
        Reader("kv.count_cached_tokens", lookup, queries),
        Reader("kv.prefix_cache_stats", cache_stats, [()]),
        Reader("kv.num_cached_blocks", lambda kv: kv.num_cached_blocks, [()]),
        Reader("probe_kv.count_cached_tokens", lookup, dynamic=current),
        Reader("kv.num_free_blocks", lambda kv: kv.num_free_blocks, [()]),
        Reader("kv.len", len, [()]),
        Reader("probe_kv.contains", lambda kv, seq: seq in kv, dynamic=probe),
    ]


class CachingScenario(ManagerScenario):
    def equal(self, a, b):
        # Everything the state holds (the cache included), then what it does not: the
        # events not yet drained.  (Drains both: neither is used after this.)
        return (super().equal(a, b) and a == b
                and events_digest(a.take_events()) == events_digest(b.take_events()))

    def extra(self, obj, ops):
        results = [outcome for _, outcome in ops if isinstance(outcome, tuple) and outcome[0] == "result"]
        for _, outcome in ops:
            if isinstance(outcome, tuple) and outcome[0] == "admitted":
                results += outcome[2]
        events = {}
        for _, outcome in ops:
            if isinstance(outcome, tuple) and outcome[0] == "events":
                for name, count in outcome[3].items():
                    events[name] = events.get(name, 0) + count
        requests, queries, hits, evictions = cache_stats(obj)
        return {"hash_algorithm": obj.hash_algorithm,
                "admissions_with_hits": sum(1 for r in results if r[1] > 0),
                "copy_on_write": sum(r[2] for r in results),
                "prefix_cache_stats": {"requests": requests, "queries": queries, "hits": hits,
                                       "evictions": evictions},
                "events_drained": events}


def scenario_manager_caching(size="normal", hash_algorithm="sha256"):
    num_stable, target, pool, max_tokens = (16, 120, 1500, 900) if size == "normal" else \
        (8, 40, 600, 600)
    docs = Documents()
    rng = np.random.default_rng(31)
    stable_ids = np.arange(num_stable, dtype=np.int64) * 3 + 5
    # Two stable sequences per document of the first groups: the second hits the first.
    stable = {int(s): (i // 2 % len(docs), int(rng.integers(100, 400))) for i, s in enumerate(stable_ids)}

    def make():
        kv = caching_manager(pool, hash_algorithm)
        for seq, (doc, n) in stable.items():
            kv.add_sequence(seq, token_ids=docs.prompt(doc, n), extra_keys=docs.keys[doc])
        kv.take_events()
        return kv

    queries = [(d, n) for d in range(len(docs)) for n in (15, 17, 64, 161, 350, 600)]
    tok_seq, tok_pos = _grouped_tokens(rng, stable_ids, max_tokens, 8192)
    big_seq, big_pos = _grouped_tokens(rng, stable_ids, max_tokens, 2**17 + 4096)
    readers = manager_readers(stable_ids, stable_ids[:8]) + caching_readers(docs, queries)
    readers += table_readers(lambda kv: kv.page_table, stable_ids, (tok_seq, tok_pos), (big_seq, big_pos),
                             stable_ids[:8], exact_rows=False, exact_versions=False)
    readers += manager_probe_readers() + probe_readers(lambda kv: kv.page_table)
    probes = [r.name for r in readers if r.name.startswith("probe_")]
    groups = [
        ["kv.seq_lens", "kv.block_table", "kv.flashinfer_layout", "kv.seq_lens_one",
         "kv.count_cached_tokens"],
        # The counters have a thread of their own: they are read most often then.
        ["kv.prefix_cache_stats", "kv.num_cached_blocks", "kv.count_cached_tokens",
         "kv.num_free_blocks", "kv.len"],
        ["to_csr", "block_table", "slot_mapping_big", "slot_mapping", "lookup", "num_blocks",
         "rows", "versions", "get_sequence_blocks", "copy", "pickle", "save",
         "kv.copy", "kv.pickle", "kv.save"],
        probes,
    ]
    return CachingScenario(
        "manager-caching", make,
        lambda seed: CachingGenerator(seed, docs, stable, target, max_tokens),
        apply_caching_op, caching_snapshot, readers, groups, max_ops=20000)


# --------------------------------------------------------------------------- writers vs writers

def retry_read(read, stats, limit=5.0):
    """``read()``, retried while it raises RuntimeError (a change from another thread
    is in progress); counted in ``stats["read_retries"]``."""
    deadline = time.perf_counter() + limit
    while True:
        try:
            return read()
        except RuntimeError:
            stats["read_retries"] = stats.get("read_retries", 0) + 1
            if time.perf_counter() > deadline:
                raise
            time.sleep(1e-4)


def run_rounds(num_threads, rounds, seconds, worker, between):
    """Race ``worker(thread, round, deadline)`` in threads, round by round; call
    ``between(round)`` with every thread stopped."""
    failures = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for r in range(rounds):
            deadline = time.perf_counter() + seconds / rounds
            errors = []

            def run(t):
                try:
                    worker(t, r, deadline)
                except BaseException as exc:
                    errors.append(f"thread {t} died: {describe(exc)}\n{traceback.format_exc()}")

            threads = [threading.Thread(target=run, args=(t,)) for t in range(num_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            failures += errors
            try:
                between(r)
            except AssertionError as exc:
                failures.append(f"after round {r}: {exc}")
            if failures:
                break
    finally:
        sys.setswitchinterval(old_interval)
    return failures


def scenario_table_writers(seconds, seed, size="normal"):
    """Three threads change one table (each its own ids) with every kind of change."""
    table = PageTable(16)
    num_threads = 3
    models = [ReferencePageTable(16) for _ in range(num_threads)]
    rngs = [np.random.default_rng(seed * 100 + t) for t in range(num_threads)]
    next_ids = [t * 10**12 + 1 for t in range(num_threads)]
    stats = {"ops": 0, "refusals": 0, "refusal_messages": set(), "op_kinds": {}}
    failures_inline = []
    big = 2500 if size == "normal" else 600

    def own(t):
        return list(models[t].sequences)

    def state_of(t, ids):
        # Another thread's change may be in progress (that is why this thread was
        # refused): a read may then raise RuntimeError, and is retried.
        return retry_read(lambda: [None if (b := table.get_sequence_blocks(s)) is None else b.tolist()
                                   for s in ids], stats)

    def model_of(t, ids):
        return [models[t].sequences.get(s) for s in ids]

    def worker(t, r, deadline):
        rng = rngs[t]
        model = models[t]
        while time.perf_counter() < deadline:
            live = own(t)
            choice = rng.random()
            if len(live) > 6000:
                choice = 0.5                   # remove: keep the between-round checks quick
            if choice < 0.3 or not live:
                # Many new ids at once: index and row arrays grow into mapped memory.
                n = int(rng.integers(1, big))
                ids = list(range(next_ids[t], next_ids[t] + n))
                next_ids[t] += n
                lengths = rng.integers(1, 6, size=n)
                seqs = np.repeat(np.array(ids, dtype=np.int64), lengths)
                if rng.random() < 0.3:
                    seqs = rng.permutation(seqs)          # interleaved input
                blocks = rng.integers(0, INT32_MAX, size=len(seqs))
                op = ("append_blocks", lambda: table.append_blocks(seqs, blocks),
                      lambda: model.append_blocks(seqs.tolist(), blocks.tolist()), ids[:50])
            elif choice < 0.45:
                seq = int(live[int(rng.integers(len(live)))]) if rng.random() < 0.5 else next_ids[t]
                if seq == next_ids[t]:
                    next_ids[t] += 1
                block = int(rng.integers(0, INT32_MAX))
                op = ("append_block", lambda: table.append_block(seq, block),
                      lambda: model.append_block(seq, block), [seq])
            elif choice < 0.6:
                victims = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 200))),
                                                      replace=False)]
                op = ("remove_sequence", None, None, victims)
            elif choice < 0.75:
                parent = int(live[int(rng.integers(len(live)))])
                child = next_ids[t]
                next_ids[t] += 1
                op = ("fork_sequence", lambda: table.fork_sequence(parent, child),
                      lambda: model.fork_sequence(parent, child), [parent, child])
            else:
                seq = int(live[int(rng.integers(len(live)))])
                index = int(rng.integers(len(model.sequences[seq])))
                block = int(rng.integers(0, INT32_MAX))
                op = ("set_block", lambda: table.set_block(seq, index, block),
                      lambda: model.set_block(seq, index, block), [seq])
            kind, change, mirror, involved = op
            stats["op_kinds"][kind] = stats["op_kinds"].get(kind, 0) + 1
            if kind == "remove_sequence":
                for seq in involved:
                    try:
                        removed = table.remove_sequence(seq)
                    except RuntimeError as exc:
                        _refused(t, kind, exc, [seq])
                        continue
                    expected = model.remove_sequence(seq)
                    if removed is None or expected is None or removed.tolist() != expected.tolist():
                        failures_inline.append(f"remove_sequence({seq}) returned {removed!r}, "
                                               f"expected {expected!r}")
                    stats["ops"] += 1
                continue
            try:
                change()
            except RuntimeError as exc:
                _refused(t, kind, exc, involved)
                continue
            mirror()
            stats["ops"] += 1

    def _refused(t, kind, exc, involved):
        stats["refusals"] += 1
        stats["refusal_messages"].add(str(exc)[:120])
        if "another thread" not in str(exc):
            failures_inline.append(f"{kind} refused with an unexpected message: {exc}")
        # Only this thread touches its ids: they must be exactly as the model says.
        if state_of(t, involved) != model_of(t, involved):
            failures_inline.append(f"refused {kind} changed sequences {involved[:5]}: {describe(exc)}")

    def between(r):
        table._check_invariants()
        assert not failures_inline, failures_inline[:5]
        expected = sum(len(m.sequences) for m in models)
        assert len(table) == expected, f"{len(table)} sequences, models hold {expected}"
        merged = {}
        for model in models:
            merged.update(model.sequences)
        seq_ids = table.sequence_ids()
        assert sorted(seq_ids.tolist()) == sorted(merged), "the table holds other sequences than the models"
        blocks = table.to_csr(seq_ids)[1]
        flat = []
        for seq in seq_ids.tolist():
            flat.extend(merged[seq])
        if not np.array_equal(blocks, np.array(flat, dtype=np.int64)):
            bad = next(s for s in seq_ids.tolist()
                       if table.get_sequence_blocks(s).tolist() != merged[s])
            raise AssertionError(f"sequence {bad}: table {table.get_sequence_blocks(bad).tolist()[:8]} "
                                 f"model {merged[bad][:8]}")
        # Let the table shrink back now and then, so growth happens again.
        if r % 3 == 2:
            for model in models:
                for seq in list(model.sequences)[: len(model.sequences) * 3 // 4]:
                    table.remove_sequence(seq)
                    model.remove_sequence(seq)
            table._check_invariants()

    started = time.perf_counter()
    failures = run_rounds(num_threads, 8, seconds, worker, between)
    failures += failures_inline[:10]
    return {
        "scenario": "table-writers", "seed": seed, "ok": not failures,
        "ops": stats["ops"], "op_kinds": stats["op_kinds"], "writer_refusals": stats["refusals"],
        "read_retries": stats.get("read_retries", 0),
        "writer_refusal_messages": sorted(stats["refusal_messages"]),
        "race_seconds": round(time.perf_counter() - started, 2), "failures": failures[:20],
    }


def scenario_manager_writers(seconds, seed, size="normal"):
    """Three threads change one KVCacheManager (each its own ids) with every kind of change.

    Odd seeds use a sliding-window manager (64 tokens), whose appends release blocks
    and whose rollbacks may be refused (a ``ValueError`` that must change nothing).
    """
    pool = 300_000 if size == "normal" else 50_000
    kv = KVCacheManager(pool, 16, sliding_window=64) if seed % 2 else KVCacheManager(pool, 16)
    num_threads = 3
    tokens = [dict() for _ in range(num_threads)]       # seq -> tokens, per thread
    rngs = [np.random.default_rng(seed * 100 + t) for t in range(num_threads)]
    next_ids = [t * 10**12 + 1 for t in range(num_threads)]
    stats = {"ops": 0, "refusals": 0, "out_of_blocks": 0, "refusal_messages": set(), "op_kinds": {}}
    failures_inline = []
    burst = 600 if size == "normal" else 200

    def observed(ids):
        return retry_read(lambda: [int(kv.seq_lens([s])[0]) if s in kv else None for s in ids], stats)

    def worker(t, r, deadline):
        rng = rngs[t]
        mine = tokens[t]
        while time.perf_counter() < deadline:
            live = list(mine)
            choice = rng.random()
            if len(live) > 3000:
                choice = 0.9                   # free: keep kv.check() between rounds quick
            if choice < 0.3 or not live:
                # Several prefills in a row: the table's arrays grow into mapped memory.
                n = int(rng.integers(1, burst))
                for _ in range(n):
                    seq = next_ids[t]
                    next_ids[t] += 1
                    count = int(rng.integers(0, 200))
                    stats["op_kinds"]["add_sequence"] = stats["op_kinds"].get("add_sequence", 0) + 1
                    _attempt(t, "add_sequence", lambda: kv.add_sequence(seq, count), [seq],
                             lambda: mine.__setitem__(seq, count))
                    if time.perf_counter() > deadline:
                        break
                continue
            if choice < 0.5:
                seqs = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 300))),
                                                   replace=False)]
                counts = rng.integers(0, 20, size=len(seqs))
                drafts = int(rng.integers(0, 5))     # speculative decoding's reserved slots

                def mirror(seqs=seqs, counts=counts):
                    for s, c in zip(seqs, counts.tolist()):
                        mine[s] += c
                op = ("append_tokens", lambda: kv.append_tokens(seqs, counts, num_lookahead=drafts),
                      seqs, mirror)
            elif choice < 0.58:
                seqs = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 300))),
                                                   replace=False)]
                rejected = [int(rng.integers(0, min(mine[s], 5) + 1)) for s in seqs]

                def mirror(seqs=seqs, rejected=rejected):
                    for s, r in zip(seqs, rejected):
                        mine[s] -= r
                op = ("rollback", lambda: kv.rollback(seqs, rejected), seqs, mirror)
            elif choice < 0.7:
                parent = int(live[int(rng.integers(len(live)))])
                child = next_ids[t]
                next_ids[t] += 1
                op = ("fork", lambda: kv.fork(parent, child), [parent, child],
                      lambda: mine.__setitem__(child, mine[parent]))
            else:
                seqs = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 400))),
                                                   replace=False)]

                def mirror(seqs=seqs):
                    for s in seqs:
                        del mine[s]
                op = ("free_sequence", lambda: kv.free_sequence(seqs), seqs, mirror)
            kind, change, involved, mirror = op
            stats["op_kinds"][kind] = stats["op_kinds"].get(kind, 0) + 1
            _attempt(t, kind, change, involved, mirror)

    def _attempt(t, kind, change, involved, mirror):
        before = [tokens[t].get(s) for s in involved]
        try:
            change()
        except OutOfBlocksError:
            stats["out_of_blocks"] += 1
            if observed(involved) != before:
                failures_inline.append(f"{kind} out of blocks but changed {involved[:5]}")
            return
        except ValueError as exc:
            # A window's rollback refusal: it must change nothing.
            if kind != "rollback" or "already released" not in str(exc):
                failures_inline.append(f"{kind} raised {describe(exc)}")
            elif observed(involved) != before:
                failures_inline.append(f"refused rollback changed {involved[:5]}")
            return
        except RuntimeError as exc:
            stats["refusals"] += 1
            stats["refusal_messages"].add(str(exc)[:120])
            if "another thread" not in str(exc):
                failures_inline.append(f"{kind} refused with an unexpected message: {exc}")
            after = observed(involved)
            if after != before:
                failures_inline.append(f"refused {kind} changed sequences {involved[:5]}: "
                                       f"{before[:5]} -> {after[:5]} ({describe(exc)})")
            return
        mirror()
        stats["ops"] += 1

    def between(r):
        kv.check()
        kv.page_table._check_invariants()
        assert not failures_inline, failures_inline[:5]
        expected = sum(len(m) for m in tokens)
        assert len(kv) == expected, f"{len(kv)} sequences, threads hold {expected}"
        for t, mine in enumerate(tokens):
            if mine:
                ids = list(mine)
                got = kv.seq_lens(ids).tolist()
                want = [mine[s] for s in ids]
                assert got == want, f"thread {t}: token counts differ"
                indptr, indices, last = kv.flashinfer_layout(ids)
                assert np.array_equal(np.diff(indptr), (np.array(want) + 15) // 16)
        if r % 3 == 2:
            for mine in tokens:
                victims = list(mine)[: len(mine) * 3 // 4]
                kv.free_sequence(victims)
                for s in victims:
                    del mine[s]
            kv.check()

    started = time.perf_counter()
    failures = run_rounds(num_threads, 8, seconds, worker, between)
    failures += failures_inline[:10]
    return {
        "scenario": "manager-writers", "seed": seed, "ok": not failures,
        "ops": stats["ops"], "op_kinds": stats["op_kinds"], "writer_refusals": stats["refusals"],
        "read_retries": stats.get("read_retries", 0),
        "out_of_blocks": stats["out_of_blocks"],
        "writer_refusal_messages": sorted(stats["refusal_messages"]),
        "race_seconds": round(time.perf_counter() - started, 2), "failures": failures[:20],
    }


class CachedSequence:
    """A writer thread's model of one of its sequences: the document its decode steps
    continue, its token ids, its extra keys, and the hashes of its full blocks
    (extended between rounds by ``pagetable.prefix``, from the tokens alone)."""

    __slots__ = ("doc", "tokens", "keys", "chain")

    def __init__(self, doc, tokens, keys, chain=None):
        self.doc = doc
        self.tokens = tokens
        self.keys = keys
        self.chain = [] if chain is None else chain

    def forked(self, doc):
        return CachedSequence(doc, list(self.tokens), self.keys, list(self.chain))

    def extend_chain(self, algorithm):
        for k in range(len(self.chain), len(self.tokens) // CACHE_BLOCK_SIZE):
            self.chain.append(hash_block_tokens(
                self.chain[k - 1] if k else None,
                self.tokens[k * CACHE_BLOCK_SIZE:(k + 1) * CACHE_BLOCK_SIZE],
                None if self.keys is None else self.keys.for_block(k, CACHE_BLOCK_SIZE),
                algorithm, seed="0"))
        return self.chain


def scenario_manager_caching_writers(seconds, seed, size="normal", hash_algorithm="sha256"):
    """Three threads change one caching manager (each its own ids) with every kind of
    change, prefix-cache resets and event drains included.

    Between rounds: ``kv.check()``; each thread's sequences hold the tokens it passed
    (every full block's recorded hash is the hash of those tokens); the statistics
    add up to the admissions the threads saw succeed; the events drained so far,
    replayed in order, name exactly the hashes cached now, with one ``BlockRemoved``
    per eviction; and every document's prompt finds the cached prefix those hashes
    say it should.
    """
    pool = 1500 if size == "normal" else 800
    B = CACHE_BLOCK_SIZE
    kv = caching_manager(pool, hash_algorithm)
    docs = Documents()
    num_threads = 3
    models = [dict() for _ in range(num_threads)]       # seq -> CachedSequence, per thread
    admitted = [[0, 0, 0] for _ in range(num_threads)]  # requests, queries, hits, per thread
    rngs = [np.random.default_rng(seed * 100 + t) for t in range(num_threads)]
    next_ids = [t * 10**12 + 1 for t in range(num_threads)]
    stats = {"ops": 0, "refusals": 0, "out_of_blocks": 0, "refusal_messages": set(), "op_kinds": {}}
    failures_inline = []
    batches = []              # event lists, in the order they were drained
    drain_lock = threading.Lock()   # orders drains (and the list) among the threads that drain
    replayed = {"batches": 0, "removed": 0, "events": {}}
    stored = set()            # the hashes the events say are cached
    burst = 200 if size == "normal" else 60

    def observed(ids):
        return retry_read(lambda: [int(kv.seq_lens([s])[0]) if s in kv else None for s in ids], stats)

    def prompt(rng, small=False):
        doc = int(rng.integers(len(docs)))
        choice = rng.random()
        if small or choice < 0.2:
            n = 0 if rng.random() < 0.5 else int(rng.integers(1, 20))
        elif choice < 0.55:
            n = max(0, Documents.PREFIX_LENGTHS[docs.group[doc]] + int(rng.integers(-20, 40)))
        else:
            n = int(rng.integers(20, 400))
        return doc, n

    def admit(t, seq, doc, n, result):
        """Record an admission the manager reported; check its result."""
        cached = result.num_cached_tokens
        if cached % B or cached > max(n - 1, 0) // B * B or len(result.slots) != n - cached:
            failures_inline.append(f"add of {n} tokens: num_cached_tokens {cached}, "
                                   f"{len(result.slots)} slots")
        models[t][seq] = CachedSequence(doc, docs.prompt(doc, n).tolist(), docs.keys[doc])
        counts = admitted[t]
        counts[0] += 1
        counts[1] += n
        counts[2] += cached

    def worker(t, r, deadline):
        rng = rngs[t]
        mine = models[t]
        while time.perf_counter() < deadline:
            live = list(mine)
            choice = rng.random()
            if len(live) > 400:
                choice = 0.75                  # free: keep the between-round checks quick
            if choice < 0.2 or not live:
                # Many admissions in a row, most of them short: the table's arrays grow
                # into mapped memory, which lets other threads run in the change.  Up
                # to the first that does not fit, as a scheduler admits.
                for _ in range(int(rng.integers(1, burst))):
                    seq = next_ids[t]
                    next_ids[t] += 1
                    doc, n = prompt(rng, small=rng.random() < 0.7)
                    ids = docs.prompt(doc, n)
                    stats["op_kinds"]["add_sequence"] = stats["op_kinds"].get("add_sequence", 0) + 1
                    outcome = _attempt(
                        t, "add_sequence",
                        lambda: kv.add_sequence(seq, token_ids=ids, extra_keys=docs.keys[doc]),
                        [seq], lambda result: admit(t, seq, doc, n, result))
                    if outcome == "out of blocks" or time.perf_counter() > deadline:
                        break
                continue
            if choice < 0.3:
                seqs = list(range(next_ids[t], next_ids[t] + int(rng.integers(2, 8))))
                next_ids[t] += len(seqs)
                prompts = [prompt(rng) for _ in seqs]

                def mirror(results, seqs=seqs, prompts=prompts):
                    for seq, (doc, n), result in zip(seqs, prompts, results):
                        admit(t, seq, doc, n, result)
                    rest = seqs[len(results):]
                    if rest and observed(rest) != [None] * len(rest):
                        failures_inline.append(f"add_sequences admitted {len(results)} of {len(seqs)} "
                                               f"but holds more")
                op = ("add_sequences", lambda: kv.add_sequences(
                    seqs, token_ids=[docs.prompt(d, n) for d, n in prompts],
                    extra_keys=[docs.keys[d] for d, _ in prompts]),
                    seqs, mirror)
            elif choice < 0.55:
                seqs = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 100))),
                                                   replace=False)]
                counts = rng.integers(0, 20, size=len(seqs))
                pieces = [docs.tokens(mine[s].doc, len(mine[s].tokens), len(mine[s].tokens) + c)
                          for s, c in zip(seqs, counts.tolist())]
                flat = np.concatenate(pieces)

                def mirror(result, seqs=seqs, pieces=pieces):
                    for s, piece in zip(seqs, pieces):
                        mine[s].tokens.extend(piece.tolist())
                op = ("append_tokens", lambda: kv.append_tokens(seqs, counts, token_ids=flat), seqs, mirror)
            elif choice < 0.65:
                parent = int(live[int(rng.integers(len(live)))])
                child = next_ids[t]
                next_ids[t] += 1
                doc = mine[parent].doc if rng.random() < 0.5 else docs.sibling(rng, mine[parent].doc)
                op = ("fork", lambda: kv.fork(parent, child), [parent, child],
                      lambda _: mine.__setitem__(child, mine[parent].forked(doc)))
            elif choice < 0.85:
                seqs = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 60))),
                                                   replace=False)]

                def mirror(_, seqs=seqs):
                    for s in seqs:
                        del mine[s]
                op = ("free_sequence", lambda: kv.free_sequence(seqs), seqs, mirror)
            elif choice < 0.88:
                op = ("reset_prefix_cache", kv.reset_prefix_cache, [], lambda _: None)
            else:
                op = ("take_events", None, [], None)
            kind, change, involved, mirror = op
            stats["op_kinds"][kind] = stats["op_kinds"].get(kind, 0) + 1
            if kind == "take_events":
                with drain_lock:
                    _attempt(t, kind, kv.take_events, [], lambda batch: batches.append(batch.events))
                continue
            _attempt(t, kind, change, involved, mirror)

    def _attempt(t, kind, change, involved, mirror):
        before = [len(models[t][s].tokens) if s in models[t] else None for s in involved]
        try:
            result = change()
        except OutOfBlocksError:
            stats["out_of_blocks"] += 1
            if observed(involved) != before:
                failures_inline.append(f"{kind} out of blocks but changed {involved[:5]}")
            return "out of blocks"
        except RuntimeError as exc:
            stats["refusals"] += 1
            stats["refusal_messages"].add(str(exc)[:120])
            if "another thread" not in str(exc):
                failures_inline.append(f"{kind} refused with an unexpected message: {exc}")
            after = observed(involved)
            if after != before:
                failures_inline.append(f"refused {kind} changed sequences {involved[:5]}: "
                                       f"{before[:5]} -> {after[:5]} ({describe(exc)})")
            return "refused"
        mirror(result)
        stats["ops"] += 1
        return "done"

    def replay_events():
        """Apply the batches drained since last time to ``stored``."""
        for events in batches[replayed["batches"]:]:
            for event in events:
                name = type(event).__name__
                replayed["events"][name] = replayed["events"].get(name, 0) + 1
                if name == "AllBlocksCleared":
                    stored.clear()
                elif name == "BlockRemoved":
                    for h in event.block_hashes:
                        assert h in stored, f"BlockRemoved of hash {h}, which is not cached"
                        stored.discard(h)
                        replayed["removed"] += 1
                else:
                    for h in event.block_hashes:
                        assert h not in stored, f"BlockStored of hash {h}, which is cached already"
                        stored.add(h)
        replayed["batches"] = len(batches)

    def between(r):
        kv.check()
        kv.page_table._check_invariants()
        assert not failures_inline, failures_inline[:5]
        expected = sum(len(m) for m in models)
        assert len(kv) == expected, f"{len(kv)} sequences, threads hold {expected}"
        state = kv._state()
        hashes = state["prefix_hashes"].reshape(pool, -1)
        known = state["prefix_known"]
        for t, mine in enumerate(models):
            if not mine:
                continue
            ids = list(mine)
            got = kv.seq_lens(ids).tolist()
            want = [len(mine[s].tokens) for s in ids]
            assert got == want, f"thread {t}: token counts differ"
            for seq, row in zip(ids, kv.block_table(ids)):
                chain = mine[seq].extend_chain(hash_algorithm)
                for k, h in enumerate(chain):
                    if not known[row[k]] or hashes[row[k]].tobytes() != h:
                        raise AssertionError(f"thread {t}, sequence {seq}: block {k} ({int(row[k])}) "
                                             f"does not hold the tokens the thread passed")
        requests, queries, hits, evictions = cache_stats(kv)
        want = [sum(c[i] for c in admitted) for i in range(3)]
        assert [requests, queries, hits] == want, \
            f"statistics {[requests, queries, hits]}, the threads' admissions add up to {want}"
        batches.append(kv.take_events().events)
        replay_events()
        cached = np.flatnonzero(state["prefix_cached"])
        now = {event_block_hash(hashes[b].tobytes()) for b in cached}
        assert len(now) == kv.num_cached_blocks == len(cached), "cached blocks and their hashes disagree"
        assert stored == now, (f"the events name {len(stored)} cached hashes, the manager caches "
                               f"{len(now)} ({len(stored - now)} and {len(now - stored)} differ)")
        assert replayed["removed"] == evictions, \
            f"{replayed['removed']} BlockRemoved events for {evictions} evictions"
        for doc in range(len(docs)):
            ids = docs.prompt(doc, 600)
            hit = 0
            for h in hash_prompt(ids, B, docs.keys[doc], hash_algorithm, seed="0")[: (len(ids) - 1) // B]:
                if event_block_hash(h) not in stored:
                    break
                hit += 1
            found = kv.count_cached_tokens(ids, docs.keys[doc])
            assert found == hit * B, f"document {doc}: {found} tokens cached, the events say {hit * B}"
        if r % 3 == 2:
            for mine in models:
                victims = list(mine)[: len(mine) * 3 // 4]
                kv.free_sequence(victims)
                for s in victims:
                    del mine[s]
            kv.check()

    started = time.perf_counter()
    failures = run_rounds(num_threads, 8, seconds, worker, between)
    failures += failures_inline[:10]
    requests, queries, hits, evictions = cache_stats(kv)
    return {
        "scenario": "manager-caching-writers", "hash_algorithm": hash_algorithm, "seed": seed,
        "ok": not failures, "ops": stats["ops"], "op_kinds": stats["op_kinds"],
        "writer_refusals": stats["refusals"], "read_retries": stats.get("read_retries", 0),
        "out_of_blocks": stats["out_of_blocks"],
        "writer_refusal_messages": sorted(stats["refusal_messages"]),
        "prefix_cache_stats": {"requests": requests, "queries": queries, "hits": hits,
                               "evictions": evictions},
        "events_replayed": replayed["events"],
        "race_seconds": round(time.perf_counter() - started, 2), "failures": failures[:20],
    }


def scenario_allocator_writers(seconds, seed, size="normal"):
    """Three threads allocate, share and free blocks of one BlockAllocator."""
    num_blocks = 100_000
    alloc = BlockAllocator(num_blocks)
    num_threads = 3
    held = [dict() for _ in range(num_threads)]     # block -> references held, per thread
    rngs = [np.random.default_rng(seed * 100 + t) for t in range(num_threads)]
    stats = {"ops": 0, "refusals": 0, "out_of_blocks": 0, "op_kinds": {}}
    failures_inline = []

    def worker(t, r, deadline):
        rng = rngs[t]
        mine = held[t]
        while time.perf_counter() < deadline:
            choice = rng.random()
            blocks = list(mine)
            try:
                if choice < 0.4 or not blocks:
                    stats["op_kinds"]["allocate"] = stats["op_kinds"].get("allocate", 0) + 1
                    got = alloc.allocate(int(rng.integers(0, 2000)))
                    for b in got.tolist():
                        if b in mine:
                            failures_inline.append(f"allocate handed out block {b}, already held")
                        mine[b] = 1
                elif choice < 0.6:
                    stats["op_kinds"]["incref"] = stats["op_kinds"].get("incref", 0) + 1
                    some = [int(b) for b in rng.choice(blocks, size=min(len(blocks), 500))]
                    alloc.incref(some)
                    for b in some:
                        mine[b] += 1
                else:
                    stats["op_kinds"]["free"] = stats["op_kinds"].get("free", 0) + 1
                    some = [int(b) for b in rng.choice(blocks, size=min(len(blocks), 1500), replace=False)]
                    alloc.free(some)
                    for b in some:
                        mine[b] -= 1
                        if not mine[b]:
                            del mine[b]
                stats["ops"] += 1
            except OutOfBlocksError:
                stats["out_of_blocks"] += 1
            except RuntimeError as exc:
                stats["refusals"] += 1
                if "another thread" not in str(exc):
                    failures_inline.append(f"unexpected RuntimeError: {exc}")

    def between(r):
        assert not failures_inline, failures_inline[:5]
        expected = np.zeros(num_blocks, dtype=np.int64)
        for mine in held:
            for b, c in mine.items():
                expected[b] += c
        counts = alloc._refcounts()
        wrong = np.flatnonzero(counts != expected)
        assert not wrong.size, f"block {wrong[0]}: refcount {counts[wrong[0]]}, threads hold {expected[wrong[0]]}"
        free = alloc._free_blocks()
        assert len(np.unique(free)) == len(free) == alloc.num_free, "free stack holds duplicates"
        assert np.array_equal(np.sort(free), np.flatnonzero(expected == 0)), "free stack != unheld blocks"

    started = time.perf_counter()
    failures = run_rounds(num_threads, 8, seconds, worker, between)
    failures += failures_inline[:10]
    return {
        "scenario": "allocator-writers", "seed": seed, "ok": not failures, "ops": stats["ops"],
        "op_kinds": stats["op_kinds"], "writer_refusals": stats["refusals"],
        "out_of_blocks": stats["out_of_blocks"],
        "race_seconds": round(time.perf_counter() - started, 2), "failures": failures[:20],
    }


def scenario_views(seconds, seed, size="normal"):
    """``KVCacheManager.page_table`` and ``.allocator`` are read-only views: every
    mutating method raises RuntimeError and changes nothing, from this thread and
    from another thread while the manager itself is being changed."""
    kv = KVCacheManager(4096, 16)
    kv.add_sequence(1, 40)
    kv.fork(1, 2)
    failures = []
    table, alloc = kv.page_table, kv.allocator
    calls = [
        ("page_table.append_block", lambda: table.append_block(1, 7)),
        ("page_table.append_block(new)", lambda: table.append_block(99, 7)),
        ("page_table.append_blocks", lambda: table.append_blocks([1, 1], [7, 8])),
        ("page_table.remove_sequence", lambda: table.remove_sequence(2)),
        ("page_table.fork_sequence", lambda: table.fork_sequence(1, 3)),
        ("page_table.set_block", lambda: table.set_block(1, 0, 9)),
        ("allocator.allocate", lambda: alloc.allocate(1)),
        ("allocator.free", lambda: alloc.free([0])),
        ("allocator.incref", lambda: alloc.incref([0])),
    ]

    def state():
        return (len(kv), kv.num_free_blocks, table.total_blocks, alloc._refcounts().tolist(),
                [None if (b := table.get_sequence_blocks(s)) is None else b.tolist() for s in (1, 2, 3, 99)])

    def try_all(where):
        for name, call in calls:
            before = state()
            try:
                call()
            except RuntimeError:
                pass
            except Exception as exc:
                failures.append(f"{where}: {name} raised {describe(exc)}, not RuntimeError")
            else:
                failures.append(f"{where}: {name} succeeded on a read-only view")
            if state() != before:
                failures.append(f"{where}: {name} changed the manager")
        try:
            kv.check()
        except AssertionError as exc:
            failures.append(f"{where}: manager invariants broken: {exc}")

    try_all("main thread")
    worker = threading.Thread(target=try_all, args=("another thread",))
    worker.start()
    worker.join()
    return {"scenario": "views", "seed": seed, "ok": not failures, "failures": failures[:20]}


# --------------------------------------------------------------------------- main

READER_SCENARIOS = {
    "table-inplace": scenario_table_inplace,
    "table-churn": scenario_table_churn,
    "manager": scenario_manager,
    "manager-caching": scenario_manager_caching,
}
WRITER_SCENARIOS = {
    "table-writers": scenario_table_writers,
    "manager-writers": scenario_manager_writers,
    "manager-caching-writers": scenario_manager_caching_writers,
    "allocator-writers": scenario_allocator_writers,
    "views": scenario_views,
}
SCENARIOS = list(READER_SCENARIOS) + list(WRITER_SCENARIOS)


CACHING_SCENARIOS = ("manager-caching", "manager-caching-writers")


def run_scenario(name, seconds, seed, size="normal", serialize=False, only=None, exclude=(),
                 hash_algorithm=None):
    options = {}
    if name in CACHING_SCENARIOS and hash_algorithm is not None:
        options["hash_algorithm"] = hash_algorithm
    if name in READER_SCENARIOS:
        return READER_SCENARIOS[name](size, **options).run(seconds, seed, serialize, only, exclude)
    return WRITER_SCENARIOS[name](seconds, seed, size, **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="all", help=f"one of {SCENARIOS} or 'all'")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("PAGETABLE_STRESS_SECONDS", 2)),
                        help="racing time per scenario run")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("PAGETABLE_STRESS_SEED", 0)))
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (seed, seed + 1, ...)")
    parser.add_argument("--size", choices=["normal", "small"], default="normal")
    parser.add_argument("--serialize", action="store_true",
                        help="one lock around every library call: checks the harness itself")
    parser.add_argument("--readers", default=None, help="comma-separated reader kinds to run")
    parser.add_argument("--exclude-readers", default="", help="comma-separated reader kinds to skip")
    parser.add_argument("--hash-algorithm", default=None,
                        help=f"block hashes of the prefix-caching scenarios {CACHING_SCENARIOS} "
                             "(default sha256)")
    args = parser.parse_args(argv)
    only = None if args.readers is None else set(args.readers.split(","))
    exclude = set(filter(None, args.exclude_readers.split(",")))
    faulthandler.enable(all_threads=True)
    names = SCENARIOS if args.scenario == "all" else args.scenario.split(",")
    ok = True
    for repeat in range(args.repeat):
        for name in names:
            summary = run_scenario(name, args.seconds, args.seed + repeat, args.size,
                                   args.serialize, only, exclude, args.hash_algorithm)
            ok &= summary["ok"]
            print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
