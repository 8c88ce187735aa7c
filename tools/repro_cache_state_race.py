"""Regression check: a copy of a prefix-caching KVCacheManager taken while another
thread changes it must capture one state (it could capture a state that never existed
before the capture became one C section; it finds nothing now).

The threading contract (docs/guide.md, "Threads") says copies, pickles and ``save``
answer from one state of the manager.  ``KVCacheManager._state()``, which all three
go through, captures the table, token counts and pool in C after checking that no
change began meanwhile (``_read_current``), and only then calls Python:
``_state.header()``, and ``_cache_state()``, which copies the prefix cache's arrays
with numpy (numpy lets other threads run while it copies an array of more than a
few hundred elements), builds the extra keys' JSON with ``ExtraKeys._to_json`` and
``json.dumps``, and iterates the manager's per-sequence keys.  A change from another
thread that runs in between lands in the cache half of the capture but not in the
rest, so the copy mixes two states: loading it raises ``CorruptStateError`` (the
reference counts and free stack say one thing, the cached-free list and the cached
flags another; with extra keys also "extra keys saved for sequence N, which is not
held"), or, worse, it loads into a manager that matches no state
(``tools/thread_stress.py --scenario manager-caching`` finds both kinds).

Here one thread admits random prompts into a pool full of cached blocks (so each
admission evicts and registers blocks) and frees them, while the main thread takes
the capture ``copy()``, pickling and ``save`` take (``_state()``) in a loop and
checks that its pool is one pool: reference counts equal to the table's references,
the cached-free list exactly the unreferenced cached blocks, the free stack exactly
the other unreferenced ones.  The first mixed captures are then loaded as a copy
would load them, which refuses them with ``CorruptStateError``.  (Taken
single-threaded, the same manager copies fine.)  No extra keys, no events: the
plainest caching manager; the larger the pool, the longer numpy's copies run
without the GIL.  Exit status 1 when a capture was mixed (the defect), 0 when none
was in the time given::

    python tools/repro_cache_state_race.py --seconds 5
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter

import numpy as np

from pagetable import CorruptStateError, KVCacheManager, OutOfBlocksError
from pagetable._state import rebuild


def partitioned(state):
    """Whether a caching manager's captured state is one state of its pool: reference
    counts equal to the table's references, the cached-free list exactly the
    unreferenced cached blocks and the free stack exactly the other unreferenced ones."""
    refcount = state["refcount"]
    cached = state["prefix_cached"].astype(bool)
    listed = state["free_stack"]
    lru, stack = listed[:int(state["prefix_lru_count"])], listed[int(state["prefix_lru_count"]):]
    on_lru = np.zeros(refcount.size, dtype=bool)
    on_lru[lru] = True
    on_stack = np.zeros(refcount.size, dtype=bool)
    on_stack[stack] = True
    return (len(np.unique(listed)) == len(listed)
            and np.array_equal(np.bincount(state["blocks"], minlength=refcount.size), refcount)
            and np.array_equal(on_lru, (refcount == 0) & cached)
            and np.array_equal(on_stack, (refcount == 0) & ~cached))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hash-algorithm", default="sha256")
    args = parser.parse_args(argv)
    sys.setswitchinterval(1e-6)
    kv = KVCacheManager(4096, 16, enable_prefix_caching=True, hash_algorithm=args.hash_algorithm,
                        hash_seed="0")
    stop = threading.Event()

    def writer():
        rng = np.random.default_rng(0)
        seq, live = 0, []
        while not stop.is_set():
            prompt = rng.integers(0, 50_000, size=int(rng.integers(16, 300))).astype(np.int32)
            try:
                kv.add_sequence(seq, token_ids=prompt)
                live.append(seq)
            except OutOfBlocksError:
                pass
            seq += 1
            if len(live) > 20:
                kv.free_sequence(live[:10])
                del live[:10]

    # The pool full of cached-free blocks first: then every admission evicts.
    rng = np.random.default_rng(1)
    for seq in range(-480, 0):
        kv.add_sequence(2**40 + seq, token_ids=rng.integers(0, 50_000, size=128).astype(np.int32))
    kv.free_sequence([2**40 + seq for seq in range(-480, 0)])
    thread = threading.Thread(target=writer)
    thread.start()
    # What copy(), pickling and save() capture, checked as it comes (cheaply: the
    # pool's lists against the reference counts and cached flags beside them); the
    # first few mixed ones are then loaded, as a copy would load them.
    captures, refused, num_mixed, mixed = 0, 0, 0, []
    deadline = time.perf_counter() + args.seconds
    try:
        while time.perf_counter() < deadline:
            try:
                state = kv._state()
            except RuntimeError:
                refused += 1             # allowed: a change was in progress
                continue
            captures += 1
            if not partitioned(state):
                num_mixed += 1
                if len(mixed) < 20:
                    mixed.append(state)
    finally:
        stop.set()
        thread.join()
    corrupt = Counter()
    for state in mixed:
        try:
            rebuild(state)
        except CorruptStateError as exc:
            corrupt[re.sub(r"\d+", "N", str(exc))] += 1
    kv.check()                           # the manager itself is sound
    print(json.dumps({"captures": captures, "refused": refused, "mixed": num_mixed,
                      "of the first 20 mixed, loads refused": sum(corrupt.values()), "messages": dict(corrupt.most_common(5)),
                      "defect": bool(num_mixed)}))
    return 1 if mixed else 0


if __name__ == "__main__":
    sys.exit(main())
