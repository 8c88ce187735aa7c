"""A long churn of a KVCacheManager: memory must stay flat and every invariant hold.

A serving loop, step by step: requests arrive (``add_sequence``, some as a chunked
prefill that ``append_tokens`` continues), some are forked for parallel sampling
(``fork``), every running sequence decodes one token (one ``append_tokens`` call for
the whole batch), a few take several tokens at once (speculative decoding), and
finished ones are freed together (one ``free_sequence`` call).  When the pool runs
out (``OutOfBlocksError``) the longest sequences are preempted (freed) and the call is
retried, as an engine's scheduler would.

Operations are counted per sequence: ``append_tokens`` over 1,000 sequences counts
1,000 appends, ``free_sequence`` of 30 ids counts 30 frees.  (A literal million
single calls would spend its time in the interpreter's call overhead instead of the
manager; the number of library calls is reported too.)

Checked along the way:

* ``KVCacheManager.check()`` and ``PageTable._check_invariants()`` every
  ``--check-every`` steps and at the end;
* sampled windows held against ``ReferenceKVCacheManager``: every ``--window-every``
  steps a reference is built from the manager's exact state (block lists, token
  counts, reference counts, free-stack order), the next ``--window-steps`` steps run
  on both, and every result (slots, copy-on-write copies, errors) and the final
  state must be identical;
* resident memory (``VmRSS`` from /proc/self/status) sampled every
  ``--rss-every`` steps; the summary reports it after warm-up and at the end.

Run it for hours with ``PAGETABLE_CHURN_OPS=1e10 python tools/churn.py``; it prints
one JSON summary on stdout and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
import time

import numpy as np

from pagetable import KVCacheManager, OutOfBlocksError
from pagetable.reference import ReferenceKVCacheManager


def rss_kib():
    """Resident set size of this process in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def mirror(kv):
    """A ReferenceKVCacheManager in exactly ``kv``'s state, free-stack order included."""
    ref = ReferenceKVCacheManager(kv.num_blocks, kv.block_size)
    ref._allocator._refcount = kv.allocator._refcounts().tolist()
    ref._allocator._free_stack = kv.allocator._free_blocks().tolist()
    for seq, (count, blocks) in sequences(kv).items():
        ref._adopt_sequence(seq, blocks, count)
    ref.check()
    return ref


def sequences(kv):
    """{seq: (tokens, [blocks])} of a KVCacheManager, in insertion order."""
    seq_ids = kv.page_table.sequence_ids()
    if not len(seq_ids):
        return {}
    indptr, indices = kv.page_table.to_csr(seq_ids)
    tokens = kv.seq_lens(seq_ids).tolist()
    flat = indices.tolist()
    bounds = indptr.tolist()
    return {seq: (count, flat[bounds[i]:bounds[i + 1]])
            for i, (seq, count) in enumerate(zip(seq_ids.tolist(), tokens))}


def state_of(manager):
    """Everything observable: {seq: (tokens, blocks)}, refcounts, free stack."""
    if isinstance(manager, ReferenceKVCacheManager):
        seqs = {s: (manager._tokens[s], list(b)) for s, b in manager._blocks.items()}
        return seqs, list(manager._allocator._refcount), list(manager._allocator._free_stack)
    return (sequences(manager), manager.allocator._refcounts().tolist(),
            manager.allocator._free_blocks().tolist())


def outcome(call):
    """Run ``call``; return a comparable outcome (results as lists, errors by type)."""
    try:
        result = call()
    except (OutOfBlocksError, KeyError, ValueError) as exc:
        return ("raise", type(exc).__name__, getattr(exc, "requested", None))
    if result is None:
        return None
    return (result.slots.tolist(), result.copy_src.tolist(), result.copy_dst.tolist())


