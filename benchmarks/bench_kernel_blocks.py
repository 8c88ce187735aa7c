"""asv suites for the kernel-block exports, each beside the plain export of the same batch.

``kernel_block_size`` is ``None`` (the manager's own blocks) or ``16``: a manager of
block size 64 exported for a kernel that pages in blocks of 16 tokens, so each block
is 4 kernel blocks and the output is 4 times as large.  The batch is 1,024 sequences
of about 2,000 tokens (32 blocks, 125 kernel blocks each), a decode batch of long
contexts.  ``asv compare`` shows the two side by side; the goal is the kernel-block
export within 1.5x of the plain one.

``python benchmarks/bench_kernel_blocks.py`` runs each suite outside asv, alternating
the sides, and prints the ratios (the goal's figures).  Commits before kernel block
sizes skip the ``16`` side.
"""

import gc
import time

import numpy as np

from pagetable import KVCacheManager

BLOCK_SIZE = 64
KERNEL_BLOCK_SIZE = 16


def long_context_batch(num_seqs, seed=0):
    """A manager holding ``num_seqs`` sequences of 1,900 .. 2,100 tokens, and their ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1900, 2101, num_seqs)
    manager = KVCacheManager(int((-(-lengths // BLOCK_SIZE)).sum()) + num_seqs, BLOCK_SIZE)
    for seq, n in enumerate(lengths.tolist()):
        manager.add_sequence(seq, n)
    ids = np.arange(num_seqs, dtype=np.int64)
    manager.append_tokens(ids, 1)        # a decode step: rows no longer in admission order
    return manager, ids


class KernelBlockExports:
    """``block_table`` / ``flashinfer_layout`` (manager) and ``block_table`` / ``to_csr`` (table)."""

    params = ([1024], [None, KERNEL_BLOCK_SIZE])
    param_names = ["num_seqs", "kernel_block_size"]

    def setup(self, num_seqs, kernel_block_size):
        self.manager, self.ids = long_context_batch(num_seqs)
        self.table = self.manager.page_table
        self.kwargs = {} if kernel_block_size is None else {"kernel_block_size": kernel_block_size}
        try:
            self.manager.block_table(self.ids[:1], **self.kwargs)
        except TypeError:      # commits before kernel block sizes
            raise NotImplementedError from None

    def time_block_table(self, num_seqs, kernel_block_size):
        self.manager.block_table(self.ids, **self.kwargs)

    def time_flashinfer_layout(self, num_seqs, kernel_block_size):
        self.manager.flashinfer_layout(self.ids, **self.kwargs)

    def time_table_block_table(self, num_seqs, kernel_block_size):
        self.table.block_table(self.ids, **self.kwargs)

    def time_table_to_csr(self, num_seqs, kernel_block_size):
        self.table.to_csr(self.ids, **self.kwargs)

    def peakmem_block_table(self, num_seqs, kernel_block_size):
        self.manager.block_table(self.ids, **self.kwargs)


def _best(run, calls, rounds):
    """The fastest of ``rounds`` samples of ``calls`` calls, per call."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def main(rounds=40, calls=5, repeats=5):
    """Each export outside asv: the kernel-block and plain sides alternate, ``repeats`` times.

    Prints the range of the ratio kernel-block / plain over the repeats and the best
    time of each side; nothing is asserted.  The floor is what making and writing
    the larger output alone costs (``numpy.empty`` and ``fill``), for scale.
    """
    bench = KernelBlockExports()
    print(f"{'operation':22s} {'plain':>9s} {'kernel':>9s} {'ratio (min..max)':>18s}")
    gc.disable()
    try:
        for method in ("block_table", "flashinfer_layout", "table_block_table", "table_to_csr"):
            ratios, plains, kernels = [], [], []
            for _ in range(repeats):
                sides = {}
                for size in (None, KERNEL_BLOCK_SIZE):
                    bench.setup(1024, size)
                    run = getattr(bench, f"time_{method}")
                    sides[size] = _best(lambda: run(1024, size), calls, rounds)
                plains.append(sides[None])
                kernels.append(sides[KERNEL_BLOCK_SIZE])
                ratios.append(sides[KERNEL_BLOCK_SIZE] / sides[None])
            print(f"{method:22s} {min(plains) * 1e6:7.1f}us {min(kernels) * 1e6:7.1f}us "
                  f"{min(ratios):8.2f}..{max(ratios):.2f}x", flush=True)
        width = -(-2100 // KERNEL_BLOCK_SIZE)
        for label, shape in (("floor plain", (1024, -(-2100 // BLOCK_SIZE))), ("floor kernel", (1024, width))):
            floor = _best(lambda: np.empty(shape, dtype=np.int32).fill(0), calls, rounds)
            print(f"{label:22s} {floor * 1e6:7.1f}us  (numpy.empty + fill of {shape})")
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
