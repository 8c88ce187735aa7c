"""Benchmark-only code: what two inference engines do on the host for their KV cache, per step.

Nothing in the library imports this module; it is not part of the API.  The step-level
rows of ``pagetable bench``, ``benchmarks/bench_engine_step.py`` (asv) and
``tests/benchmarks/test_bench_engine_step.py`` (pytest-benchmark) time pagetable
against these models, on the step workloads of :mod:`pagetable.cli.workloads`.  The
module depends on numpy only (asv loads this folder by path), and imports pagetable
only inside :class:`PagetableEngine`.

Each model is a reimplementation, in plain idiomatic Python and numpy, of the data
structures and per-step loops an engine runs, with prefix caching, sliding windows,
swapping and the device copies left out (pagetable's side leaves them out too).  The
per-request Python loops are kept: they are the cost being compared.

vLLM v1 (``vllm/v1/core/kv_cache_manager.py``, ``block_pool.py``, ``kv_cache_utils.py``,
``vllm/v1/worker/block_table.py``, ``gpu_input_batch.py``, ``gpu_model_runner.py``)
    The scheduler side holds one :class:`KVCacheBlock` object per physical block, the
    free ones in a doubly-linked :class:`FreeKVCacheBlockQueue`; block 0 is kept back
    as the null block.  :class:`VLLMKVCacheManager` keeps a list of blocks per
    request; ``allocate_slots`` tops it up to ``cdiv(computed + new, block_size)``
    blocks and ``free`` returns them in reverse order.  The worker side keeps a
    persistent int32 table of ``max_reqs`` rows (:class:`VLLMBlockTable`), appends each
    request's new block ids to its row, fills freed rows by moving the last rows into
    them (``condense``), and maps slots with numpy over that table.
LMDeploy (``lmdeploy/pytorch/paging/block_manager/``, ``block.py``, ``scheduler.py``,
``engine/engine.py``)
    Blocks are numpy free lists: a :class:`LogicalAllocator` hands out logical ids and
    maps them to physical ones from a :class:`PhysicalAllocator`, with reference counts
    and access times per logical block.  Each sequence keeps its logical blocks in a
    numpy-backed growable list (:class:`LogicalTokenBlocks`); the
    :class:`DefaultBlockManager` tops a sequence up to ``num_required_blocks`` and
    frees it whole.  Every step the engine gathers each sequence's physical blocks
    and pads them into a new dense table (as ``torch.nn.utils.rnn.pad_sequence``
    does), from which the slots follow.

A step of any engine here returns an :class:`EngineStep`: the slot of each of the
step's tokens, the dense block table of the batch (one row per running sequence) with
its per-row block counts, and the sequence in each row.  Block numbering differs from
engine to engine; the tests compare the structure (``check_step``).
"""

from __future__ import annotations

from typing import Any
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .workloads import PAD_SLOT_ID


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class EngineStep:
    """What one engine step hands attention (arrays may be views of persistent state)."""

    slots: np.ndarray          # int64 [tokens]: the slot of each token of the step
    table: np.ndarray          # int32 [rows, width]: row r lists the blocks of row_seq_ids[r]
    num_blocks: np.ndarray     # int32 [rows]
    row_seq_ids: np.ndarray | None    # int64 [rows]
    token_seq_ids: np.ndarray | None  # int64 [tokens]: whose token each slot is
    positions: np.ndarray | None      # int64 [tokens]


# =========================================================================== vLLM v1


class KVCacheBlock:
    """One physical block's metadata, linked into the free queue while it is free."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash = None           # set only with prefix caching, which is off here
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None


class FreeKVCacheBlockQueue:
    """The free blocks as a doubly-linked list through the blocks themselves.

    Removing a block from the middle is O(1) (a prefix-cache hit takes a free block
    back), which is why the engine does not use a deque.  Allocation pops the head;
    freeing appends at the tail, so the least recently freed block is reused first.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self.head: KVCacheBlock | None = blocks[0] if blocks else None
        self.tail: KVCacheBlock | None = blocks[-1] if blocks else None
        for before, after in zip(blocks, blocks[1:]):
            before.next_free_block = after
            after.prev_free_block = before

    def popleft(self) -> KVCacheBlock:
        block = self.head
        if block is None:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        before, after = block.prev_free_block, block.next_free_block
        if before is not None:
            before.next_free_block = after
        if after is not None:
            after.prev_free_block = before
        if block is self.head:
            self.head = after
        if block is self.tail:
            self.tail = before
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        if self.tail is not None:
            self.tail.next_free_block = block
            block.prev_free_block = self.tail
        else:
            self.head = block
        self.tail = block
        block.next_free_block = None
        self.num_free_blocks += 1


