"""examples/engine_loop.py runs, and its K/V read back through the pages is what was written."""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import child_env

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "engine_loop.py"

pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not shipped with this install")


@pytest.fixture(scope="module")
def engine_loop():
    name = "examples_engine_loop"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module         # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def dense_reads_match(engine):
    """Every running sequence's K/V, read through its block table row, equals the dense copy."""
    kv, cache = engine.kv, engine.cache
    batch = np.array(engine.running, dtype=np.int64)
    table, lens = kv.block_table(batch), kv.seq_lens(batch)
    for b, seq_id in enumerate(batch.tolist()):
        pages = table[b, :-(-int(lens[b]) // kv.block_size)]
        keys, values = cache.gather_pages(pages, int(lens[b]))
        dense_keys, dense_values = engine.dense[seq_id]
        np.testing.assert_array_equal(keys, dense_keys)       # bit for bit: a copy, no math
        np.testing.assert_array_equal(values, dense_values)
    return len(batch)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_engine_loop_numpy(engine_loop, block_size):
    requests = engine_loop.make_requests(16, block_size=block_size, seed=block_size)
    engine = engine_loop.Engine(requests, num_blocks=12 * 16 // block_size + 8,
                                block_size=block_size, seed=1)
    checked = 0
    while engine.waiting or engine.running:
        engine.step()
        checked += dense_reads_match(engine)
        assert engine.stats["steps"] < 5_000
    stats = engine.stats
    assert stats["finished"] == sum(r.num_samples for r in requests)
    assert stats["admitted"] == len(requests) + stats["preempted"]
    assert checked > 0 and stats["checked_sequences"] > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and len(engine.kv) == 0
    if block_size > 1:
        # Two samples sharing a partly filled block: their first decode step copies it.
        assert stats["block_copies"] > 0


def test_engine_loop_preempts_when_the_pool_is_small(engine_loop):
    requests = engine_loop.make_requests(30, block_size=4, seed=7)
    engine = engine_loop.Engine(requests, num_blocks=24, block_size=4, seed=7)
    stats = engine.run()
    assert stats["preempted"] > 0
    assert stats["finished"] == sum(r.num_samples for r in requests)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_attention_through_pages_equals_dense(engine_loop):
    requests = engine_loop.make_requests(10, block_size=4, seed=3)
    engine = engine_loop.Engine(requests, block_size=4, seed=3)
    for _ in range(6):
        engine.step()
    assert engine.running
    # attend() itself asserts both page layouts against the dense copy; a corrupted
    # slot must make it fail, or the check proves nothing.
    engine.attend()
    first = engine.running[0]
    slot = int(engine.kv.page_table.slot_mapping([first], [0])[0])
    engine.cache.keys[slot] += 1.0
    with pytest.raises(AssertionError):
        engine.attend()


def test_engine_loop_script(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--requests", "20"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=child_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("numpy: steps ")


def test_engine_loop_torch(engine_loop):
    torch = pytest.importorskip("torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    requests = engine_loop.make_requests(30, block_size=4, seed=5)
    engine = engine_loop.Engine(requests, block_size=4, seed=5,
                                backend=engine_loop.TorchBackend(device))
    assert isinstance(engine.cache.keys, torch.Tensor)
    while engine.waiting or engine.running:
        engine.step()
        dense_reads_match(engine)
    assert engine.stats["block_copies"] > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
