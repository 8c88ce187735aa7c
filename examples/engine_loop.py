"""An inference engine's step loop around ``pagetable.KVCacheManager``, with real K/V.

Every step, as a continuous-batching engine does it:

1. decode: each running sequence grows by one token (``append_tokens``); the manager
   answers with every new token's cache slot and the copy-on-write block copies to
   perform first.  When the pool cannot cover the step, the newest request is
   preempted: its sequences are freed and it goes back to the queue to start again;
2. admission: waiting requests become sequences (``add_sequence`` writes the prompt);
   a request for two samples forks its prompt into a second sequence (``fork``), which
   shares the prompt's blocks until one of the two writes into a shared block;
3. the engine copies the blocks the manager asked for, then writes the new tokens'
   keys and values into the cache tensors at the returned slots;
4. attention reads them back through the batch's dense block table and through the
   FlashInfer-style CSR page list (``kv_indptr`` / ``kv_indices`` /
   ``kv_last_page_len``);
5. finished sequences are freed and their blocks go back to the pool.

The cache tensors are ``[num_blocks * block_size, num_heads, head_dim]``: a slot is one
row.  The same memory viewed as ``[num_blocks, block_size, num_heads, head_dim]`` is the
paged layout an attention kernel reads, block by block.

Alongside, the engine keeps each sequence's keys and values in a plain dense array
and checks, every step, that attention over the pages equals attention over the dense
copy: a wrong slot, a missed copy-on-write or a block freed too early would show.

Run it with ``python examples/engine_loop.py`` (numpy), or ``--torch`` to keep the
cache in PyTorch tensors (``--device cuda`` to put them on a GPU).
"""

from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass

import numpy as np

from pagetable import PAD_SLOT_ID, KVCacheManager


class NumpyBackend:
    """Cache tensors as numpy arrays."""

    name = "numpy"

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def index(self, ids):
        """pagetable's int32 / int64 arrays as an index into a cache tensor."""
        return np.asarray(ids, dtype=np.int64)

    def array(self, values):
        return np.asarray(values, dtype=np.float32)

    def to_numpy(self, tensor):
        return tensor


class TorchBackend:
    """Cache tensors as PyTorch tensors, on the CPU or a GPU."""

    name = "torch"

    def __init__(self, device="cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def index(self, ids):
        # A copy: some of pagetable's outputs are read-only arrays, which torch will
        # not share.  An engine would keep pinned buffers and copy into them instead.
        return self.torch.as_tensor(np.array(ids, dtype=np.int64), device=self.device)

    def array(self, values):
        return self.torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)

    def to_numpy(self, tensor):
        return tensor.cpu().numpy()


class PagedKVCache:
    """Keys and values of every cached token, one row per slot."""

    def __init__(self, backend, num_blocks, block_size, num_heads, head_dim):
        self.backend = backend
        self.block_size = block_size
        shape = (num_blocks * block_size, num_heads, head_dim)
        self.keys = backend.zeros(shape)
        self.values = backend.zeros(shape)
        self.paged_shape = (num_blocks, block_size, num_heads, head_dim)

    def copy_blocks(self, copy_src, copy_dst):
        """Copy whole blocks, ``copy_src[i]`` to ``copy_dst[i]`` (copy-on-write)."""
        if len(copy_src) == 0:
            return
        src, dst = self.backend.index(copy_src), self.backend.index(copy_dst)
        for cache in (self.keys, self.values):
            paged = cache.reshape(self.paged_shape)    # a view: same memory
            paged[dst] = paged[src]

    def write(self, slots, keys, values):
        """Store the new tokens' keys and values at their slots."""
        index = self.backend.index(slots)
        self.keys[index] = self.backend.array(keys)
        self.values[index] = self.backend.array(values)

    def gather_pages(self, pages, length):
        """The keys and values of one sequence, read block by block through its pages."""
        index = self.backend.index(pages)
        shape = (-1,) + self.paged_shape[2:]
        keys = self.keys.reshape(self.paged_shape)[index].reshape(shape)[:length]
        values = self.values.reshape(self.paged_shape)[index].reshape(shape)[:length]
        return self.backend.to_numpy(keys), self.backend.to_numpy(values)