class BlockPool:
    """Every block object, the free queue, and block 0 held back as the null block."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.null_block = self.free_block_queue.popleft()

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot get {num_blocks} free blocks from the pool")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            block.ref_cnt += 1
            blocks.append(block)
        return blocks

    def free_blocks(self, ordered_blocks) -> None:
        """Release blocks, the first to be reused first."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and block is not self.null_block:
                self.free_block_queue.append(block)


class Request:
    """The scheduler's view of a request: ``num_tokens`` known, ``num_computed_tokens`` in KV."""

    __slots__ = ("request_id", "num_tokens", "num_computed_tokens")

    def __init__(self, request_id: int, num_tokens: int) -> None:
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.num_computed_tokens = 0


class VLLMKVCacheManager:
    """A single full-attention group, prefix caching off: a list of blocks per request."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_req: int) -> None:
        self.block_size = block_size
        self.max_blocks_per_req = max_blocks_per_req
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: defaultdict[int, list[KVCacheBlock]] = defaultdict(list)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[KVCacheBlock] | None:
        """Blocks for ``num_new_tokens`` more tokens; ``None`` (nothing taken) if they do not fit."""
        if num_new_tokens == 0:
            raise ValueError("num_new_tokens must be greater than 0")
        req_blocks = self.req_to_blocks[request.request_id]
        num_required_blocks = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        num_new_blocks = num_required_blocks - len(req_blocks)
        if num_new_blocks > self.block_pool.get_num_free_blocks():
            return None
        if num_new_blocks <= 0:
            return []
        if len(req_blocks) + num_new_blocks > self.max_blocks_per_req:
            raise ValueError(f"request {request.request_id} needs more than "
                             f"{self.max_blocks_per_req} blocks")
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Give back a request's blocks, its last block first (the tail is least useful)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: int) -> list[int]:
        return [block.block_id for block in self.req_to_blocks[request_id]]


class VLLMBlockTable:
    """The worker's persistent ``[max_reqs, max_blocks_per_req]`` int32 block table."""

    def __init__(self, block_size: int, max_num_reqs: int, max_num_blocks_per_req: int) -> None:
        self.block_size = block_size
        self.max_num_blocks_per_req = max_num_blocks_per_req
        self.block_table = np.zeros((max_num_reqs, max_num_blocks_per_req), dtype=np.int32)
        self.num_blocks_per_row = np.zeros(max_num_reqs, dtype=np.int32)

    def append_row(self, block_ids: list[int], row_idx: int) -> None:
        if not block_ids:
            return
        num_blocks = len(block_ids)
        start = self.num_blocks_per_row[row_idx]
        self.num_blocks_per_row[row_idx] += num_blocks
        self.block_table[row_idx, start:start + num_blocks] = block_ids

    def add_row(self, block_ids: list[int], row_idx: int) -> None:
        self.num_blocks_per_row[row_idx] = 0
        self.append_row(block_ids, row_idx)

    def clear_row(self, row_idx: int) -> None:
        num_blocks = self.num_blocks_per_row[row_idx]
        self.block_table[row_idx, :num_blocks] = 0
        self.num_blocks_per_row[row_idx] = 0

    def move_row(self, src: int, tgt: int) -> None:
        num_blocks = self.num_blocks_per_row[src]
        self.block_table[tgt, :num_blocks] = self.block_table[src, :num_blocks]
        self.num_blocks_per_row[tgt] = num_blocks

    def swap_row(self, src: int, tgt: int) -> None:
        pair, swapped = [src, tgt], [tgt, src]
        self.num_blocks_per_row[pair] = self.num_blocks_per_row[swapped]
        self.block_table[pair] = self.block_table[swapped]

    def compute_slot_mapping(self, req_indices: np.ndarray, positions: np.ndarray,
                             out: np.ndarray) -> np.ndarray:
        """Each token's slot: its row's block at ``position // block_size``, plus the offset.

        ``ravel`` is a view of the contiguous table, as the engine's torch ``flatten`` is.
        """
        block_table_indices = req_indices * self.max_num_blocks_per_req + positions // self.block_size
        block_numbers = self.block_table.ravel()[block_table_indices]
        np.add(block_numbers * self.block_size, positions % self.block_size, out=out)
        return out


