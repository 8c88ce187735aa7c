"""Regression check: a KVCacheManager's scalar reads never return a change half done.

(The defect it was written to reproduce, fixed since: the reads below did not wait
for a change in progress.)

The threading contract (docs/guide.md, "Threads") says a read answers from one state:
the state before or after each change that overlaps it, and a read that finds a
change half-done waits for it (``_read_begin``).  ``seq_lens``, ``block_table``,
``count_cached_tokens``, copies... do; ``prefix_cache_stats``, ``num_cached_blocks``,
``num_free_blocks``, ``usage``, ``len()`` and ``in`` read the counters directly.  A
change that lets other threads run in its middle then shows them a state that never
existed.  With prefix caching that is every change that runs Python code: building
KV events (``pagetable.events._block_stored`` and ``_block_removed`` are Python
functions), hashing a block with extra keys (``ExtraKeys._keys``), and
``add_sequences``, which admits its prompts one after another: between two of them
another thread sees the first admitted and counted and the next not.

Two demonstrations:

1. (deterministic) Extra keys that look at the manager while it hashes the second
   prompt of an ``add_sequences`` call, i.e. exactly when any other thread may run:
   the scalar reads give values between the call's before and after, while
   ``seq_lens`` (a guarded read) waits and refuses.
2. (threads, no hooks) One thread calls ``add_sequences`` with LoRA-keyed prompts and
   frees them; another reads the counters in a loop.  Every value must be one the
   manager held between two calls; the defect shows values from inside a call.

Exit status 1 when either shows the defect, 0 otherwise::

    python tools/repro_unguarded_manager_reads.py
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from pagetable import KVCacheManager
from pagetable.prefix import ExtraKeys


def counters(kv):
    stats = kv.prefix_cache_stats
    return {"len": len(kv), "num_free_blocks": kv.num_free_blocks,
            "num_cached_blocks": kv.num_cached_blocks,
            "stats": [stats.requests, stats.queries, stats.hits, stats.evictions]}


def caching_manager():
    return KVCacheManager(1024, 16, enable_prefix_caching=True, hash_algorithm="sha256",
                          hash_seed="0", enable_kv_cache_events=True)


def inside_a_change():
    kv = caching_manager()
    seen = []

    class Watching(ExtraKeys):
        """Extra keys that record what the manager shows while it hashes with them."""

        __slots__ = ()

        def _keys(self, index, block_size):
            if not seen:
                try:
                    seen.append(counters(kv))
                except RuntimeError as exc:     # the fixed behaviour: the read waits, then refuses
                    seen.append(f"counters refused: {exc}")
                try:
                    kv.seq_lens([0])
                    seen.append("seq_lens answered")
                except RuntimeError as exc:
                    seen.append(f"seq_lens refused: {exc}")
            return ExtraKeys._keys(self, index, block_size)

    prompts = [np.arange(100, dtype=np.int32), np.arange(1000, 1100, dtype=np.int32)]
    before = counters(kv)
    kv.add_sequences([0, 1], prompts, [None, Watching(cache_salt="s")])
    after = counters(kv)
    return {"before": before, "inside add_sequences": seen[0], "after": after,
            "guarded read": seen[1][:80],
            "defect": isinstance(seen[0], dict) and seen[0] not in (before, after)}


def from_another_thread(seconds=2.0):
    sys.setswitchinterval(1e-6)
    kv = caching_manager()
    keys = ExtraKeys(lora_name="sql", lora_path="/adapters/sql", lora_id=3)
    rng = np.random.default_rng(0)
    states = [json.dumps(counters(kv))]     # the counters after each call
    done = [0]
    stop = threading.Event()
    reads = []

    def writer():
        seq = 0
        while not stop.is_set():
            seqs = list(range(seq, seq + 4))
            seq += 4
            prompts = [rng.integers(0, 50_000, size=int(rng.integers(20, 200))).astype(np.int32)
                       for _ in seqs]
            kv.add_sequences(seqs, prompts, [keys] * len(seqs))
            states.append(json.dumps(counters(kv)))
            done[0] += 1
            kv.free_sequence(seqs)
            states.append(json.dumps(counters(kv)))
            done[0] += 1

    def reader():
        while not stop.is_set():
            k = done[0]
            value = json.dumps(counters(kv))
            reads.append((k, value, done[0]))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    # A read during calls k_before .. k_after may see states k_before .. k_after + 1.
    bad = [(k0, v) for k0, v, k1 in reads if v not in states[k0:k1 + 2]]
    return {"calls": done[0], "reads": len(reads), "reads of no state": len(bad),
            "example": bad[0][1] if bad else None, "defect": bool(bad)}


def main():
    first = inside_a_change()
    second = from_another_thread()
    defect = first["defect"] or second["defect"]
    print(json.dumps({"inside a change": first, "from another thread": second, "defect": defect}))
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
