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

One thread calls ``add_sequences`` with LoRA-keyed prompts and frees them; another
reads the counters in a loop.  Every value must be one the manager held between two
calls; the defect showed values from inside a call.  (A second, deterministic check
read the counters from an ``ExtraKeys`` subclass while the manager hashed with it;
the manager now refuses subclasses, whose code would run in the middle of a change.)

Exit status 1 when it shows the defect, 0 otherwise::

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
            kv.add_sequences(seqs, token_ids=prompts, extra_keys=[keys] * len(seqs))
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
    # The counters are several reads: one that spans a completed call may combine
    # two states (each read whole), so only reads during which no call completed are
    # judged.  Those see state k or, waiting for the call in progress, state k + 1.
    judged = [(k0, v) for k0, v, k1 in reads if k0 == k1]
    bad = [(k0, v) for k0, v in judged if v not in states[k0:k0 + 2]]
    return {"calls": done[0], "reads": len(reads), "reads judged": len(judged),
            "reads of no state": len(bad), "example": bad[0][1] if bad else None,
            "defect": bool(bad) or not judged}


def main():
    second = from_another_thread()
    defect = second["defect"]
    print(json.dumps({"from another thread": second, "defect": defect}))
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