class VLLMEngine:
    """A vLLM v1 step: the scheduler allocates per request, the worker updates its table.

    ``step`` frees the finished requests, admits the new ones (their prompts are this
    step's prefill), grows every other running request by one token, and returns the
    step's slot mapping and block table.  Rows are condensed after removals, as the
    engine's input batch does.
    """

    def __init__(self, num_blocks: int, block_size: int, max_reqs: int, max_blocks_per_req: int,
                 max_tokens: int) -> None:
        self.block_size = block_size
        self.kv_cache_manager = VLLMKVCacheManager(num_blocks, block_size, max_blocks_per_req)
        self.requests: dict[int, Request] = {}
        self.running: list[Request] = []
        # Worker side: the persistent input batch.
        self.block_table = VLLMBlockTable(block_size, max_reqs, max_blocks_per_req)
        self.req_ids: list[int | None] = []             # row -> request id
        self.req_id_to_index: dict[int, int] = {}
        self.num_computed_tokens_cpu = np.zeros(max_reqs, dtype=np.int32)
        self.arange = np.arange(max(max_tokens, max_reqs), dtype=np.int64)
        self.slot_mapping = np.zeros(max_tokens, dtype=np.int64)
        self._req_indices = self._positions = self.arange[:0]

    # ------------------------------------------------------------------ scheduler

    def schedule(self, finished: list[int], new: list[tuple[int, int]]):
        """The scheduler's half: (new block ids per request, scheduled tokens, new requests)."""
        manager = self.kv_cache_manager
        if finished:
            done = set(finished)
            for request_id in finished:
                manager.free(self.requests.pop(request_id))
            self.running = [request for request in self.running if request.request_id not in done]
        num_scheduled_tokens: dict[int, int] = {}
        new_block_ids: dict[int, list[int]] = {}
        computed_before: dict[int, int] = {}
        for request in self.running:
            num_new_tokens = request.num_tokens - request.num_computed_tokens
            new_blocks = manager.allocate_slots(request, num_new_tokens)
            if new_blocks is None:
                raise MemoryError("the pool is too small for the workload (no preemption modelled)")
            new_block_ids[request.request_id] = [block.block_id for block in new_blocks]
            num_scheduled_tokens[request.request_id] = num_new_tokens
        scheduled_new = []
        for request_id, num_tokens in new:
            request = Request(request_id, num_tokens)
            if manager.allocate_slots(request, num_tokens) is None:
                raise MemoryError("the pool is too small for the workload (no preemption modelled)")
            self.requests[request_id] = request
            self.running.append(request)
            scheduled_new.append(request)
            num_scheduled_tokens[request_id] = num_tokens
        for request in self.running:
            computed_before[request.request_id] = request.num_computed_tokens
            request.num_computed_tokens += num_scheduled_tokens[request.request_id]
        return finished, new_block_ids, computed_before, scheduled_new, num_scheduled_tokens

    def sample(self) -> None:
        """Every running request receives its next token (what the next step computes)."""
        for request in self.running:
            request.num_tokens += 1

    # ------------------------------------------------------------------ worker

    def _remove_request(self, request_id: int) -> int:
        row = self.req_id_to_index.pop(request_id)
        self.req_ids[row] = None
        return row

    def _add_request(self, request_id: int, block_ids: list[int], free_rows: list[int]) -> None:
        if free_rows:
            row = free_rows.pop()
            self.req_ids[row] = request_id
        else:
            row = len(self.req_ids)
            self.req_ids.append(request_id)
        self.req_id_to_index[request_id] = row
        self.num_computed_tokens_cpu[row] = 0
        self.block_table.add_row(block_ids, row)

    def _condense(self, empty_rows: list[int]) -> None:
        """Move the last occupied rows into the empty ones, so rows 0..n-1 are the batch."""
        empty_rows.sort(reverse=True)                  # pop() gives the lowest first
        last = len(self.req_ids) - 1
        while empty_rows:
            while last >= 0 and self.req_ids[last] is None:
                last -= 1
            empty = empty_rows.pop()
            if empty >= last:
                break
            request_id = self.req_ids[last]
            assert request_id is not None          # rows up to the last are occupied
            self.req_ids[empty] = request_id
            self.req_ids[last] = None
            self.req_id_to_index[request_id] = empty
            self.block_table.move_row(last, empty)
            self.num_computed_tokens_cpu[empty] = self.num_computed_tokens_cpu[last]
            last -= 1
        while self.req_ids and self.req_ids[-1] is None:
            self.req_ids.pop()

    def update_states(self, finished, new_block_ids, computed_before, scheduled_new) -> None:
        """The worker's half of the bookkeeping: rows freed, appended to, added, condensed."""
        free_rows = [self._remove_request(request_id) for request_id in finished]
        free_rows.sort(reverse=True)
        for request_id, block_ids in new_block_ids.items():
            row = self.req_id_to_index[request_id]
            self.num_computed_tokens_cpu[row] = computed_before[request_id]
            self.block_table.append_row(block_ids, row)
        for request in scheduled_new:
            self._add_request(request.request_id, self.kv_cache_manager.get_block_ids(request.request_id),
                              free_rows)
        if free_rows:
            self._condense(free_rows)

    def prepare_inputs(self, num_scheduled_tokens: dict[int, int]) -> EngineStep:
        """Each token's row and position, then the slot mapping over the persistent table."""
        num_reqs = len(self.req_ids)
        # Condensed: rows 0 .. num_reqs - 1 all hold a request.
        tokens_per_row = np.array([num_scheduled_tokens[request_id]  # type: ignore[index]
                                   for request_id in self.req_ids], dtype=np.int32)
        req_indices = np.repeat(self.arange[:num_reqs], tokens_per_row)
        cu_num_tokens = np.cumsum(tokens_per_row)
        total = int(cu_num_tokens[-1]) if num_reqs else 0
        offsets = self.arange[:total] - np.repeat(cu_num_tokens - tokens_per_row, tokens_per_row)
        positions = self.num_computed_tokens_cpu[req_indices] + offsets
        slots = self.block_table.compute_slot_mapping(req_indices, positions, self.slot_mapping[:total])
        self._req_indices, self._positions = req_indices, positions
        return EngineStep(slots, self.block_table.block_table[:num_reqs],
                          self.block_table.num_blocks_per_row[:num_reqs], None, None, positions)

    def step(self, finished=(), new=()) -> EngineStep:
        """One engine step; ``new`` is ``[(request id, prompt tokens), ...]``."""
        finished, new_block_ids, computed_before, scheduled_new, num_scheduled_tokens = \
            self.schedule(list(finished), list(new))
        self.update_states(finished, new_block_ids, computed_before, scheduled_new)
        result = self.prepare_inputs(num_scheduled_tokens)
        self.sample()
        return result

    def admit(self, request_ids, num_tokens) -> None:
        """Admission alone: one ``allocate_slots`` per prompt (the scheduler's half)."""
        manager = self.kv_cache_manager
        for request_id, count in zip(request_ids, num_tokens):
            request = Request(request_id, count)
            if manager.allocate_slots(request, count) is None:
                raise MemoryError("the pool is too small for the workload")
            request.num_computed_tokens = count
            self.requests[request_id] = request
            self.running.append(request)

    def free(self, request_ids) -> None:
        """Finished requests alone: one ``free`` per request (the scheduler's half)."""
        manager = self.kv_cache_manager
        for request_id in request_ids:
            manager.free(self.requests.pop(request_id))

    def describe(self, result: EngineStep) -> EngineStep:
        """``result`` with the row and token owners filled in (for checks; not timed)."""
        row_ids = np.array(self.req_ids, dtype=np.int64)
        return EngineStep(result.slots, result.table, result.num_blocks, row_ids,
                          row_ids[self._req_indices], result.positions)


