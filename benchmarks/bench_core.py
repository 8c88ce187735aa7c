"""asv suites for every public PageTable operation, each beside its baselines.

Within a class, ``time_pagetable*`` is ours and every other ``time_*`` is a baseline on
the same inputs, so asv's graphs and ``asv compare`` show them side by side
(``time_pagetable_row_hints`` is ours given per-token row hints, as the formula is
given its rows):

- ``vllm_formula``: vLLM's host slot mapping over its persistent dense table, with the
  row indices given for free;
- ``memcpy_floor``: ``np.copyto(out, positions)``, the least a slot mapping can cost;
- ``input_stream_floor``: ``np.add(seq_ids, positions, out=out)``, the bytes
  ``slot_mapping`` itself must stream (two inputs, one output);
- ``dict_of_lists``: the seed's layout, called from a Python loop; for block_table /
  to_csr it fills a numpy array row by row from the Python lists.

``peakmem_*`` report the process's peak RSS around one call; the per-block memory
figure of the core issue is ``Memory.track_bytes_per_block`` (fresh subprocess).
"""

import numpy as np

from .workloads import (append_stream, baselines, lognormal_workload, memory, page_table_class,
                        queries, slot_seed_table, slot_table, table_batch, tokens)

BLOCK_SIZES = [16, 24]          # a power of two and not
ORDERS = ["grouped", "interleaved"]
TOKENS = [2**13, 2**16, 2**20]  # one step's budget .. a large prefill batch


class SlotMapping:
    """``slot_mapping`` over 1,024 sequences of 1..511 blocks (speed goals 1 and 2)."""

    params = (TOKENS, BLOCK_SIZES, ORDERS)
    param_names = ["tokens", "block_size", "order"]

    def setup(self, num_tokens, block_size, order):
        self.workload, self.table, self.dense = slot_table(block_size)
        self.batch = tokens(block_size, num_tokens, order)
        self.out = np.empty(num_tokens, dtype=np.int64)
        # Row hints per token, kept by an engine as the formula keeps its rows.
        self.hints = np.ascontiguousarray(self.table.rows(self.workload.seq_ids)[self.batch.rows])

    def time_pagetable(self, num_tokens, block_size, order):
        self.table.slot_mapping(self.batch.seq_ids, self.batch.positions, out=self.out)

    def time_pagetable_row_hints(self, num_tokens, block_size, order):
        self.table.slot_mapping(self.batch.seq_ids, self.batch.positions, out=self.out,
                                rows=self.hints)

    def time_vllm_formula(self, num_tokens, block_size, order):
        baselines.formula_slot_mapping(self.dense, self.batch.rows, self.batch.positions,
                                       block_size, self.out)

    def time_memcpy_floor(self, num_tokens, block_size, order):
        baselines.memcpy_floor(self.batch.positions, self.out)

    def time_input_stream_floor(self, num_tokens, block_size, order):
        baselines.input_stream_floor(self.batch.seq_ids, self.batch.positions, self.out)

    def peakmem_pagetable(self, num_tokens, block_size, order):
        self.table.slot_mapping(self.batch.seq_ids, self.batch.positions)

    def peakmem_vllm_formula(self, num_tokens, block_size, order):
        baselines.formula_slot_mapping(self.dense, self.batch.rows, self.batch.positions,
                                       block_size, np.empty(num_tokens, dtype=np.int64))


class Lookup:
    """``lookup`` -> (block ids, offsets), beside the same formula split in two."""

    params = (TOKENS, BLOCK_SIZES, ORDERS)
    param_names = ["tokens", "block_size", "order"]

    def setup(self, num_tokens, block_size, order):
        self.workload, self.table, self.dense = slot_table(block_size)
        self.batch = tokens(block_size, num_tokens, order)

    def time_pagetable(self, num_tokens, block_size, order):
        self.table.lookup(self.batch.seq_ids, self.batch.positions)

    def time_vllm_formula(self, num_tokens, block_size, order):
        baselines.formula_lookup(self.dense, self.batch.rows, self.batch.positions, block_size)

    def peakmem_pagetable(self, num_tokens, block_size, order):
        self.table.lookup(self.batch.seq_ids, self.batch.positions)


class GetBlockForPosition:
    """``get_block_for_position`` from a Python loop (speed goal 3)."""

    params = ([1_000, 10_000, 100_000], BLOCK_SIZES)
    param_names = ["calls", "block_size"]

    def setup(self, calls, block_size):
        self.table = slot_table(block_size)[1]
        self.seed_table = slot_seed_table(block_size)
        self.seq_ids, self.positions = queries(block_size, calls)

    def time_pagetable(self, calls, block_size):
        get = self.table.get_block_for_position
        for seq_id, position in zip(self.seq_ids, self.positions):
            get(seq_id, position)

    def time_dict_of_lists(self, calls, block_size):
        baselines.dict_get_block_loop(self.seed_table, self.seq_ids, self.positions)

    def peakmem_pagetable(self, calls, block_size):
        get = self.table.get_block_for_position
        for seq_id, position in zip(self.seq_ids, self.positions):
            get(seq_id, position)


