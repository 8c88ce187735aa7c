"""Benchmark-only code: the workloads pagetable is timed on and the baselines it is timed against.

Nothing in the library imports this module; it is not part of the API.  It is the one
copy shared by the asv suites (``benchmarks/``), the pytest-benchmark tests
(``tests/benchmarks/``) and ``python -m pagetable bench``.  It depends on numpy only,
so that asv can load it straight from the checkout (see ``benchmarks/workloads.py``)
while it benchmarks an older commit whose package predates it.

Baselines
---------
``DictOfListsPageTable``
    The seed's layout and algorithms: a dict mapping a sequence id to a list of
    Python ints.  ``block_table`` / ``to_csr`` fill a numpy array row by row from
    those lists, the way an engine without a native table builds kernel inputs.
``formula_slot_mapping``
    vLLM's host formula over its persistent dense ``[rows, W]`` int32 block table,
    with each token's row index handed over for free.
``memcpy_floor``
    ``np.copyto(out, positions)``: read 8 bytes and write 8 bytes per token, the
    least any slot mapping over int64 arrays can cost.
``input_stream_floor``
    ``np.add(seq_ids, positions, out=out)``: the traffic ``slot_mapping`` itself must
    move (two int64 inputs, one output), for information beside the memcpy floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

PAD_SLOT_ID = -1

# The slot-mapping workload of the speed goals: 1,024 sequences of 1..511 blocks.
SLOT_SEQUENCES = 1024
SLOT_MAX_BLOCKS = 511
# The block_table / to_csr workload: 256 sequences of up to 2,048 blocks.
TABLE_SEQUENCES = 256
TABLE_MAX_BLOCKS = 2048
# The memory workload: 10,000 sequences, lognormal lengths, median 32, capped at 4,096.
MEMORY_SEQUENCES = 10_000
MEMORY_MEDIAN_BLOCKS = 32
MEMORY_SIGMA = 1.0
MEMORY_CAP_BLOCKS = 4096


# --------------------------------------------------------------------------- workloads


def sequence_ids(count, seed=0):
    """Distinct, scattered int64 sequence ids (not 0..count-1, so no table can cheat)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(count).astype(np.int64) * 7919 + 1_000_003


def uniform_lengths(count, low, high, seed=0):
    """Blocks per sequence, uniform in ``low..high`` inclusive (int64)."""
    rng = np.random.default_rng(seed + 1)
    return rng.integers(low, high + 1, size=count, dtype=np.int64)


def lognormal_lengths(count=MEMORY_SEQUENCES, median=MEMORY_MEDIAN_BLOCKS,
                      sigma=MEMORY_SIGMA, cap=MEMORY_CAP_BLOCKS, seed=0):
    """Long-tailed blocks per sequence: lognormal with the given median, 1..cap (int64)."""
    rng = np.random.default_rng(seed + 2)
    lengths = np.rint(rng.lognormal(np.log(median), sigma, size=count))
    return np.clip(lengths, 1, cap).astype(np.int64)


