"""Regression tests for crashes, silently wrong answers and calls that raised half-done.

Each test names the defect it guards against.  Anything that crashed the interpreter
runs in a child process, so that a crash fails the test instead of the test run.
"""

import copy
import pickle
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest

from conftest import child_env, run_racing, snapshot
from pagetable import AppendResult, BlockAllocator, KVCacheManager, PageTable

LINUX = sys.platform.startswith("linux")


def run_child(code, timeout=120):
    """Run ``code`` in a fresh interpreter; return its stdout, failing on a crash."""
    # Run outside the source tree: an uncompiled checkout on the path would shadow
    # the build under test (see ``child_env``).
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=child_env(),
        cwd=tempfile.gettempdir(),
    )
    assert result.returncode == 0, (
        f"child exited with {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


# ------------------------------------------------ 1. reads that overlap in-place appends

def test_batched_reads_never_overrun_while_another_thread_appends_in_place():
    """block_table and to_csr sized their output from the row lengths, then copied
    without the GIL while another thread appended into reserved room: the copy ran
    past the output (glibc abort or SIGSEGV).  Now every read answers from one state:
    each sequence's row is a prefix of what the writer appends, and the CSR and
    dense forms agree with their own lengths."""
    out = run_child("""
        import sys, threading, time
        import numpy as np
        from pagetable import PageTable

        sys.setswitchinterval(1e-6)
        pt = PageTable(16)
        seqs = np.arange(64, dtype=np.int64)
        # Room for many blocks per row, so appends never move or grow storage.
        pt.append_blocks(np.repeat(seqs, 4000), np.zeros(64 * 4000, dtype=np.int32))
        for s in seqs.tolist():
            pt.remove_sequence(s)
        for s in seqs.tolist():
            pt.append_block(s, 0)
        stop = threading.Event()

        def writer():
            k = 1
            while not stop.is_set():
                for s in range(64):
                    pt.append_block(s, k % 1000)
                k += 1
                if k == 3000:
                    for s in range(64):
                        pt.remove_sequence(s)
                        pt.append_block(s, 0)
                    k = 1

        thread = threading.Thread(target=writer)
        thread.start()
        reads = 0
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                try:
                    indptr, indices = pt.to_csr(seqs)
                    table, lengths = pt.block_table(seqs)
                except KeyError:
                    continue        # read while the writer had removed a sequence
                for b in range(64):
                    row = indices[indptr[b]:indptr[b + 1]]
                    assert row.size and row[0] == 0 and np.array_equal(row, np.arange(row.size) % 1000), row
                    n = lengths[b]
                    assert np.array_equal(table[b, :n], np.arange(n) % 1000)
                    assert (table[b, n:] == -1).all()
                reads += 1
        finally:
            stop.set()
            thread.join()
        pt._check_invariants()
        print(reads)
    """)
    assert int(out) > 10


def test_slot_mapping_during_removals_stays_inside_the_pool():
    """Kernels read a row's start and length once each and check the pool index they
    make: a row removed under a read (its start reset) must not send it outside."""
    out = run_child("""
        import sys, threading, time
        import numpy as np
        from pagetable import PageTable

        sys.setswitchinterval(1e-6)
        pt = PageTable(16)
        ids = np.arange(512, dtype=np.int64)
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                pt.append_blocks(np.repeat(ids, 8), np.arange(512 * 8) % 100)
                for s in ids.tolist():
                    pt.remove_sequence(s)

        thread = threading.Thread(target=writer)
        thread.start()
        reads = 0
        tokens = np.repeat(ids, 16)
        positions = np.tile(np.arange(16) * 8, 512)
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                for query in (tokens, np.random.default_rng(reads).permutation(tokens)):
                    try:
                        slots = pt.slot_mapping(query, positions)
                    except RuntimeError:
                        continue
                    # A mapped slot is block * 16 + offset with block in 0..99.
                    mapped = slots[slots >= 0]
                    assert (mapped < 100 * 16).all()
                reads += 1
        finally:
            stop.set()
            thread.join()
        pt._check_invariants()
        print(reads)
    """)
    assert int(out) > 10


# ------------------------------------------------------------- 2-3. crafted pickles

def test_no_class_keeps_cythons_automatic_pickling():
    for cls in (PageTable, BlockAllocator, KVCacheManager, AppendResult):
        assert not hasattr(cls, "__setstate_cython__"), cls
        assert not hasattr(cls, "__reduce_cython__"), cls


def test_append_result_state_cannot_be_forged():
    """AppendResult.__setstate__ with a short tuple segfaulted (automatic pickling with
    bounds checks off).  It pickles through its checked constructor now."""
    result = AppendResult(np.array([1, 2]), np.array([3], np.int32), np.array([4], np.int32))
    assert pickle.loads(pickle.dumps(result)) == result
    blank = AppendResult.__new__(AppendResult)
    with pytest.raises(AttributeError):
        blank.__setstate__((1,))
    with pytest.raises((TypeError, ValueError)):
        AppendResult(np.array([1]), np.array([3], np.int32), np.array([], np.int32))
    with pytest.raises(TypeError):
        AppendResult(["slots"], [], [])
    # A crafted stream that asks for a state-setting BUILD step fails cleanly.
    crafted = (b"\x80\x04cpagetable._results\nAppendResult\n)\x81(K\x01tb.")
    with pytest.raises((TypeError, AttributeError, pickle.UnpicklingError)):
        pickle.loads(crafted)
    out = run_child("""
        import pickle
        from pagetable import AppendResult
        stream = b"\\x80\\x04cpagetable._results\\nAppendResult\\n)\\x81(K\\x01tb."
        try:
            pickle.loads(stream)
        except Exception as error:
            print(type(error).__name__)
    """)
    assert out.strip()


# --------------------------------------------------- 4. a manager's table and pool

@pytest.mark.parametrize("call", [
    lambda t: t.append_block(5, 1),
    lambda t: t.append_blocks([5, 5], [1, 2]),
    lambda t: t.remove_sequence(1),
    lambda t: t.fork_sequence(1, 5),
    lambda t: t.set_block(1, 0, 3),
])
def test_a_managers_table_refuses_changes_from_outside(call):
    """Sequences added through kv.page_table made the manager index its own arrays
    out of bounds (garbage, then SIGSEGV).  Its table now refuses such changes."""
    kv = KVCacheManager(64, 4)
    kv.add_sequence(1, 6)
    before = snapshot(kv.page_table)
    with pytest.raises(RuntimeError, match="belongs to a KVCacheManager"):
        call(kv.page_table)
    assert snapshot(kv.page_table) == before
    kv.check()
    # Reads work, and a copy is an ordinary table.
    assert kv.page_table.get_sequence_blocks(1).tolist() == [0, 1]
    table = kv.page_table.copy()
    table.append_block(5, 1)
    assert 5 in table and 5 not in kv.page_table


@pytest.mark.parametrize("call", [
    lambda a: a.allocate(1), lambda a: a.free([0]), lambda a: a.incref([0]),
])
def test_a_managers_allocator_refuses_changes_from_outside(call):
    kv = KVCacheManager(64, 4)
    kv.add_sequence(1, 6)
    before = kv.allocator._refcounts()
    with pytest.raises(RuntimeError, match="belongs to a KVCacheManager"):
        call(kv.allocator)
    assert np.array_equal(kv.allocator._refcounts(), before)
    kv.check()
    pool = copy.copy(kv.allocator)
    call(pool)                      # a copy is the caller's own


def test_behind_the_managers_back_in_a_child_process():
    """The old crash, replayed: it must now raise, not corrupt memory."""
    out = run_child("""
        from pagetable import KVCacheManager
        kv = KVCacheManager(1024, 16)
        kv.add_sequence(0, 10)
        refused = 0
        for s in range(1, 5000):
            try:
                kv.page_table.append_block(s, 1)
            except RuntimeError:
                refused += 1
        kv.append_tokens([0], 5)
        print(kv.seq_lens([0])[0], refused)
    """)
    assert out.split() == ["15", "4999"]


# ----------------------------------------------------- 5. foreign byte order, alignment

def _odd_arrays(values, dtype):
    """The same integers as big-endian, little-endian, unaligned and strided arrays."""
    base = np.asarray(values, dtype=dtype)
    swapped = base.astype(base.dtype.newbyteorder())
    raw = np.zeros(base.nbytes + 1, dtype=np.uint8)
    unaligned = np.ndarray(base.shape, dtype=base.dtype, buffer=raw.data, offset=1)
    unaligned[...] = base
    strided = np.repeat(base, 2)[::2]
    readonly = base.copy()
    readonly.flags.writeable = False
    return {"swapped": swapped, "unaligned": unaligned, "strided": strided, "readonly": readonly}


@pytest.mark.parametrize("kind", ["swapped", "unaligned", "strided", "readonly"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64])
def test_every_batched_entry_point_reads_odd_arrays_right(kind, dtype):
    """``np.array([7, 7], '>i8')`` was read as native: slot_mapping returned [-1, -1]
    instead of [48, 129]."""
    pt = PageTable(16)
    pt.append_blocks([7, 7, 9], [3, 8, 5])
    ref = pt.copy()
    seqs = _odd_arrays([7, 7, 9], dtype)[kind]
    pos = _odd_arrays([0, 17, 40], dtype)[kind]
    assert seqs.dtype.isnative == (kind != "swapped")
    assert pt.slot_mapping(seqs, pos).tolist() == [48, 129, -1]
    assert [a.tolist() for a in pt.lookup(seqs, pos)] == [[3, 8, -1], [0, 1, -1]]
    batch = _odd_arrays([7, 9], dtype)[kind]
    assert [a.tolist() for a in pt.to_csr(batch)] == [[0, 2, 3], [3, 8, 5]]
    assert pt.block_table(batch)[0].tolist() == [[3, 8], [5, -1]]
    assert pt.num_blocks(batch).tolist() == [2, 1]
    assert pt.rows(batch).tolist() == pt.rows([7, 9]).tolist()
    assert pt.versions(batch)[0].tolist() == pt.versions([7, 9])[0].tolist()
    hints = _odd_arrays(pt.rows([7, 7, 9]), np.int32 if dtype != np.uint64 else np.int64)[kind]
    assert pt.slot_mapping(seqs, pos, rows=hints).tolist() == [48, 129, -1]
    pt.append_blocks(_odd_arrays([11, 11], dtype)[kind], _odd_arrays([1, 2], dtype)[kind])
    assert pt.get_sequence_blocks(11).tolist() == [1, 2]
    ref.append_blocks([11, 11], [1, 2])
    assert pt == ref

    kv = KVCacheManager(64, 4)
    kv.add_sequence(7, 3)
    kv.add_sequence(9, 5)
    batch = _odd_arrays([7, 9], dtype)[kind]
    assert kv.seq_lens(batch).tolist() == [3, 5]
    assert kv.block_table(batch).tolist() == [[0, -1], [1, 2]]
    assert kv.append_tokens(batch, _odd_arrays([1, 2], dtype)[kind]).slots.tolist() == [3, 9, 10]
    pool = BlockAllocator(8)
    blocks = pool.allocate(3)
    assert pool.refcount(_odd_arrays(blocks, dtype)[kind]).tolist() == [1, 1, 1]
    pool.free(_odd_arrays(blocks[:2], dtype)[kind])
    assert pool.num_free == 7


@pytest.mark.parametrize("make, message", [
    (lambda n: np.zeros(n, dtype=">i8"), "native byte order"),
    (lambda n: np.ndarray((n,), dtype=np.int64, buffer=np.zeros(8 * n + 1, np.uint8).data, offset=1),
     "aligned"),
    (lambda n: np.zeros(n, dtype=np.int32), "dtype"),
])
def test_an_odd_out_is_refused_not_filled_wrong(make, message):
    """A big-endian ``out`` was filled with byte-swapped values."""
    pt = PageTable(16)
    pt.append_blocks([7, 7], [3, 8])
    out = make(2)
    before = out.copy()
    with pytest.raises((TypeError, ValueError), match=message):
        pt.slot_mapping([7, 7], [0, 17], out=out)
    assert np.array_equal(out, before)


# ------------------------------------------------------- 6. out overlapping the inputs

@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("layout", ["out is seq_ids", "out is positions", "shifted by one", "hints"])
def test_out_may_overlap_its_inputs(layout, strict):
    """An ``out`` that partly overlapped seq_ids or positions gave wrong slots, or a
    ValueError about a -1 the caller never passed.  It is computed aside now."""
    pt = PageTable(16)
    pt.append_blocks([7, 7, 9, 9], [3, 8, 5, 6])
    seqs = [7, 7, 9, 9, 7]
    pos = [0, 17, 3, 31, 5]
    expected = pt.slot_mapping(seqs, pos)
    buffer = np.array(seqs + pos + [0], dtype=np.int64)
    seq_view, pos_view = buffer[:5], buffer[5:10]
    if layout == "out is seq_ids":
        out = seq_view
    elif layout == "out is positions":
        out = pos_view
    elif layout == "shifted by one":
        out = buffer[1:6]
    else:
        hints64 = np.zeros(6, dtype=np.int64)
        hints = hints64.view(np.int32)[:5]
        hints[:] = pt.rows(seqs)
        result = pt.slot_mapping(seq_view.copy(), pos_view.copy(), out=hints64[:5], rows=hints, strict=strict)
        assert result.tolist() == expected.tolist()
        return
    result = pt.slot_mapping(seq_view, pos_view, out=out, strict=strict)
    assert result is out
    assert out.tolist() == expected.tolist()


# ------------------------------------------------ 7. removals that raised after removing

def test_removals_never_raise_while_reads_run_in_another_thread():
    """remove_sequence's optional compaction raised RuntimeError when a read started
    meanwhile, after the sequence was gone (its blocks lost to the caller), and
    KVCacheManager.free_sequence freed half a batch and raised."""
    out = run_child("""
        import sys, threading
        import numpy as np
        from pagetable import KVCacheManager, PageTable

        sys.setswitchinterval(1e-6)
        pt = PageTable(16)
        kv = KVCacheManager(2**20, 16)
        stop = threading.Event()

        def reader():
            seqs = np.zeros(1 << 16, dtype=np.int64)
            pos = np.zeros(1 << 16, dtype=np.int64)
            while not stop.is_set():
                pt.slot_mapping(seqs, pos)
                try:
                    kv.page_table.slot_mapping(seqs, pos)
                except RuntimeError:
                    pass

        thread = threading.Thread(target=reader)
        thread.start()
        removed = 0
        try:
            for round in range(12):
                ids = np.arange(round * 4000, round * 4000 + 4000, dtype=np.int64)
                pt.append_blocks(np.repeat(ids, 40), np.arange(4000 * 40) % 1000)
                for s in ids.tolist():
                    blocks = pt.remove_sequence(s)      # must never raise
                    assert blocks is not None and blocks.size == 40
                    removed += 1
                for s in ids[:400].tolist():
                    kv.add_sequence(s, 300)
                kv.free_sequence(ids[:400])              # must never raise
                assert len(kv) == 0
        finally:
            stop.set()
            thread.join()
        pt._check_invariants()
        kv.check()
        print(removed)
    """, timeout=300)
    assert int(out) == 48000


# -------------------------------------- 8, 10. a failed growth leaves nothing behind

@pytest.mark.skipif(not LINUX, reason="address-space limits are Linux's")
def test_running_out_of_memory_changes_nothing_and_raises_memory_error():
    """Growing the pool under an address-space limit raised OSError (ENOMEM) instead
    of MemoryError, and append_block(new_id) left an empty new_id behind."""
    out = run_child("""
        import resource
        import numpy as np
        from pagetable import PageTable

        pt = PageTable(16)
        ids = np.arange(20000, dtype=np.int64)
        pt.append_blocks(np.repeat(ids, 100), np.arange(2_000_000) % 1000)
        stats = pt._memory_stats()
        # Fill the pool to its end, so that the next new row must grow it.
        spare = stats["pool_capacity"] - stats["pool_tail"]
        pt.append_blocks(np.full(spare, 10**9), np.zeros(spare, dtype=np.int32))
        before = (len(pt), pt.total_blocks)
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), hard))
        outcomes = []
        for call in (lambda: pt.append_block(123456789, 5),
                     lambda: pt.append_blocks([123456789] * 8, [5] * 8),
                     lambda: pt.fork_sequence(10**9, 123456789)):
            try:
                call()
                outcomes.append("ok")
            except MemoryError:
                outcomes.append("MemoryError")
            except Exception as error:
                outcomes.append(type(error).__name__)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert 123456789 not in pt, "a failed call left the new sequence behind"
        assert (len(pt), pt.total_blocks) == before
        pt._check_invariants()
        pt.append_block(123456789, 5)           # and the table still works
        print(" ".join(outcomes))
    """)
    assert out.split() == ["MemoryError"] * 3


@pytest.mark.skipif(not LINUX, reason="address-space limits are Linux's")
def test_add_sequence_that_cannot_allocate_its_result_changes_nothing():
    """add_sequence made the sequence, then raised MemoryError allocating its result;
    a retry then failed with "already exists"."""
    out = run_child("""
        import resource
        from pagetable import KVCacheManager, OutOfBlocksError

        kv = KVCacheManager(2**26, 16)
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        # Room for the table's rows (a few hundred MiB), not for 2**29 int64 slots.
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
        try:
            kv.add_sequence(1, 2**29)
            print("allocated")
        except MemoryError:
            print("MemoryError")
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert 1 not in kv and kv.num_free_blocks == 2**26
        kv.check()
        print(kv.add_sequence(1, 40).slots.size)
    """)
    assert out.split() == ["MemoryError", "40"]


def test_append_block_of_a_new_sequence_is_rolled_back_when_growth_is_refused():
    """A read in flight in another thread refuses growth (RuntimeError); the new
    sequence created for the block must not stay behind."""
    pt = PageTable(16)
    pt.append_blocks(np.repeat(np.arange(64), 64), np.arange(64 * 64))
    seqs = np.repeat(np.arange(64, dtype=np.int64), 8192)
    positions = np.zeros(seqs.size, dtype=np.int64)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            pt.slot_mapping(seqs, positions)

    thread = threading.Thread(target=reader)
    thread.start()
    refused = 0
    try:
        next_id = 10_000
        for _ in range(20000):
            try:
                pt.append_block(next_id, 1)
                pt.append_block(next_id, 2)
            except RuntimeError:
                refused += 1
                assert next_id not in pt or pt.get_sequence_blocks(next_id).tolist() == [1]
            next_id += 1
    finally:
        stop.set()
        thread.join()
    pt._check_invariants()
    assert all(pt.get_sequence_blocks(s).size in (1, 2) for s in pt if s >= 10_000)


# ----------------------------------------------------- 9, 11. exceptions and messages

@pytest.mark.parametrize("values", [
    [np.uint64(7), np.int64(7)],
    [np.int64(7), np.uint64(7)],
    [7, np.uint64(7)],
])
def test_mixed_numpy_integer_scalars_are_integers(values):
    """numpy makes [np.uint64, np.int64] float64; every batched entry point raised a
    bare StopIteration."""
    pt = PageTable(16)
    pt.append_blocks(values, [3, 8])
    assert pt.get_sequence_blocks(7).tolist() == [3, 8]
    assert pt.slot_mapping(values, [0, 17]).tolist() == [48, 129]
    assert pt.num_blocks(values).tolist() == [2, 2]
    kv = KVCacheManager(16, 4)
    kv.add_sequence(7, 1)
    assert kv.seq_lens(values).tolist() == [1, 1]
    with pytest.raises(OverflowError, match="seq_ids"):
        pt.slot_mapping([np.uint64(2**64 - 1), np.int64(1)], [0, 0])
    with pytest.raises(TypeError, match="seq_ids"):
        pt.slot_mapping([np.uint64(1), 1.5], [0, 0])


def test_unknown_sequences_are_named_in_key_errors():
    pt = PageTable(16)
    pt.append_block(1, 1)
    with pytest.raises(KeyError, match="parent_id 100"):
        pt.fork_sequence(100, 5)
    with pytest.raises(KeyError, match="sequence_id 100"):
        pt.set_block(100, 0, 1)
    assert 5 not in pt


# ------------------------------------------------------------------ threads, generally

def test_reads_and_writes_from_many_threads_keep_the_table_whole():
    """Writers race, readers read; a writer either completes or raises RuntimeError
    having changed nothing, a read either answers or raises RuntimeError."""
    pt = PageTable(16)
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for step in range(300):
            try:
                if seed == 0:
                    ids = rng.integers(0, 200, size=50)
                    pt.append_blocks(ids, rng.integers(0, 1000, size=50))
                elif seed == 1:
                    pt.remove_sequence(int(rng.integers(0, 200)))
                else:
                    live = pt.sequence_ids()[:50]
                    pt.slot_mapping(np.repeat(live, 4), np.tile(np.arange(4), live.size))
                    pt.to_csr(live)            # KeyError if one went meanwhile
            except (RuntimeError, KeyError):
                pass
            except Exception as error:     # anything else is a bug
                errors.append(repr(error))

    run_racing(worker, count=3)
    assert errors == []
    pt._check_invariants()


# ----------------------------------------------------------- found by the fuzz harness

@pytest.mark.parametrize("method", ["rows", "num_blocks", "block_table", "to_csr", "versions"])
def test_minus_one_at_the_start_of_a_batch_is_refused(method):
    """-1 was also the "no id yet" of the row resolver: a batch starting with it
    passed as a repeat and indexed row -1 (out of bounds)."""
    pt = PageTable(16)
    pt.append_block(1, 2)
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(pt, method)([-1, 1])
    with pytest.raises(ValueError, match="seq_ids"):
        getattr(pt, method)([-1])


@pytest.mark.parametrize("values", [[True, 2], [1, np.bool_(False)], (2, True)])
def test_bools_among_integers_are_refused(values):
    """numpy reads [True, 2] as int64; a bool is no id."""
    pt = PageTable(16)
    pt.append_block(1, 2)
    with pytest.raises(TypeError, match="seq_ids"):
        pt.slot_mapping(values, [0, 0])
    with pytest.raises(TypeError, match="block_ids"):
        pt.append_blocks([1, 1], values)
    assert pt.get_sequence_blocks(1).tolist() == [2]