class Churn:
    def __init__(self, args):
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.kv = KVCacheManager(args.num_blocks, args.block_size)
        self.ref = None                     # a ReferenceKVCacheManager during a window
        self.live = {}                      # seq -> tokens left to generate
        self.next_id = 0
        self.counts = {"add": 0, "append": 0, "fork": 0, "free": 0, "preempted": 0,
                       "out_of_blocks": 0, "calls": 0, "copies": 0}
        self.failures = []
        self.leaked = []

    # -- calls on the manager (and the reference in a window) ---------------------------
    def call(self, name, *args):
        self.counts["calls"] += 1
        if self.args.leak_per_call:          # harness self-check: a deliberate leak
            self.leaked.append(bytearray(self.args.leak_per_call))
        got = outcome(lambda: getattr(self.kv, name)(*args))
        if self.ref is not None:
            expected = outcome(lambda: getattr(self.ref, name)(*args))
            if got != expected and len(self.failures) < 10:
                self.failures.append(
                    f"step {self.step}: {name}{_short(args)} gave {_short(got)}, "
                    f"the reference {_short(expected)}")
        return got

    def free(self, seqs):
        if not seqs:
            return
        got = self.call("free_sequence", seqs)
        if got is not None:
            self.failures.append(f"free_sequence({seqs[:5]}...) raised {got}")
        for s in seqs:
            del self.live[s]
        self.counts["free"] += len(seqs)

    def preempt(self, need):
        """Free the longest-running sequences until ``need`` blocks are free."""
        ids = list(self.live)
        if not ids:
            return False
        lens = self.kv.seq_lens(ids)
        order = np.argsort(-lens, kind="stable")
        victims = []
        freed = self.kv.num_free_blocks
        for i in order.tolist():
            victims.append(ids[i])
            freed += (int(lens[i]) + self.args.block_size - 1) // self.args.block_size
            if freed >= need + 64:
                break
        self.counts["preempted"] += len(victims)
        self.free(victims)
        return True

    def grow(self, name, *args, count=0):
        """An append or add that may run out of blocks: preempt and retry."""
        for _ in range(8):
            got = self.call(name, *args)
            if isinstance(got, tuple) and got[:2] == ("raise", "OutOfBlocksError"):
                self.counts["out_of_blocks"] += 1
                if not self.preempt(got[2] or 1):
                    return None
                if name == "append_tokens":
                    # Preempted sequences left the batch.
                    keep = [i for i, s in enumerate(args[0]) if s in self.live]
                    if not keep:
                        return None
                    seqs = [args[0][i] for i in keep]
                    counts = args[1] if np.isscalar(args[1]) else np.asarray(args[1])[keep]
                    args = (seqs, counts)
                continue
            if isinstance(got, tuple) and got[0] == "raise":
                self.failures.append(f"step {self.step}: {name} raised {got}")
                return None
            if got is not None:
                self.counts["copies"] += len(got[1])
            return args
        return None

    # -- one serving step ---------------------------------------------------------------
    def run_step(self):
        a, rng = self.args, self.rng
        # Arrivals: enough to hold the live set near its target.
        arrivals = int(rng.poisson(a.target_live / a.mean_life))
        for _ in range(arrivals):
            seq = self.next_id
            self.next_id += 1
            prompt = int(rng.integers(1, a.max_prompt))
            life = int(rng.geometric(1.0 / a.mean_life))
            if rng.random() < 0.2:
                # Chunked prefill: an empty sequence, then the prompt in two chunks.
                if self.grow("add_sequence", seq, 0) is None:
                    continue
                self.live[seq] = life
                first = prompt // 2
                if self.grow("append_tokens", [seq], first) is None or seq not in self.live:
                    continue
                self.counts["append"] += 1
                if self.grow("append_tokens", [seq], prompt - first) is None:
                    continue
                self.counts["append"] += 1
            else:
                if self.grow("add_sequence", seq, prompt) is None:
                    continue
                self.live[seq] = life
            self.counts["add"] += 1
            # Parallel sampling: a few children share the prompt's blocks.
            if rng.random() < a.fork_rate and seq in self.live:
                for _ in range(int(rng.integers(1, 4))):
                    child = self.next_id
                    self.next_id += 1
                    if self.call("fork", seq, child) is None:
                        self.live[child] = int(rng.geometric(1.0 / a.mean_life))
                        self.counts["fork"] += 1
        # Decode: every live sequence takes one token (one call for the batch); a few
        # take several (speculative decoding, the last chunk of a prefill).
        ids = list(self.live)
        if ids:
            if rng.random() < 0.3:
                counts = np.where(rng.random(len(ids)) < 0.1, rng.integers(2, 40, size=len(ids)), 1)
                done = self.grow("append_tokens", ids, counts)
            else:
                done = self.grow("append_tokens", ids, 1)
            if done is not None:
                self.counts["append"] += len(done[0])
        # Finished sequences leave together.
        finished = []
        for seq in list(self.live):
            self.live[seq] -= 1
            if self.live[seq] <= 0:
                finished.append(seq)
        self.free(finished)

    # -- the run ------------------------------------------------------------------------
    def ops(self):
        c = self.counts
        return c["add"] + c["append"] + c["fork"] + c["free"]

    def check(self, where):
        try:
            self.kv.check()
            self.kv.page_table._check_invariants()
        except AssertionError as exc:
            self.failures.append(f"{where}: {exc}")

    def run(self):
        a = self.args
        started = time.perf_counter()
        samples = []
        warm = None
        checks = windows = 0
        self.step = 0
        gc.collect()
        samples.append((0, rss_kib()))
        while self.ops() < a.ops and not self.failures:
            if a.window_every and self.step % a.window_every == a.window_every - 1:
                self.ref = mirror(self.kv)
                window_end = self.step + a.window_steps
            self.run_step()
            self.step += 1
            if self.ref is not None and self.step >= window_end:
                got, expected = state_of(self.kv), state_of(self.ref)
                if got != expected:
                    self.failures.append(f"step {self.step}: state differs from the reference "
                                         f"after a window ({_diff(got, expected)})")
                self.ref = None
                windows += 1
            if self.step % a.check_every == 0:
                self.check(f"step {self.step}")
                checks += 1
            if self.step % a.rss_every == 0:
                gc.collect()
                samples.append((self.ops(), rss_kib()))
                if warm is None and self.ops() >= a.warmup * a.ops:
                    warm = samples[-1]
        self.check("end")
        checks += 1
        gc.collect()
        samples.append((self.ops(), rss_kib()))
        if warm is None:
            warm = samples[-1]
        after_warm = [kib for ops, kib in samples if ops >= warm[0]]
        stats = self.kv.page_table._memory_stats()
        return {
            "ok": not self.failures,
            "ops": self.ops(),
            "op_counts": self.counts,
            "steps": self.step,
            "sequences_created": self.next_id,
            "live_at_end": len(self.live),
            "checks": checks,
            "reference_windows": windows,
            "rss_start_kib": samples[0][1],
            "rss_warm_kib": warm[1],
            "rss_warm_at_ops": warm[0],
            "rss_end_kib": samples[-1][1],
            "rss_growth_after_warmup_kib": samples[-1][1] - warm[1],
            "rss_max_after_warmup_kib": max(after_warm),
            "rss_min_after_warmup_kib": min(after_warm),
            "rss_samples": samples[:: max(1, len(samples) // 40)],
            "table_memory": stats,
            "seconds": round(time.perf_counter() - started, 2),
            "failures": self.failures[:10],
        }


def _short(value, limit=160):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _diff(got, expected):
    (seqs_a, ref_a, free_a), (seqs_b, ref_b, free_b) = got, expected
    if seqs_a != seqs_b:
        bad = sorted(set(seqs_a) ^ set(seqs_b))[:3] or \
            [s for s in seqs_a if seqs_a[s] != seqs_b.get(s)][:3]
        return f"sequences differ, e.g. {bad}"
    if ref_a != ref_b:
        return "reference counts differ"
    return "free stacks differ"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=float, default=float(os.environ.get("PAGETABLE_CHURN_OPS", 1e6)),
                        help="operations to run, counted per sequence (env PAGETABLE_CHURN_OPS)")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("PAGETABLE_CHURN_SEED", 0)))
    parser.add_argument("--num-blocks", type=int, default=16_000,
                        help="pool size; the default runs out now and then, so preemption happens")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--target-live", type=int, default=400)
    parser.add_argument("--mean-life", type=float, default=24.0, help="mean decode steps per sequence")
    parser.add_argument("--max-prompt", type=int, default=1200)
    parser.add_argument("--fork-rate", type=float, default=0.15)
    parser.add_argument("--check-every", type=int, default=250, help="steps between check() calls")
    parser.add_argument("--window-every", type=int, default=100, help="steps between reference windows (0: none)")
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--rss-every", type=int, default=50)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of ops before the warm RSS sample")
    parser.add_argument("--leak-per-call", type=int, default=0,
                        help="keep this many bytes per library call (checks that the RSS bound sees leaks)")
    args = parser.parse_args(argv)
    args.ops = int(args.ops)
    faulthandler.enable()
    summary = Churn(args).run()
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