def attention(query, keys, values):
    """Softmax attention of one query token over a sequence: [H, D] x [L, H, D] -> [H, D]."""
    scores = np.einsum("hd,lhd->hl", query, keys) / np.sqrt(query.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hl,lhd->hd", weights, values)


def attention_block_table(cache, queries, block_table, seq_lens):
    """Attention of each sequence in a batch, reading the cache through its block table."""
    outputs = []
    for b, length in enumerate(seq_lens.tolist()):
        num_pages = -(-length // cache.block_size)
        pages = block_table[b, :num_pages]
        assert (pages != PAD_SLOT_ID).all() and (block_table[b, num_pages:] == PAD_SLOT_ID).all()
        outputs.append(attention(queries[b], *cache.gather_pages(pages, length)))
    return np.stack(outputs)


def attention_csr(cache, queries, kv_indptr, kv_indices, kv_last_page_len):
    """The same, reading the cache through FlashInfer's CSR page list."""
    outputs = []
    for b in range(len(kv_indptr) - 1):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        length = (len(pages) - 1) * cache.block_size + int(kv_last_page_len[b])
        outputs.append(attention(queries[b], *cache.gather_pages(pages, length)))
    return np.stack(outputs)


@dataclass
class Request:
    request_id: int
    prompt_len: int
    max_new_tokens: int
    num_samples: int            # 1, or 2 for parallel sampling (a fork)


class Engine:
    """A scheduler, a KVCacheManager and the cache tensors it manages."""

    def __init__(self, requests, num_blocks=48, block_size=4, num_heads=2, head_dim=8,
                 max_batch=16, backend=None, seed=0):
        self.kv = KVCacheManager(num_blocks=num_blocks, block_size=block_size)
        self.cache = PagedKVCache(backend or NumpyBackend(), num_blocks, block_size,
                                  num_heads, head_dim)
        self.rng = np.random.default_rng(seed)
        self.token_shape = (num_heads, head_dim)
        self.max_batch = max_batch
        self.waiting = deque(requests)
        self.running = []            # sequence ids, in admission order
        self.request_of = {}         # sequence id -> Request
        self.dense = {}              # sequence id -> (keys [L, H, D], values [L, H, D])
        self.next_seq_id = 0
        self.stats = {"steps": 0, "admitted": 0, "finished": 0, "preempted": 0,
                      "block_copies": 0, "tokens_written": 0, "checked_sequences": 0}

    # -- the K/V data path -------------------------------------------------------

    def _write_tokens(self, seq_ids, counts, result):
        """Copy the blocks the manager asked for, then write the new tokens' K/V."""
        self.cache.copy_blocks(result.copy_src, result.copy_dst)
        self.stats["block_copies"] += len(result.copy_src)
        total = int(sum(counts))
        keys = self.rng.standard_normal((total,) + self.token_shape).astype(np.float32)
        values = self.rng.standard_normal((total,) + self.token_shape).astype(np.float32)
        self.cache.write(result.slots, keys, values)    # slots: sequence by sequence
        self.stats["tokens_written"] += total
        start = 0
        for seq_id, count in zip(seq_ids, counts):
            old_keys, old_values = self.dense[seq_id]
            self.dense[seq_id] = (np.concatenate([old_keys, keys[start:start + count]]),
                                  np.concatenate([old_values, values[start:start + count]]))
            start += count

    # -- scheduling --------------------------------------------------------------

    def _preempt_newest(self):
        request = self.request_of[self.running[-1]]
        mine = [s for s in self.running if self.request_of[s] is request]
        self.kv.free_sequence(mine)
        for seq_id in mine:
            self.running.remove(seq_id)
            del self.request_of[seq_id], self.dense[seq_id]
        self.waiting.appendleft(request)      # starts again from its prompt
        self.stats["preempted"] += 1

    def _decode(self):
        while self.running and not self.kv.can_append(self.running, 1):
            self._preempt_newest()
        if self.running:
            decoding = list(self.running)
            result = self.kv.append_tokens(decoding, 1)
            self._write_tokens(decoding, [1] * len(decoding), result)

    def _admit(self):
        block_size = self.kv.block_size
        while self.waiting and len(self.running) + self.waiting[0].num_samples <= self.max_batch:
            request = self.waiting[0]
            # The prompt's blocks, one more per sample for its next token (a fork copies
            # a shared partial block), and a block's headroom for the running batch.
            needed = -(-request.prompt_len // block_size) + request.num_samples + 1
            if self.kv.num_free_blocks < needed:
                break
            self.waiting.popleft()
            seq_id = self._new_sequence(request)
            result = self.kv.add_sequence(seq_id, request.prompt_len)
            self._write_tokens([seq_id], [request.prompt_len], result)
            for _ in range(request.num_samples - 1):
                child = self._new_sequence(request)
                self.kv.fork(seq_id, child)       # shares every block of the prompt
                self.dense[child] = self.dense[seq_id]
            self.stats["admitted"] += 1

    def _new_sequence(self, request):
        seq_id = self.next_seq_id
        self.next_seq_id += 1
        self.request_of[seq_id] = request
        self.dense[seq_id] = (np.empty((0,) + self.token_shape, np.float32),
                              np.empty((0,) + self.token_shape, np.float32))
        self.running.append(seq_id)
        return seq_id

    def _free_finished(self):
        done = [s for s in self.running if len(self.dense[s][0])
                >= self.request_of[s].prompt_len + self.request_of[s].max_new_tokens]
        if done:
            self.kv.free_sequence(done)            # blocks shared with a sibling stay
            for seq_id in done:
                self.running.remove(seq_id)
                del self.request_of[seq_id], self.dense[seq_id]
            self.stats["finished"] += len(done)

    # -- one step ----------------------------------------------------------------

    def attend(self):
        """The batch's attention through both page layouts, checked against dense K/V."""
        batch = np.array(self.running, dtype=np.int64)
        if len(batch) == 0:
            return None
        queries = self.rng.standard_normal((len(batch),) + self.token_shape)
        block_table = self.kv.block_table(batch)
        seq_lens = self.kv.seq_lens(batch)
        kv_indptr, kv_indices, kv_last_page_len = self.kv.flashinfer_layout(batch)
        # The same CSR pages straight from the page table (what a FlashInfer plan takes).
        indptr, indices = self.kv.page_table.to_csr(batch)
        assert np.array_equal(indptr, kv_indptr) and np.array_equal(indices, kv_indices)

        through_table = attention_block_table(self.cache, queries, block_table, seq_lens)
        through_csr = attention_csr(self.cache, queries, kv_indptr, kv_indices, kv_last_page_len)
        dense = np.stack([attention(q, *self.dense[s]) for q, s in zip(queries, batch.tolist())])
        np.testing.assert_allclose(through_table, dense, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(through_csr, dense, rtol=1e-5, atol=1e-6)
        self.stats["checked_sequences"] += len(batch)
        return through_table

    def step(self):
        self._decode()
        self._admit()
        output = self.attend()
        self._free_finished()
        self.kv.check()
        self.stats["steps"] += 1
        return output

    def run(self, max_steps=10_000):
        while (self.waiting or self.running) and self.stats["steps"] < max_steps:
            self.step()
        return self.stats


def make_requests(count=60, block_size=4, seed=0):
    rng = np.random.default_rng(seed)
    return [Request(request_id=i,
                    prompt_len=int(rng.integers(1, 4 * block_size)),
                    max_new_tokens=int(rng.integers(1, 5 * block_size)),
                    num_samples=int(rng.choice([1, 2])))
            for i in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="keep the cache in PyTorch tensors")
    parser.add_argument("--device", default="cpu", help="the tensors' device with --torch")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    backend = TorchBackend(args.device) if args.torch else NumpyBackend()
    engine = Engine(make_requests(args.requests, seed=args.seed), backend=backend, seed=args.seed)
    stats = engine.run()
    print(f"{backend.name}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "every block back in the pool"


if __name__ == "__main__":
    main()
