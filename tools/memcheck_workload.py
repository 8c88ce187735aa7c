"""A short workload touching every code path of pagetable, for valgrind memcheck.

Run it under memcheck as docs/VALGRIND.md describes::

    PYTHONMALLOC=malloc OMP_NUM_THREADS=2 valgrind --tool=memcheck \\
        --suppressions=tools/valgrind-python.supp --error-exitcode=99 \\
        python tools/memcheck_workload.py

Single-threaded by default: every PageTable method (growth, compaction, shrinking,
the mremap'd pool, row reuse, every batched read including the OpenMP slot mapping),
the BlockAllocator and the KVCacheManager (prefill, decode, copy-on-write, fork,
free, out of blocks), copies and pickles, and the error paths (bad arguments raise
before anything changes).  Each phase checks its answers against the reference
models, so a wrong result fails the run as well as an invalid access does.

``--race SECONDS`` adds a phase where a thread appends blocks in place while another
reads ``to_csr`` / ``block_table`` / ``copy()``: on a build with the overrun defect,
memcheck reports the invalid write into the result array.  ``--baseline`` imports
everything and exits: its errors are the interpreter's and numpy's own noise, which
is what the suppression file is built from.

Sizes are small on purpose: arrays under 64 KiB come from malloc, where memcheck
sees every byte; larger ones are anonymous mappings it only sees page by page.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import threading
import time

import numpy as np

from pagetable import BlockAllocator, KVCacheManager, OutOfBlocksError, PageTable
from pagetable.reference import ReferencePageTable
from pagetable.reference import ReferenceKVCacheManager


def same(table, ref):
    assert len(table) == len(ref), (len(table), len(ref))
    for seq, blocks in ref.sequences.items():
        got = table.get_sequence_blocks(seq)
        assert got is not None and got.tolist() == blocks, seq


def table_phase(rng, block_size, rounds):
    table = PageTable(block_size)
    ref = ReferencePageTable(block_size)
    next_id = 1
    for step in range(rounds):
        # Grouped appends creating sequences, interleaved appends growing them.
        n = int(rng.integers(1, 200))
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        seqs = np.repeat(ids, rng.integers(1, 12, size=n))
        blocks = rng.integers(0, 2**31 - 1, size=len(seqs))
        table.append_blocks(seqs, blocks)
        ref.append_blocks(seqs.tolist(), blocks.tolist())
        live = np.array(list(ref.sequences), dtype=np.int64)
        some = rng.permutation(live)[: min(len(live), 300)]
        blocks = rng.integers(0, 2**31 - 1, size=len(some)).astype(np.int32)
        table.append_blocks(some, blocks)
        ref.append_blocks(some.tolist(), blocks.tolist())
        for _ in range(20):
            seq = int(live[int(rng.integers(len(live)))])
            block = int(rng.integers(0, 2**31 - 1))
            table.append_block(seq, block)
            ref.append_block(seq, block)
        for _ in range(10):
            seq = int(live[int(rng.integers(len(live)))])
            index = int(rng.integers(len(ref.sequences[seq])))
            block = int(rng.integers(0, 2**31 - 1))
            assert table.set_block(seq, index, block) == ref.set_block(seq, index, block)
        parent = int(live[0])
        table.fork_sequence(parent, next_id)
        ref.fork_sequence(parent, next_id)
        next_id += 1
        # Reads of every batched kind, checked against the reference.
        batch = rng.choice(np.array(list(ref.sequences), dtype=np.int64), size=min(64, len(ref)),
                           replace=False)
        positions = rng.integers(-2, 40 * block_size, size=len(batch) * 8)
        tok = np.repeat(batch, 8)
        assert np.array_equal(table.slot_mapping(tok, positions), ref.slot_mapping(tok, positions))
        assert all(np.array_equal(a, b) for a, b in zip(table.lookup(tok, positions),
                                                          ref.lookup(tok, positions)))
        rows = table.rows(tok)
        assert np.array_equal(table.slot_mapping(tok, positions, rows=rows),
                              ref.slot_mapping(tok, positions))
        out = np.empty(len(tok), dtype=np.int64)
        table.slot_mapping(tok, positions, out=out)
        assert all(np.array_equal(a, b) for a, b in zip(table.block_table(batch), ref.block_table(batch)))
        assert all(np.array_equal(a, b) for a, b in zip(table.to_csr(batch), ref.to_csr(batch)))
        assert np.array_equal(table.num_blocks(batch), ref.num_blocks(batch))
        table.versions(np.concatenate([batch, [10**18]]))
        # Removals: row reuse, garbage, compaction, shrinking.
        for seq in rng.choice(np.array(list(ref.sequences), dtype=np.int64),
                              size=len(ref) // 3, replace=False).tolist():
            removed = table.remove_sequence(seq)
            assert removed.tolist() == ref.remove_sequence(seq).tolist()
        assert table.remove_sequence(10**18) is None
        table._check_invariants()
    same(table, ref)
    # Copies and pickles, and a table grown past the mmap thresholds, then emptied.
    assert table.copy() == table
    assert pickle.loads(pickle.dumps(table)) == table
    big = PageTable(block_size)
    big.append_blocks(np.repeat(np.arange(20_000, dtype=np.int64), 4), np.arange(80_000))
    big_tokens = np.repeat(np.arange(20_000, dtype=np.int64), 7)
    big.slot_mapping(big_tokens, np.tile(np.arange(7), 20_000))   # 140,000: OpenMP
    for seq in range(0, 20_000, 2):
        big.remove_sequence(seq)
    big._check_invariants()
    for seq in list(big):
        big.remove_sequence(seq)
    big._check_invariants()
    return table


def error_phase(table):
    before = table.copy()
    bad_calls = [
        lambda: table.append_block(-1, 0),
        lambda: table.append_block(1, 2**31),
        lambda: table.append_blocks([1, 2], [3]),
        lambda: table.append_blocks([1, -2], [3, 4]),
        lambda: table.append_blocks([1.5], [3]),
        lambda: table.slot_mapping([1], [1, 2]),
        lambda: table.slot_mapping([-1], [0]),
        lambda: table.slot_mapping([1], [0], out=np.empty(2, dtype=np.int64)),
        lambda: table.lookup([1], [10**9], strict=True),
        lambda: table.block_table([10**18]),
        lambda: table.block_table(list(table)[:2], out=np.empty((2, 0), dtype=np.int32)),
        lambda: table.to_csr([10**18]),
        lambda: table.fork_sequence(10**18, 5),
        lambda: table.set_block(10**18, 0, 1),
        lambda: table.rows([-5]),
    ]
    for call in bad_calls:
        try:
            call()
        except (ValueError, KeyError, IndexError, TypeError, OverflowError):
            pass
    assert table == before


def manager_phase(rng, block_size):
    kv = KVCacheManager(3000, block_size)
    ref = ReferenceKVCacheManager(3000, block_size)
    live = []
    next_id = 0

    def both(name, *args):
        results = []
        for manager in (kv, ref):
            try:
                r = getattr(manager, name)(*args)
                results.append(None if r is None else (r.slots.tolist(), r.copy_src.tolist(),
                                                       r.copy_dst.tolist()))
            except (OutOfBlocksError, KeyError, ValueError) as exc:
                results.append(type(exc).__name__)
        assert results[0] == results[1], (name, results)
        return results[0]

    for step in range(120):
        for _ in range(int(rng.integers(0, 6))):
            if both("add_sequence", next_id, int(rng.integers(0, 300))) != "OutOfBlocksError":
                live.append(next_id)
            next_id += 1
        if live and rng.random() < 0.5:
            parent = live[int(rng.integers(len(live)))]
            both("fork", parent, next_id)
            live.append(next_id)
            next_id += 1
        if live:
            counts = rng.integers(0, 20, size=len(live)) if rng.random() < 0.3 else 1
            kv.can_append(live, counts)
            both("append_tokens", live, counts)
            assert np.array_equal(kv.seq_lens(live), ref.seq_lens(live))
            assert np.array_equal(kv.block_table(live), ref.block_table(live))
            assert all(np.array_equal(a, b) for a, b in zip(kv.flashinfer_layout(live),
                                                              ref.flashinfer_layout(live)))
        if len(live) > 30 or (live and rng.random() < 0.3):
            victims = live[: len(live) // 2]
            both("free_sequence", victims)
            live = live[len(live) // 2:]
        if step % 20 == 0:
            kv.check()
    kv.free_sequence(live)
    kv.check()
    for bad in (lambda: kv.append_tokens([10**9]), lambda: kv.fork(10**9, 1),
                lambda: kv.free_sequence([10**9]), lambda: kv.add_sequence(-1, 3)):
        try:
            bad()
        except (KeyError, ValueError):
            pass
    kv.check()
    alloc = BlockAllocator(64)
    got = alloc.allocate(10)
    alloc.incref(got[:3])
    alloc.free(got)
    alloc.free(got[:3])
    for bad in (lambda: alloc.free([0]), lambda: alloc.incref([1]), lambda: alloc.allocate(65)):
        try:
            bad()
        except (ValueError, OutOfBlocksError):
            pass
    assert alloc.num_free == 64


def race_phase(seconds):
    """Appends in place against to_csr / block_table / copy() (the overrun defect)."""
    table = PageTable(16)
    ids = np.arange(300, dtype=np.int64)
    table.append_blocks(np.repeat(ids, 40), np.arange(300 * 40))
    stop = time.perf_counter() + seconds
    refused = [0]

    def writer():
        block = np.arange(300, dtype=np.int32)
        while time.perf_counter() < stop:
            try:
                table.append_blocks(ids, block)
            except RuntimeError:
                refused[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while time.perf_counter() < stop:
        for read in (lambda: table.to_csr(ids), lambda: table.block_table(ids), table.copy):
            try:
                read()
                reads += 1
            except RuntimeError:
                pass
    thread.join()
    sys.setswitchinterval(old)
    table._check_invariants()
    print(f"race: {reads} reads, {refused[0]} refused appends")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="table rounds per block size")
    parser.add_argument("--race", type=float, default=0.0, help="seconds of the threaded phase")
    parser.add_argument("--baseline", action="store_true", help="import and exit (interpreter noise)")
    args = parser.parse_args(argv)
    if args.baseline:
        return 0
    rng = np.random.default_rng(7)
    for block_size in (16, 5):
        table = table_phase(rng, block_size, args.rounds)
        error_phase(table)
        manager_phase(rng, block_size)
    if args.race:
        race_phase(args.race)
    print("memcheck workload: all phases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
