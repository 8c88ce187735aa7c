"""asv suites for the KV-cache manager, each operation beside the pure-Python reference.

Every suite takes a ``manager`` parameter: ``"pagetable"`` is
:class:`pagetable.KVCacheManager`, ``"reference"`` is
:class:`pagetable.reference.ReferenceKVCacheManager` on the same state, so
``asv compare`` and the graphs show the two side by side.  Mutating operations run
once per sample (``number = 1``) on state rebuilt by ``setup``; the state is warmed by
a few decode steps first, as in a running engine.

``python benchmarks/bench_manager.py`` runs every suite once outside asv and prints
the ratios (the speed goals' figures).
"""

import gc
import time

import numpy as np

from pagetable import KVCacheManager

try:
    from pagetable.reference import ReferenceKVCacheManager
except ImportError:  # commits before the reference models became a subpackage
    from pagetable.reference_manager import ReferenceKVCacheManager  # type: ignore[no-redef]

MANAGERS = {"pagetable": KVCacheManager, "reference": ReferenceKVCacheManager}
KINDS = list(MANAGERS)
BLOCK_SIZE = 16


def populated(kind, num_seqs, headroom_blocks=8, seed=0, warm_steps=3):
    """A manager holding ``num_seqs`` sequences of ShareGPT-like lengths (1..1024 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.4, 0.8, num_seqs), 1, 1024).astype(np.int64)
    blocks = int((-(-lengths // BLOCK_SIZE)).sum()) + headroom_blocks * num_seqs
    manager = MANAGERS[kind](blocks, BLOCK_SIZE)
    for seq, n in enumerate(lengths.tolist()):
        manager.add_sequence(seq, n)
    ids = np.arange(num_seqs, dtype=np.int64)
    for _ in range(warm_steps):
        manager.append_tokens(ids, 1)
    return manager, ids


class _Mutating:
    number = 1
    repeat = (5, 40, 20.0)
    warmup_time = 0.0


class AppendDecode(_Mutating):
    """Decode steps: ``append_tokens(every running sequence, 1)`` (goal: 1,024 at >= 20x).

    One sample is 16 consecutive steps (divide by 16 for one step): over 16 steps every
    sequence crosses exactly one block boundary, so the sample holds the amortised cost
    of the steps that allocate and of the PageTable's occasional row moves.
    """

    params = ([256, 1024, 4096], KINDS)
    param_names = ["num_seqs", "manager"]
    steps = 16

    def setup(self, num_seqs, kind):
        self.manager, self.ids = populated(kind, num_seqs)

    def time_append_tokens(self, num_seqs, kind):
        append, ids = self.manager.append_tokens, self.ids
        for _ in range(16):
            append(ids, 1)

    def peakmem_append_tokens(self, num_seqs, kind):
        self.manager.append_tokens(self.ids, 1)


class AppendChunk(_Mutating):
    """64 sequences grow by ``chunk`` tokens each (chunked prefill, speculative decoding)."""

    params = ([4, 256], KINDS)
    param_names = ["chunk", "manager"]

    def setup(self, chunk, kind):
        self.manager, self.ids = populated(kind, 64, headroom_blocks=chunk // BLOCK_SIZE + 4)

    def time_append_tokens(self, chunk, kind):
        self.manager.append_tokens(self.ids, chunk)


class AddSequence(_Mutating):
    """Admit 64 new sequences (one prefill batch) of ``prompt_len`` tokens each."""

    params = ([16, 512, 4096], KINDS)
    param_names = ["prompt_len", "manager"]

    def setup(self, prompt_len, kind):
        self.manager = MANAGERS[kind](64 * (-(-prompt_len // BLOCK_SIZE)) + 1, BLOCK_SIZE)

    def time_add_sequence(self, prompt_len, kind):
        add = self.manager.add_sequence
        for seq in range(64):
            add(seq, prompt_len)


class Fork(_Mutating):
    """Parallel sampling: 4 children for each of 64 parents of ``prompt_len`` tokens."""

    params = ([64, 2048], KINDS)
    param_names = ["prompt_len", "manager"]

    def setup(self, prompt_len, kind):
        self.manager = MANAGERS[kind](64 * (-(-prompt_len // BLOCK_SIZE)) + 1, BLOCK_SIZE)
        for seq in range(64):
            self.manager.add_sequence(seq, prompt_len)

    def time_fork(self, prompt_len, kind):
        fork = self.manager.fork
        for parent in range(64):
            for child in range(4):
                fork(parent, 1000 + 4 * parent + child)


class FreeSequence(_Mutating):
    """Free every sequence in one call."""

    params = ([256, 4096], KINDS)
    param_names = ["num_seqs", "manager"]

    def setup(self, num_seqs, kind):
        self.manager, self.ids = populated(kind, num_seqs)

    def time_free_sequence(self, num_seqs, kind):
        self.manager.free_sequence(self.ids)


class Layouts:
    """The attention kernels' inputs for a batch (read-only, so timed many times)."""

    params = ([256, 1024, 4096], KINDS)
    param_names = ["num_seqs", "manager"]

    def setup(self, num_seqs, kind):
        self.manager, self.ids = populated(kind, num_seqs)

    def time_flashinfer_layout(self, num_seqs, kind):
        self.manager.flashinfer_layout(self.ids)

    def time_block_table(self, num_seqs, kind):
        self.manager.block_table(self.ids)

    def time_can_append(self, num_seqs, kind):
        self.manager.can_append(self.ids, 1)

    def time_seq_lens(self, num_seqs, kind):
        self.manager.seq_lens(self.ids)


SUITES = [AppendDecode, AppendChunk, AddSequence, Fork, FreeSequence, Layouts]


def _sample(cls, method, size, kind, calls):
    bench = cls()
    bench.setup(size, kind)
    run = getattr(bench, method)
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            run(size, kind)
        return (time.perf_counter() - start) / calls / getattr(cls, "steps", 1)
    finally:
        gc.enable()


def main(rounds=5):
    """Each suite outside asv: median over samples taken interleaved, ours then reference.

    Figures are per call (AppendDecode: per decode step); nothing is asserted.
    """
    print(f"{'suite':14s} {'operation':18s} {'size':>6s} {'pagetable':>11s} {'reference':>11s} {'ratio':>8s}")
    for cls in SUITES:
        mutating = issubclass(cls, _Mutating)
        for method in sorted(n for n in dir(cls) if n.startswith("time_")):
            for size in cls.params[0]:
                times = {kind: [] for kind in KINDS}
                for _ in range(rounds):
                    for kind in KINDS:
                        times[kind].append(_sample(cls, method, size, kind, 1 if mutating else 20))
                ours, theirs = np.median(times["pagetable"]), np.median(times["reference"])
                print(f"{cls.__name__:14s} {method[5:]:18s} {size:6d} {ours * 1e6:9.1f}us "
                      f"{theirs * 1e6:9.1f}us {theirs / ours:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