@dataclass
class TableWorkload:
    """A set of sequences and their physical blocks, buildable into every layout.

    ``indices[indptr[i]:indptr[i + 1]]`` are sequence ``seq_ids[i]``'s block ids in
    order.  Block ids are a random permutation of ``0..total-1``, as an allocator
    hands them out after some churn.
    """

    block_size: int
    seq_ids: np.ndarray            # int64 [B]
    lengths: np.ndarray            # int64 [B]
    indptr: np.ndarray             # int64 [B + 1]
    indices: np.ndarray            # int32 [total]
    _block_owner: np.ndarray = field(default=None, repr=False)

    @classmethod
    def make(cls, lengths, block_size=16, seed=0):
        lengths = np.asarray(lengths, dtype=np.int64)
        seq_ids = sequence_ids(len(lengths), seed)
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        rng = np.random.default_rng(seed + 3)
        indices = rng.permutation(int(indptr[-1])).astype(np.int32)
        return cls(block_size, seq_ids, lengths, indptr, indices)

    @classmethod
    def slot_mapping_table(cls, block_size=16, seed=0):
        """The speed goals' table: 1,024 sequences of 1..511 blocks."""
        return cls.make(uniform_lengths(SLOT_SEQUENCES, 1, SLOT_MAX_BLOCKS, seed), block_size, seed)

    @classmethod
    def block_table_batch(cls, num_sequences=TABLE_SEQUENCES, block_size=16, seed=0):
        """Sequences of 1..2,048 blocks, for block_table / to_csr."""
        return cls.make(uniform_lengths(num_sequences, 1, TABLE_MAX_BLOCKS, seed), block_size, seed)

    @property
    def total_blocks(self):
        return int(self.indptr[-1])

    @property
    def block_owners(self):
        """The sequence id of every entry of ``indices`` (int64 [total])."""
        if self._block_owner is None:
            self._block_owner = np.repeat(self.seq_ids, self.lengths)
        return self._block_owner

    def build_pagetable(self, page_table_class):
        """The table under test, filled with one ``append_blocks`` call."""
        table = page_table_class(self.block_size)
        table.append_blocks(self.block_owners, self.indices)
        return table

    def build_dict_of_lists(self):
        """The seed's layout holding the same blocks."""
        table = DictOfListsPageTable(self.block_size)
        for i, seq_id in enumerate(self.seq_ids.tolist()):
            table.blocks[seq_id] = self.indices[self.indptr[i]:self.indptr[i + 1]].tolist()
        return table

    def build_dense_table(self):
        """vLLM's persistent block table: int32 [B, W], row i is ``seq_ids[i]``, padded."""
        width = int(self.lengths.max()) if len(self.lengths) else 0
        dense = np.full((len(self.seq_ids), width), PAD_SLOT_ID, dtype=np.int32)
        for i in range(len(self.seq_ids)):
            dense[i, :self.lengths[i]] = self.indices[self.indptr[i]:self.indptr[i + 1]]
        return dense


@dataclass
class TokenBatch:
    """One step's tokens: sequence id, position and (for the formula) dense-table row."""

    seq_ids: np.ndarray            # int64 [N]
    positions: np.ndarray          # int64 [N]
    rows: np.ndarray               # int64 [N]
    out: np.ndarray                # int64 [N], preallocated output

    def __len__(self):
        return len(self.positions)


def token_batch(workload, num_tokens, interleaved=False, seed=0):
    """``num_tokens`` mapped tokens spread over every sequence of ``workload``.

    Each sequence gets a share proportional to its length, as one contiguous run of
    positions starting at a random mapped position (a prefill chunk, or a decode
    window).  Grouped: runs follow each other, as engines batch tokens.
    Interleaved: the same tokens in one random order.
    """
    rng = np.random.default_rng(seed + 4)
    capacity = workload.lengths * workload.block_size
    if num_tokens > capacity.sum():
        raise ValueError(f"num_tokens={num_tokens} exceeds the table's {capacity.sum()} mapped positions")
    share = capacity * (num_tokens / capacity.sum())
    counts = np.floor(share).astype(np.int64)
    # Hand the remainder to the largest fractional shares that still have room.
    remainder = num_tokens - int(counts.sum())
    order = np.argsort(-(share - counts), kind="stable")
    order = order[counts[order] < capacity[order]]
    counts[order[:remainder]] += 1
    starts = (rng.random(len(counts)) * (capacity - counts + 1)).astype(np.int64)

    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    run_starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=run_starts[1:])
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(run_starts - starts, counts)
    if interleaved:
        permutation = rng.permutation(num_tokens)
        rows, positions = rows[permutation], positions[permutation]
    rows = np.ascontiguousarray(rows)
    positions = np.ascontiguousarray(positions)
    seq_ids = np.ascontiguousarray(workload.seq_ids[rows])
    return TokenBatch(seq_ids, positions, rows, np.empty(num_tokens, dtype=np.int64))


def random_queries(workload, count, seed=0):
    """``count`` (sequence id, mapped position) pairs as Python int lists, for Python loops."""
    rng = np.random.default_rng(seed + 5)
    rows = rng.integers(0, len(workload.seq_ids), size=count)
    positions = (rng.random(count) * workload.lengths[rows] * workload.block_size).astype(np.int64)
    return workload.seq_ids[rows].tolist(), positions.tolist()


def append_stream(num_sequences, blocks_per_sequence, grouped=False, seed=0):
    """Blocks to append (int64 seq ids, int32 block ids).

    Round-robin (default): one block per sequence per step, as decoding appends them.
    Grouped: each sequence's blocks together, as a prefill appends them.
    """
    seq_ids = sequence_ids(num_sequences, seed)
    if grouped:
        owners = np.repeat(seq_ids, blocks_per_sequence)
    else:
        owners = np.tile(seq_ids, blocks_per_sequence)
    blocks = np.random.default_rng(seed + 6).permutation(len(owners)).astype(np.int32)
    return owners, blocks


