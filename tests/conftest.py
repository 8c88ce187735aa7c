import os
import pathlib

import numpy as np
import pytest

import pagetable

from pagetable import PageTable
from pagetable.reference import ReferencePageTable

BLOCK_SIZES = [1, 3, 16, 17, 32, 256]


@pytest.fixture(params=BLOCK_SIZES, ids=lambda b: f"bs{b}")
def block_size(request):
    return request.param


def build_random(block_size, num_sequences=50, max_blocks=40, seed=0, id_scale=10**15):
    """Build a fast table and a reference table with the same random contents."""
    rng = np.random.default_rng(seed)
    pt = PageTable(block_size)
    ref = ReferencePageTable(block_size)
    seq_ids = rng.choice(id_scale, size=num_sequences, replace=False).astype(np.int64)
    lengths = rng.integers(0, max_blocks + 1, size=num_sequences)
    for seq_id, length in zip(seq_ids.tolist(), lengths.tolist()):
        blocks = rng.integers(0, 2**31 - 1, size=length)
        if length == 0:
            continue
        pt.append_blocks(np.full(length, seq_id), blocks)
        ref.append_blocks([seq_id] * length, blocks.tolist())
    return pt, ref, seq_ids[lengths > 0], rng


def snapshot(pt):
    """Everything observable about a table, for "unchanged" checks."""
    return (pt.block_size, [(s, pt.get_sequence_blocks(s).tolist()) for s in pt], len(pt), pt.total_blocks)


def child_env():
    """Environment for a child Python that must import the very package under test.

    Children run outside the source tree (an uncompiled checkout there would shadow an
    installed build); PYTHONPATH points them at wherever this process found pagetable.
    """
    env = dict(os.environ)
    root = str(pathlib.Path(pagetable.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_racing(worker, count=3):
    """Run ``worker(seed)`` for seeds ``0 .. count - 1`` in threads, all at once.

    The interpreter's switch interval is cut to a microsecond meanwhile, so that
    threads change hands wherever the GIL is released.
    """
    import sys
    import threading

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)


# Hypothesis profiles: "default" is hypothesis's own; HYPOTHESIS_PROFILE=thorough runs
# many more examples with no deadline (tests that pass their own settings keep them).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("thorough", max_examples=5000, deadline=None)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