# =========================================================================== LMDeploy


class PhysicalAllocator:
    """Physical block ids on one device: a numpy stack of free ids."""

    def __init__(self, num_blocks: int, offset: int = 0) -> None:
        self._num_blocks = num_blocks
        self._free_blocks = np.arange(num_blocks, dtype=np.int64) + offset
        self._free_count = num_blocks

    def allocate(self, num_blocks: int) -> np.ndarray:
        if num_blocks > self._free_count:
            raise MemoryError("not enough free memory blocks")
        num_used = self._num_blocks - self._free_count
        blocks = self._free_blocks[num_used:num_used + num_blocks]
        self._free_count -= num_blocks
        return blocks

    def free(self, blocks: np.ndarray) -> None:
        count = len(blocks)
        if count:
            num_used = self._num_blocks - self._free_count
            self._free_blocks[num_used - count:num_used] = blocks
            self._free_count += count

    def get_num_free_blocks(self) -> int:
        return self._free_count


class LogicalAllocator:
    """Logical block ids over the device's physical ones, with references and access times."""

    def __init__(self, num_gpu_blocks: int) -> None:
        self._num_blocks = num_gpu_blocks
        self.phy_map = np.zeros(num_gpu_blocks, dtype=np.int64)
        self.ref_count = np.zeros(num_gpu_blocks, dtype=np.int64)
        self.access_time = np.zeros(num_gpu_blocks, dtype=np.int64)
        self._gpu_allocator = PhysicalAllocator(num_gpu_blocks)
        self._free_blocks = np.arange(num_gpu_blocks)
        self._free_count = num_gpu_blocks

    def allocate(self, num_blocks: int) -> np.ndarray:
        if num_blocks == 0:
            return np.empty(0, dtype=np.int64)
        if num_blocks > self._free_count or num_blocks > self._gpu_allocator.get_num_free_blocks():
            raise MemoryError("not enough free memory blocks")
        num_used = self._num_blocks - self._free_count
        blocks = self._free_blocks[num_used:num_used + num_blocks]
        self.phy_map.put(blocks, self._gpu_allocator.allocate(num_blocks))
        self.ref_count.put(blocks, 1)
        self.access_time[blocks] = time.perf_counter()
        self._free_count -= num_blocks
        return blocks.copy()

    def free(self, blocks: np.ndarray) -> None:
        np.add.at(self.ref_count, blocks, -1)
        self.access_time[blocks] = time.perf_counter()
        freed = blocks[self.ref_count[blocks] == 0]
        count = len(freed)
        if count == 0:
            return
        num_used = self._num_blocks - self._free_count
        self._free_blocks[num_used - count:num_used] = freed
        self._free_count += count
        self._gpu_allocator.free(self.phy_map[freed])

    def get_num_free_blocks(self) -> int:
        return self._gpu_allocator.get_num_free_blocks()

    def get_physical_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return self.phy_map[blocks]