# --------------------------------------------------------------------------- baselines


class DictOfListsPageTable:
    """The seed's PageTable: ``{sequence_id: [block_id, ...]}`` of Python ints."""

    def __init__(self, block_size=16):
        self.block_size = block_size
        self.blocks = {}

    def append_block(self, sequence_id, block_id):
        self.blocks.setdefault(sequence_id, []).append(block_id)

    def get_block_for_position(self, sequence_id, token_pos):
        blocks = self.blocks.get(sequence_id)
        if blocks is None:
            return None
        index = token_pos // self.block_size
        if index >= len(blocks):
            return None
        return blocks[index], token_pos % self.block_size

    def get_sequence_blocks(self, sequence_id):
        blocks = self.blocks.get(sequence_id)
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def remove_sequence(self, sequence_id):
        blocks = self.blocks.pop(sequence_id, None)
        return None if blocks is None else np.array(blocks, dtype=np.int32)

    def num_sequences(self):
        return len(self.blocks)

    def block_table(self, seq_ids):
        """Fill a padded numpy table row by row from the Python lists."""
        rows = [self.blocks[seq_id] for seq_id in seq_ids]
        num_blocks = np.array([len(row) for row in rows], dtype=np.int32)
        width = int(num_blocks.max()) if len(rows) else 0
        table = np.full((len(rows), width), PAD_SLOT_ID, dtype=np.int32)
        for i, row in enumerate(rows):
            table[i, :len(row)] = row
        return table, num_blocks

    def to_csr(self, seq_ids):
        """Fill CSR arrays row by row from the Python lists."""
        rows = [self.blocks[seq_id] for seq_id in seq_ids]
        indptr = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum([len(row) for row in rows], out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        for i, row in enumerate(rows):
            indices[indptr[i]:indptr[i + 1]] = row
        return indptr, indices


def formula_slot_mapping(dense_table, rows, positions, block_size, out):
    """vLLM's host slot mapping over its persistent dense table (rows given for free)."""
    width = dense_table.shape[1]
    idx = rows * width + positions // block_size
    np.add(dense_table.ravel()[idx].astype(np.int64) * block_size, positions % block_size, out=out)
    return out


def formula_lookup(dense_table, rows, positions, block_size):
    """The same formula, returning (block id, offset) the way ``lookup`` does."""
    width = dense_table.shape[1]
    idx = rows * width + positions // block_size
    return dense_table.ravel()[idx], (positions % block_size).astype(np.int32)


def memcpy_floor(positions, out):
    """The memory floor of a slot mapping: stream the int64 input into the int64 output."""
    np.copyto(out, positions)
    return out


def input_stream_floor(seq_ids, positions, out):
    """The floor for a slot mapping that reads its sequence ids too: 16 bytes in, 8 out.

    ``np.add(seq_ids, positions, out=out)`` streams exactly what ``slot_mapping`` must
    touch per token (two int64 inputs, one int64 output), so ours can approach this,
    never ``memcpy_floor`` (which reads one input).
    """
    np.add(seq_ids, positions, out=out)
    return out


def setdefault_append_loop(seq_ids, block_ids):
    """The seed's append in a Python loop: ``dict.setdefault(s, []).append(b)``."""
    blocks = {}
    for seq_id, block_id in zip(seq_ids, block_ids):
        blocks.setdefault(seq_id, []).append(block_id)
    return blocks


def dict_get_block_loop(table, seq_ids, positions):
    """The seed's ``get_block_for_position`` from a Python loop."""
    get = table.get_block_for_position
    result = None
    for seq_id, position in zip(seq_ids, positions):
        result = get(seq_id, position)
    return result


# --------------------------------------------------------------------------- memory


def _rss_bytes():
    """Resident set size now, in bytes (Linux /proc; elsewhere the peak, as a stand-in)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return _peak_rss_bytes()


def _peak_rss_bytes():
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource
    except ImportError:          # Windows: no ru_maxrss
        return 0
    # ru_maxrss survives execve on Linux, so it can hold the parent's peak: an upper bound.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss():
    """Restart the VmHWM peak from the current RSS (Linux >= 4.0); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _new_table(table_kind):
    if table_kind == "pagetable":
        from pagetable import PageTable
        return PageTable(16)
    return {}


def grow_inputs(lengths, seq_ids):
    """Sequence ids longest first (so each step's ids are a prefix) and every block id."""
    order = np.argsort(-lengths, kind="stable")
    blocks = np.random.default_rng(7).permutation(int(lengths.sum())).astype(np.int32)
    return seq_ids[order], lengths[order], blocks


def grow_table(table_kind, inputs):
    """Grow every sequence one block per step, as decoding does; return the table."""
    sorted_ids, sorted_lengths, blocks = inputs
    table = _new_table(table_kind)
    taken = 0
    for step in range(int(sorted_lengths[0])):
        active = int(np.searchsorted(-sorted_lengths, -step, side="left"))
        step_ids = sorted_ids[:active]
        step_blocks = blocks[taken:taken + active]
        taken += active
        if table_kind == "pagetable":
            table.append_blocks(step_ids, step_blocks)
        else:
            for seq_id, block_id in zip(step_ids.tolist(), step_blocks.tolist()):
                table.setdefault(seq_id, []).append(block_id)
    return table


def bulk_inputs(lengths, seq_ids):
    """One grouped batch holding every block: (owners, block ids, seq ids, lengths)."""
    blocks = np.random.default_rng(7).permutation(int(lengths.sum())).astype(np.int32)
    return np.repeat(seq_ids, lengths), blocks, seq_ids, lengths


def bulk_table(table_kind, inputs):
    """Build the whole table from one grouped batch; return the table."""
    owners, blocks, seq_ids, lengths = inputs
    table = _new_table(table_kind)
    if table_kind == "pagetable":
        table.append_blocks(owners, blocks)
    else:
        start = 0
        block_list = blocks.tolist()
        for seq_id, length in zip(seq_ids.tolist(), lengths.tolist()):
            table[seq_id] = block_list[start:start + length]
            start += length
        del block_list
    return table


def _memory_child(table_kind, build, use_tracemalloc):
    """Runs in a fresh interpreter: build the table, report bytes per mapped block.

    The inputs (sequence ids, block ids) are made before the first reading and stay
    alive to the last, so only the table and its build's transients are counted.
    """
    import gc
    if table_kind == "pagetable":
        import pagetable  # noqa: F401  (import cost is not the table's)
    lengths = lognormal_lengths()
    seq_ids = sequence_ids(len(lengths))
    total = int(lengths.sum())
    inputs = (grow_inputs if build == "grow" else bulk_inputs)(lengths, seq_ids)
    gc.collect()
    if use_tracemalloc:
        import tracemalloc
        tracemalloc.start()
    _reset_peak_rss()
    rss_before = _rss_bytes()
    table = (grow_table if build == "grow" else bulk_table)(table_kind, inputs)
    gc.collect()
    result = {"table": table_kind, "build": build, "blocks": total, "sequences": len(lengths)}
    if use_tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result.update(traced_bytes=current, traced_peak_bytes=peak)
    else:
        rss_after = _rss_bytes()
        result.update(rss_bytes=rss_after - rss_before,
                      peak_rss_bytes=max(_peak_rss_bytes() - rss_before, rss_after - rss_before))
    del table
    print(json.dumps(result))


def measure_memory(table_kind="pagetable", build="grow", use_tracemalloc=False, timeout=300):
    """Bytes per mapped block of the memory workload, measured in a fresh subprocess.

    ``table_kind`` is ``"pagetable"`` or ``"dict_of_lists"``; ``build`` is ``"grow"``
    (one block per sequence per step) or ``"bulk"`` (one grouped batch).  Returns a
    dict with ``blocks`` and, per block, ``rss`` and ``peak_rss`` (RSS run) or
    ``traced`` and ``traced_peak`` (tracemalloc run).
    """
    # Load this file by path: it may have been loaded that way (asv) rather than imported.
    code = ("import sys, importlib.util; sys.path[:0] = {path!r}; "
            "spec = importlib.util.spec_from_file_location('_bench_baselines', {file!r}); "
            "m = sys.modules['_bench_baselines'] = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); "
            "m._memory_child({table!r}, {build!r}, {trace!r})").format(
        path=[p for p in sys.path if p], file=os.path.abspath(__file__), table=table_kind,
        build=build, trace=use_tracemalloc)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=timeout, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{completed.stderr}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    blocks = result["blocks"]
    for key in ("rss_bytes", "peak_rss_bytes", "traced_bytes", "traced_peak_bytes"):
        if key in result:
            result[key.replace("_bytes", "_per_block")] = result[key] / blocks
    return result
