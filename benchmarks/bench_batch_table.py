"""asv suite for the persistent batch table (docs/BATCH_TABLE.md).

``BlockTableStep``: the block-table half of a decode step of B = 256 or 1,024
sequences (prompts of 1 .. 2,047 tokens, block size 16): after one ``append_tokens``
of one token each, ``table="persistent"`` brings a ``BatchTable`` up to date
(``update()``: only rows whose change stamps moved are copied) and
``table="rebuilt"`` builds the whole batch's ``block_table`` again, as a step without
a persistent table must.  Both sides time the same growth, so their difference is
the table's cost.

``python benchmarks/bench_batch_table.py`` runs both sides alternately outside asv and
prints the ratio.  Commits without ``BatchTable`` skip the suite.
"""

import time

import numpy as np

from pagetable import KVCacheManager

try:
    from pagetable import BatchTable
except ImportError:  # commits before the persistent batch table
    BatchTable = None

BLOCK_SIZE, STEPS = 16, 16


def _manager(batch, seed=0, rounds=1):
    """A manager holding ``batch`` prompts, with room for ``rounds`` of 16 decode steps."""
    lengths = np.random.default_rng(seed).integers(1, 2048, batch)
    blocks = int((-(-lengths // BLOCK_SIZE)).sum()) + (rounds + 1) * batch
    kv = KVCacheManager(blocks, BLOCK_SIZE)
    ids = np.arange(batch, dtype=np.int64)
    kv.add_sequences(ids, num_tokens=lengths)
    return kv, ids


class BlockTableStep:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0
    params = ([256, 1024], ["persistent", "rebuilt"])
    param_names = ["batch", "table"]

    def setup(self, batch, table):
        if BatchTable is None:
            raise NotImplementedError("no BatchTable in this commit")
        self.kv, self.ids = _manager(batch)
        self.bt = BatchTable(self.kv, batch, 256)
        self.bt.add(self.ids)
        self.bt.update()

    def time_decode_steps(self, batch, table):
        """16 steps: growth, then the step's block table."""
        kv, ids, bt = self.kv, self.ids, self.bt
        for _ in range(STEPS):
            kv.append_tokens(ids, 1)
            if table == "persistent":
                bt.update()
                bt.block_table[:batch]
            else:
                kv.block_table(ids)


def main():
    for batch in (256, 1024):
        best = {}
        for _ in range(15):
            for table in ("persistent", "rebuilt"):
                suite = BlockTableStep()
                suite.setup(batch, table)
                start = time.perf_counter()
                suite.time_decode_steps(batch, table)
                elapsed = (time.perf_counter() - start) / STEPS
                best[table] = min(best.get(table, elapsed), elapsed)
        print(f"decode step, {batch} sequences: persistent {best['persistent'] * 1e6:.1f} us, "
              f"rebuilt {best['rebuilt'] * 1e6:.1f} us, "
              f"ratio {best['rebuilt'] / best['persistent']:.2f}x")


if __name__ == "__main__":
    main()
