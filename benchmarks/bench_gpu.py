"""asv suites for the GPU path (``pagetable.gpu``), each beside its baselines.

Where CuPy or a GPU device is missing, every ``setup`` raises ``NotImplementedError``,
which asv records as skipped.  Each timed call waits for its device work, so asv's
wall-clock times are device times plus launch overhead.  ``benchmarks/gpu_bench.py`` (run by
``tools/gpu_check.sh``) measures the same things with events and prints them against the
issue's goals.
"""

from types import SimpleNamespace

import numpy as np

from .gpu_bench import build_slot_workload, cupy_batch_formula, cupy_pairs_formula


def _device_modules():
    from pagetable import PageTable, gpu

    if not gpu.is_available():
        raise NotImplementedError("no GPU device usable through CuPy")
    import cupy

    return cupy, gpu, PageTable


class GPUSlotMapping:
    """Slot mapping on the device: pairs and batch description, beside CuPy expressions."""

    params = ([2**20, 2**24],)
    param_names = ["tokens"]
    timeout = 300

    def setup(self, num_tokens):
        cupy, gpu, PageTable = _device_modules()
        self.cupy = cupy
        arguments = SimpleNamespace(tokens=num_tokens, requests=1024, block_size=16)
        self.workload = build_slot_workload(cupy, gpu, PageTable, arguments, np.random.default_rng(0))
        self.device = self.workload["device"]
        self.out = cupy.empty(num_tokens, dtype=cupy.int64)
        self.source = cupy.empty(num_tokens * 10, dtype=cupy.uint8)
        self.target = cupy.empty_like(self.source)
        self.batch = (self.workload["rows"], self.workload["query_start_loc"],
                      self.workload["first_positions"])
        self.stream = cupy.cuda.get_current_stream()

    def time_pairs(self, num_tokens):
        self.device.slot_mapping(self.workload["token_rows"], self.workload["token_positions"],
                                 out=self.out)
        self.stream.synchronize()

    def time_pairs_cupy_formula(self, num_tokens):
        cupy_pairs_formula(self.cupy, self.device, self.workload["token_rows"],
                           self.workload["token_positions"], self.out)
        self.stream.synchronize()

    def time_batch(self, num_tokens):
        self.device.slot_mapping_from_batch(*self.batch, out=self.out,
                                            max_query_len=self.workload["max_query_len"])
        self.stream.synchronize()

    def time_batch_cupy_formula(self, num_tokens):
        cupy_batch_formula(self.cupy, self.device, *self.batch, self.out)
        self.stream.synchronize()

    def time_device_copy_of_the_same_bytes(self, num_tokens):
        # 2 x 10 bytes per token, read plus written: the pairs kernel's 20 bytes per token.
        self.target.data.copy_from_device_async(self.source.data, self.source.nbytes)
        self.stream.synchronize()


class GPUSync:
    """A decode step's ``sync()`` (1 in 16 sequences gains a block) versus full re-uploads."""

    params = ([1024],)
    param_names = ["sequences"]
    max_blocks = 2048
    timeout = 300

    def setup(self, num_sequences):
        cupy, gpu, PageTable = _device_modules()
        self.rng = np.random.default_rng(0)
        self.page_table = PageTable(16)
        self.seq_ids = np.arange(num_sequences, dtype=np.int64)
        lengths = self.rng.integers(self.max_blocks // 4, self.max_blocks // 2, size=num_sequences)
        self.page_table.append_blocks(np.repeat(self.seq_ids, lengths),
                                      self.rng.integers(0, 2**31 - 1, size=lengths.sum()))
        self.device = gpu.DeviceBlockTable(self.page_table, num_sequences, self.max_blocks)
        self.device.assign(self.seq_ids)
        self.device.sync()
        self.host_table = np.empty((num_sequences, self.max_blocks), dtype=np.int32)
        self.device_table = cupy.empty((num_sequences, self.max_blocks), dtype=cupy.int32)
        self.stream = cupy.cuda.get_current_stream()
        self.step = 0

    def _decode_step(self):
        growing = self.seq_ids[self.step % 16::16]
        self.step += 1
        room = self.max_blocks - self.page_table.num_blocks(growing)
        growing = growing[room > 0]
        self.page_table.append_blocks(growing, self.rng.integers(0, 2**31 - 1, size=growing.size))

    def time_sync(self, num_sequences):
        self._decode_step()
        self.device.sync()
        self.stream.synchronize()

    def time_full_reupload(self, num_sequences):
        self._decode_step()
        self.page_table.block_table(self.seq_ids, out=self.host_table)
        self.device_table.set(self.host_table)
        self.stream.synchronize()

    def track_sync_bytes_fraction(self, num_sequences):
        self._decode_step()
        stats = self.device.sync()
        return stats.bytes_uploaded / stats.table_bytes

    track_sync_bytes_fraction.unit = "fraction of table bytes"