class Append:
    """Growing a fresh table by ``append_blocks`` / ``append_block`` (speed goal 4).

    Blocks arrive over up to 1,024 sequences, round-robin ("interleaved", one block per
    sequence per step, as decoding appends) or "grouped" (as a prefill appends).  The
    table is created inside the timed call (an empty PageTable costs well under a
    microsecond) so every call starts from the same state.
    """

    params = ([1_024, 16_384, 131_072], ORDERS)
    param_names = ["blocks", "order"]

    def setup(self, num_blocks, order):
        self.owners, self.blocks, self.owner_list, self.block_list = append_stream(num_blocks, order)
        self.PageTable = page_table_class()

    def time_pagetable_append_blocks(self, num_blocks, order):
        self.PageTable(16).append_blocks(self.owners, self.blocks)

    def time_pagetable_append_block_loop(self, num_blocks, order):
        table = self.PageTable(16)
        for seq_id, block_id in zip(self.owner_list, self.block_list):
            table.append_block(seq_id, block_id)

    def time_dict_setdefault_loop(self, num_blocks, order):
        baselines.setdefault_append_loop(self.owner_list, self.block_list)

    def peakmem_pagetable_append_blocks(self, num_blocks, order):
        self.PageTable(16).append_blocks(self.owners, self.blocks)

    def peakmem_pagetable_append_block_loop(self, num_blocks, order):
        table = self.PageTable(16)
        for seq_id, block_id in zip(self.owner_list, self.block_list):
            table.append_block(seq_id, block_id)

    def peakmem_dict_setdefault_loop(self, num_blocks, order):
        baselines.setdefault_append_loop(self.owner_list, self.block_list)


class GetSequenceBlocks:
    """``get_sequence_blocks`` for every sequence of a long-tailed table, from a Python loop."""

    params = [256, 2_048, 10_000]
    param_names = ["sequences"]

    def setup(self, num_sequences):
        workload = lognormal_workload(num_sequences)
        self.seq_list = workload.seq_ids.tolist()
        self.table = workload.build_pagetable(page_table_class())
        self.seed_table = workload.build_dict_of_lists()

    def time_pagetable(self, num_sequences):
        get = self.table.get_sequence_blocks
        for seq_id in self.seq_list:
            get(seq_id)

    def time_dict_of_lists(self, num_sequences):
        get = self.seed_table.get_sequence_blocks
        for seq_id in self.seq_list:
            get(seq_id)

    def peakmem_pagetable(self, num_sequences):
        get = self.table.get_sequence_blocks
        for seq_id in self.seq_list:
            get(seq_id)


class RemoveSequence:
    """``remove_sequence`` of every sequence of a freshly built long-tailed table."""

    params = [256, 2_048, 10_000]
    param_names = ["sequences"]
    number = 1          # each call empties the table: it needs a fresh one from setup

    def setup(self, num_sequences):
        workload = lognormal_workload(num_sequences)
        self.seq_list = workload.seq_ids.tolist()
        self.table = workload.build_pagetable(page_table_class())
        self.seed_table = workload.build_dict_of_lists()

    def time_pagetable(self, num_sequences):
        remove = self.table.remove_sequence
        for seq_id in self.seq_list:
            remove(seq_id)

    def time_dict_of_lists(self, num_sequences):
        remove = self.seed_table.remove_sequence
        for seq_id in self.seq_list:
            remove(seq_id)

    def peakmem_pagetable(self, num_sequences):
        remove = self.table.remove_sequence
        for seq_id in self.seq_list:
            remove(seq_id)


class BlockTable:
    """``block_table`` for sequences of up to 2,048 blocks (speed goal 5)."""

    params = [16, 64, 256]
    param_names = ["sequences"]

    def setup(self, num_sequences):
        workload, self.table, self.seed_table = table_batch(num_sequences)
        self.seq_ids = workload.seq_ids
        self.seq_list = workload.seq_ids.tolist()

    def time_pagetable(self, num_sequences):
        self.table.block_table(self.seq_ids)

    def time_numpy_rows_from_lists(self, num_sequences):
        self.seed_table.block_table(self.seq_list)

    def peakmem_pagetable(self, num_sequences):
        self.table.block_table(self.seq_ids)

    def peakmem_numpy_rows_from_lists(self, num_sequences):
        self.seed_table.block_table(self.seq_list)


class ToCSR:
    """``to_csr`` for sequences of up to 2,048 blocks (speed goal 5)."""

    params = [16, 64, 256]
    param_names = ["sequences"]

    def setup(self, num_sequences):
        workload, self.table, self.seed_table = table_batch(num_sequences)
        self.seq_ids = workload.seq_ids
        self.seq_list = workload.seq_ids.tolist()

    def time_pagetable(self, num_sequences):
        self.table.to_csr(self.seq_ids)

    def time_numpy_rows_from_lists(self, num_sequences):
        self.seed_table.to_csr(self.seq_list)

    def peakmem_pagetable(self, num_sequences):
        self.table.to_csr(self.seq_ids)

    def peakmem_numpy_rows_from_lists(self, num_sequences):
        self.seed_table.to_csr(self.seq_list)


class Memory:
    """The table's footprint for 10,000 long-tailed sequences (speed goal 6).

    ``track_bytes_per_block_*`` build the table in a fresh interpreter and report
    (RSS after - RSS before) / mapped blocks, and the same for the peak during the
    build.  ``peakmem_*`` is asv's own peak-RSS reading of a build in this process
    (it includes the interpreter and numpy, so only its changes mean something).
    """

    params = ["grow", "bulk"]
    param_names = ["build"]
    unit = "bytes per block"
    timeout = 300

    def track_bytes_per_block_pagetable(self, build):
        return memory.measure_memory("pagetable", build)["rss_per_block"]

    def track_peak_bytes_per_block_pagetable(self, build):
        return memory.measure_memory("pagetable", build)["peak_rss_per_block"]

    def track_bytes_per_block_dict_of_lists(self, build):
        return memory.measure_memory("dict_of_lists", build)["rss_per_block"]

    def peakmem_pagetable(self, build):
        memory.build_table("pagetable", build, memory.build_inputs(build))

    def peakmem_dict_of_lists(self, build):
        memory.build_table("dict_of_lists", build, memory.build_inputs(build))