class LogicalTokenBlocks:
    """A sequence's logical block ids: a numpy array grown 128 entries at a time."""

    ALLOC_SIZE = 128

    def __init__(self) -> None:
        self._blocks = np.zeros(self.ALLOC_SIZE, dtype=np.int64)
        self._num_real = 0

    def reserve(self, size: int) -> None:
        if self._blocks.size < size:
            grow = cdiv(size - self._blocks.size, self.ALLOC_SIZE) * self.ALLOC_SIZE
            self._blocks = np.pad(self._blocks, (0, grow))

    def append(self, blocks: np.ndarray) -> None:
        count = len(blocks)
        self.reserve(self._num_real + count)
        self._blocks[self._num_real:self._num_real + count] = blocks
        self._num_real += count

    def get_real_blocks(self) -> np.ndarray:
        return self._blocks[:self._num_real]

    def reset(self) -> None:
        self._num_real = 0

    def __len__(self) -> int:
        return self._num_real


class SchedulerSequence:
    """A sequence: ``num_history_ids`` tokens in KV, ``num_token_ids`` to compute this step."""

    __slots__ = ("seq_id", "block_size", "num_history_ids", "num_token_ids", "logical_blocks")

    def __init__(self, seq_id: int, num_tokens: int, block_size: int) -> None:
        self.seq_id = seq_id
        self.block_size = block_size
        self.num_history_ids = 0
        self.num_token_ids = num_tokens
        self.logical_blocks = LogicalTokenBlocks()

    def num_all_tokens(self) -> int:
        return self.num_history_ids + self.num_token_ids


class DefaultBlockManager:
    """Tops each sequence up to the blocks its tokens need; frees a sequence whole."""

    def __init__(self, num_gpu_blocks: int) -> None:
        self.allocator = LogicalAllocator(num_gpu_blocks)

    @staticmethod
    def num_required_blocks(seq: SchedulerSequence, prealloc_size: int = 0) -> int:
        num_all_blocks = cdiv(seq.num_all_tokens() + prealloc_size, seq.block_size)
        return max(0, num_all_blocks - len(seq.logical_blocks))

    def can_allocate(self, seq: SchedulerSequence, prealloc_size: int = 0) -> bool:
        return self.num_required_blocks(seq, prealloc_size) <= self.get_num_free_gpu_blocks()

    def allocate_msg(self, seq: SchedulerSequence, prealloc_size: int = 0) -> None:
        num_required = self.num_required_blocks(seq, prealloc_size)
        if num_required > 0:
            seq.logical_blocks.append(self.allocator.allocate(num_required))

    def free(self, seq: SchedulerSequence) -> None:
        self.allocator.free(seq.logical_blocks.get_real_blocks())
        seq.logical_blocks.reset()

    def get_block_table(self, seq: SchedulerSequence) -> np.ndarray:
        return self.allocator.get_physical_blocks(seq.logical_blocks.get_real_blocks())

    def get_num_free_gpu_blocks(self) -> int:
        return self.allocator.get_num_free_blocks()


class LMDeployEngine:
    """An LMDeploy step: allocate per sequence, then gather and pad the batch's block table.

    The engine runs a prefill batch and a decoding batch as separate forwards; this
    model does a step's admissions and its decoding in one call and builds one set of
    inputs, so that every engine here answers the same step.
    """

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int) -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_manager = DefaultBlockManager(num_blocks)
        self.sequences: dict[int, SchedulerSequence] = {}
        self.running: list[SchedulerSequence] = []

    def _schedule(self, seqs) -> None:
        manager = self.block_manager
        for seq in seqs:
            if not manager.can_allocate(seq):
                raise MemoryError("the pool is too small for the workload (no eviction modelled)")
            manager.allocate_msg(seq)
            if len(seq.logical_blocks) > self.max_blocks_per_seq:
                raise ValueError(f"sequence {seq.seq_id} needs more than {self.max_blocks_per_seq} blocks")

    def step(self, finished=(), new=()) -> EngineStep:
        """One engine step; ``new`` is ``[(sequence id, prompt tokens), ...]``."""
        if finished:
            self.free(finished)
        admitted = [SchedulerSequence(seq_id, count, self.block_size) for seq_id, count in new]
        self._schedule(self.running)        # decoding: each holds the token sampled last step
        self._schedule(admitted)
        for seq in admitted:
            self.sequences[seq.seq_id] = seq
        self.running.extend(admitted)
        result = self.create_model_inputs(self.running)
        for seq in self.running:            # the step's tokens are history; one is sampled
            seq.num_history_ids += seq.num_token_ids
            seq.num_token_ids = 1
        return result

    def create_model_inputs(self, seqs) -> EngineStep:
        """The padded block table of the batch and the slots of the step's tokens."""
        block_offsets = [self.block_manager.get_block_table(seq) for seq in seqs]
        num_blocks = np.array([len(offsets) for offsets in block_offsets], dtype=np.int32)
        table = np.zeros((len(seqs), int(num_blocks.max()) if len(seqs) else 0), dtype=np.int32)
        for row, offsets in enumerate(block_offsets):
            table[row, :len(offsets)] = offsets
        seq_length = np.array([seq.num_token_ids for seq in seqs], dtype=np.int64)
        history_lengths = np.array([seq.num_history_ids for seq in seqs], dtype=np.int64)
        rows = np.repeat(np.arange(len(seqs)), seq_length)
        q_start_loc = np.cumsum(seq_length) - seq_length
        positions = history_lengths[rows] + np.arange(len(rows)) - q_start_loc[rows]
        slots = (table[rows, positions // self.block_size].astype(np.int64) * self.block_size
                 + positions % self.block_size)
        self._rows = rows
        return EngineStep(slots, table, num_blocks, None, None, positions)

    def admit(self, seq_ids, num_tokens) -> None:
        """Admission alone: one ``allocate_msg`` per prompt."""
        manager = self.block_manager
        for seq_id, count in zip(seq_ids, num_tokens):
            seq = SchedulerSequence(seq_id, count, self.block_size)
            if not manager.can_allocate(seq):
                raise MemoryError("the pool is too small for the workload")
            manager.allocate_msg(seq)
            seq.num_history_ids, seq.num_token_ids = count, 0
            self.sequences[seq_id] = seq
            self.running.append(seq)

    def free(self, seq_ids) -> None:
        """One ``free`` per finished sequence."""
        manager = self.block_manager
        done = set()
        for seq_id in seq_ids:
            manager.free(self.sequences.pop(seq_id))
            done.add(seq_id)
        self.running = [seq for seq in self.running if seq.seq_id not in done]

    def describe(self, result: EngineStep) -> EngineStep:
        row_ids = np.array([seq.seq_id for seq in self.running], dtype=np.int64)
        return EngineStep(result.slots, result.table, result.num_blocks, row_ids,
                          row_ids[self._rows], result.positions)


# =========================================================================== pagetable


class PagetableEngine:
    """pagetable's side of the same steps: ``KVCacheManager`` plus a persistent ``BatchTable``.

    Without ``pagetable.BatchTable`` (commits before it), the batch table is rebuilt
    whole each step with ``PageTable.block_table``.
    """

    def __init__(self, num_blocks: int, block_size: int, max_rows: int, max_blocks_per_seq: int) -> None:
        import pagetable

        self.kv = pagetable.KVCacheManager(num_blocks, block_size)
        batch_table = getattr(pagetable, "BatchTable", None)
        self.bt = batch_table(self.kv, max_rows, max_blocks_per_seq) if batch_table else None
        self.batch_ids = np.empty(0, dtype=np.int64)     # row order without a BatchTable
        self._token_seq_ids = self._positions = None

    def admit(self, seq_ids: np.ndarray, num_tokens: np.ndarray) -> None:
        """Admission alone: one batched ``add_sequences``."""
        self.kv.add_sequences(seq_ids, num_tokens=num_tokens)

    def admit_one_by_one(self, seq_ids: list[int], num_tokens: list[int]) -> None:
        """Admission from a Python loop: one ``add_sequence`` per prompt."""
        add = self.kv.add_sequence
        for seq_id, count in zip(seq_ids, num_tokens):
            add(seq_id, count)

    def free(self, seq_ids: np.ndarray) -> None:
        self.kv.free_sequence(seq_ids)

    def step(self, decode_ids: np.ndarray, finished=None, new_ids=None, new_tokens=None) -> EngineStep:
        """One engine step: every id in ``decode_ids`` grows by a token; ``new_ids`` are admitted.

        ``decode_ids`` are the running sequences that were running before this step,
        less the ``finished`` ones (the scheduler's list, an int64 array).
        """
        kv, bt = self.kv, self.bt
        if finished is not None and len(finished):
            kv.free_sequence(finished)
            if bt is not None:
                bt.remove(finished)
                bt.condense()
        prefills = None
        if new_ids is not None and len(new_ids):
            prefills = kv.add_sequences(new_ids, num_tokens=new_tokens)
            if bt is not None:
                bt.add(new_ids)
        slots = kv.append_tokens(decode_ids, 1).slots
        if prefills is not None:
            slots = np.concatenate([prefills.slots, slots])     # every prompt's slots, one array
        if bt is not None:
            bt.update()
            rows = bt.num_rows
            return EngineStep(slots, bt.block_table[:rows], bt.num_blocks[:rows], bt.seq_ids[:rows],
                              None, None)
        batch_ids = decode_ids if prefills is None else np.concatenate([decode_ids, new_ids])
        table, num_blocks = kv.page_table.block_table(batch_ids)
        return EngineStep(slots, table, num_blocks, batch_ids, None, None)

    def describe(self, result: EngineStep, decode_ids, new_ids=None, new_tokens=None) -> EngineStep:
        """``result`` with each token's owner and position (for checks; not timed)."""
        parts_ids, parts_pos = [], []
        if new_ids is not None and len(new_ids):
            for seq_id, count in zip(np.asarray(new_ids).tolist(), np.asarray(new_tokens).tolist()):
                parts_ids.append(np.full(count, seq_id, dtype=np.int64))
                parts_pos.append(np.arange(count, dtype=np.int64))
        parts_ids.append(np.asarray(decode_ids, dtype=np.int64))
        parts_pos.append(self.kv.seq_lens(decode_ids).astype(np.int64) - 1)
        return EngineStep(result.slots, result.table, result.num_blocks,
                          np.asarray(result.row_seq_ids, dtype=np.int64).copy(),
                          np.concatenate(parts_ids), np.concatenate(parts_pos))


# =========================================================================== checks


def check_step(step: EngineStep, block_size: int, seq_lens: dict[int, int]) -> dict[int, int]:
    """Check one described step against itself; returns each row sequence's block count.

    Every token has its own slot; each slot is its sequence's block at
    ``position // block_size`` in the step's own table, plus the offset; each row holds
    exactly the blocks its sequence's ``seq_lens`` tokens need.  Raises AssertionError.
    """
    slots = np.asarray(step.slots)
    assert step.token_seq_ids is not None and step.positions is not None and step.row_seq_ids is not None, \
        "a step to check records whose tokens and rows it holds"
    assert len(slots) == len(step.token_seq_ids) == len(step.positions)
    assert len(np.unique(slots)) == len(slots), "two tokens share a slot"
    row_of = {int(seq_id): row for row, seq_id in enumerate(step.row_seq_ids.tolist())}
    rows = np.array([row_of[int(seq_id)] for seq_id in step.token_seq_ids.tolist()], dtype=np.int64)
    expected = (step.table[rows, step.positions // block_size].astype(np.int64) * block_size
                + step.positions % block_size)
    np.testing.assert_array_equal(slots, expected)
    counts = {}
    for row, seq_id in enumerate(step.row_seq_ids.tolist()):
        count = int(step.num_blocks[row])
        assert count == cdiv(seq_lens[seq_id], block_size), (seq_id, count, seq_lens[seq_id])
        blocks = step.table[row, :count]
        assert (blocks >= 0).all() and (blocks != PAD_SLOT_ID).all()
        counts[seq_id] = count
    return counts


# =========================================================================== the timed cases

#: The sides of every comparison: pagetable, then the engine models.
SIDES = ("pagetable", "vLLM", "LMDeploy")


def build(side: str, num_blocks: int, block_size: int, max_rows: int, max_blocks_per_seq: int,
          max_tokens: int):
    """An empty engine of ``side`` with room for ``num_blocks`` blocks of KV."""
    if side == "pagetable":
        return PagetableEngine(num_blocks, block_size, max_rows, max_blocks_per_seq)
    if side == "vLLM":   # block 0 is the null block: one more, so both hold num_blocks
        return VLLMEngine(num_blocks + 1, block_size, max_rows, max_blocks_per_seq, max_tokens)
    if side == "LMDeploy":
        return LMDeployEngine(num_blocks, block_size, max_blocks_per_seq)
    raise ValueError(f"unknown side {side!r}")


_EMPTY = np.empty(0, dtype=np.int64)


def prefill_step(side: str, engine, seq_ids: np.ndarray, num_tokens: np.ndarray) -> EngineStep:
    """A step that admits ``seq_ids`` with their prompts (rows assigned, slots mapped)."""
    if side == "pagetable":
        return engine.step(_EMPTY, None, seq_ids, num_tokens)
    return engine.step((), list(zip(seq_ids.tolist(), num_tokens.tolist())))


def decode_setup(side: str, batch) -> object:
    """An engine running ``batch`` (a ``workloads.DecodeBatch``), its prompts prefilled."""
    engine = build(side, batch.num_blocks, batch.block_size, len(batch.seq_ids),
                   batch.max_blocks_per_seq, int(batch.num_tokens.sum()))
    prefill_step(side, engine, batch.seq_ids, batch.num_tokens)
    return engine


def decode_run(side: str, engine, batch) -> EngineStep:
    """``batch.steps`` decode steps of every sequence; returns the last step."""
    if side == "pagetable":
        seq_ids = batch.seq_ids
        for _ in range(batch.steps):
            result = engine.step(seq_ids)
        return result
    for _ in range(batch.steps):
        result = engine.step()
    return result


def serving_setup(side: str, trace) -> object:
    """An engine running the trace's initial sequences."""
    engine = build(side, trace.num_blocks, trace.block_size, trace.max_rows,
                   trace.max_blocks_per_seq, max(trace.max_tokens_per_step, int(trace.initial_tokens.sum())))
    prefill_step(side, engine, trace.initial_ids, trace.initial_tokens)
    return engine


def serving_run(side: str, engine, trace, python_steps) -> EngineStep:
    """Every step of the trace (``python_steps``: ``workloads.serving_python_steps(trace)``)."""
    if side == "pagetable":
        for step in trace.steps:
            result = engine.step(step.decode_ids, step.finished, step.new_ids, step.new_tokens)
        return result
    for finished, new in python_steps:
        result = engine.step(finished, new)
    return result


def pool_for(num_tokens: np.ndarray, block_size: int) -> int:
    """Blocks that hold these prompts, and one spare."""
    return int((-(-num_tokens // block_size)).sum()) + 1


def admission_setup(side: str, num_tokens: np.ndarray, block_size: int = 16) -> object:
    width = -(-int(num_tokens.max()) // block_size)
    return build(side, pool_for(num_tokens, block_size), block_size, len(num_tokens), width,
                 int(num_tokens.sum()))


def admission_run(side: str, engine, seq_ids: np.ndarray, num_tokens: np.ndarray, lists=None) -> None:
    """Admit every prompt: one batched call for pagetable, one call per prompt for the models
    (``lists``: the ids and counts as Python lists, as an engine's scheduler holds them)."""
    if side == "pagetable":
        engine.admit(seq_ids, num_tokens)
    else:
        engine.admit(*(lists or (seq_ids.tolist(), num_tokens.tolist())))


def free_setup(side: str, seq_ids: np.ndarray, num_tokens: np.ndarray, block_size: int = 16) -> object:
    engine = admission_setup(side, num_tokens, block_size)
    admission_run(side, engine, seq_ids, num_tokens)
    return engine


def free_run(side: str, engine, seq_ids: np.ndarray, seq_list=None) -> None:
    engine.free(seq_ids if side == "pagetable" else (seq_list or seq_ids.tolist()))


@dataclass
class SlotMappingCase:
    """One batch of tokens over tables both pagetable and the vLLM model hold."""

    table: Any                     # pagetable.PageTable
    seq_ids: np.ndarray            # int64 [tokens]
    positions: np.ndarray          # int64 [tokens]
    row_hints: np.ndarray          # int32 [tokens]: each token's row in ``table``
    vllm_table: VLLMBlockTable
    req_indices: np.ndarray        # int64 [tokens]: each token's row in ``vllm_table``
    out: np.ndarray                # int64 [tokens]

    def pagetable(self, hints: bool = False) -> np.ndarray:
        return self.table.slot_mapping(self.seq_ids, self.positions, out=self.out,
                                       rows=self.row_hints if hints else None)

    def vllm(self) -> np.ndarray:
        return self.vllm_table.compute_slot_mapping(self.req_indices, self.positions, self.out)


def slot_mapping_case(seq_ids: np.ndarray, num_tokens: np.ndarray, decode: bool,
                      block_size: int = 16) -> SlotMappingCase:
    """Sequences prefilled in both pagetable and the vLLM model, then either every
    prompt token (``decode=False``, a prefill's slot mapping) or each sequence's last
    token (``decode=True``), grouped by sequence in row order."""
    width = -(-int(num_tokens.max()) // block_size)
    engines = {}
    for side in ("pagetable", "vLLM"):
        engines[side] = build(side, pool_for(num_tokens, block_size), block_size, len(seq_ids), width,
                              int(num_tokens.sum()))
        prefill_step(side, engines[side], seq_ids, num_tokens)
    rows = np.arange(len(seq_ids), dtype=np.int64)
    if decode:
        token_rows, positions = rows, num_tokens - 1
    else:
        token_rows = np.repeat(rows, num_tokens)
        starts = np.cumsum(num_tokens) - num_tokens
        positions = np.arange(int(num_tokens.sum()), dtype=np.int64) - np.repeat(starts, num_tokens)
    table = engines["pagetable"].kv.page_table
    token_ids = np.ascontiguousarray(seq_ids[token_rows])
    vllm_rows = np.array([engines["vLLM"].req_id_to_index[s] for s in seq_ids.tolist()], dtype=np.int64)
    return SlotMappingCase(table, token_ids, np.ascontiguousarray(positions, dtype=np.int64),
                           np.ascontiguousarray(table.rows(seq_ids)[token_rows]),
                           engines["vLLM"].block_table, np.ascontiguousarray(vllm_rows[token_rows]),
                           np.empty(len(token_ids), dtype=np.int64))
