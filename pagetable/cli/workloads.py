"""Every workload the benchmark harnesses and the simulation run on, seeded, in one place.

``pagetable bench``, the asv suites (``benchmarks/``), the pytest-benchmark tests
(``tests/benchmarks/``), the memory test and ``pagetable simulate`` all draw their
inputs here, so the same name always means the same numbers.  The module depends on
numpy only: asv loads this folder by path from the checkout (see
``benchmarks/workloads.py``) while it times an older commit whose package predates it.

Table workloads
---------------
``TableWorkload.slot_mapping_table``
    The speed goals' table: 1,024 sequences of 1..511 blocks.
``TableWorkload.block_table_batch``
    256 sequences of up to 2,048 blocks, for ``block_table`` / ``to_csr``.
``lognormal_lengths``
    The memory workload: 10,000 sequences, lognormal with median 32 blocks, capped at
    4,096; ``grow_inputs`` and ``bulk_inputs`` lay it out for building a table one
    block per sequence per step (decode) or from one grouped batch (prefill).

Serving workload
----------------
``serving_requests``
    Poisson arrivals per engine step; prompt and output lengths lognormal, clipped, with
    means matching the datasets in the vLLM paper (Kwon et al., SOSP 2023, Fig. 11):
    ShareGPT about 161 prompt / 338 output tokens, Alpaca about 19 / 58.
``shared_prefix_requests``
    Conversations for prefix caching: a few long system prompts that every conversation
    starts from, and turns that resend the whole history (previous prompt, previous
    answer, new user message), with token ids.
``shared_prefix_prompts``
    Prompts alone: one of a few long prefixes plus a suffix of their own, for timing
    prefix-cached admission (``tools/bench_vllm_admission.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_SLOT_ID = -1  # pagetable.PAD_SLOT_ID; this module is loaded by path and imports only numpy

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
    _block_owner: np.ndarray | None = field(default=None, repr=False)

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
        from ._baselines import DictOfListsPageTable

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


def grow_inputs(lengths, seq_ids):
    """Sequence ids longest first (so each step's ids are a prefix) and every block id."""
    order = np.argsort(-lengths, kind="stable")
    blocks = np.random.default_rng(7).permutation(int(lengths.sum())).astype(np.int32)
    return seq_ids[order], lengths[order], blocks


def bulk_inputs(lengths, seq_ids):
    """One grouped batch holding every block: (owners, block ids, seq ids, lengths)."""
    blocks = np.random.default_rng(7).permutation(int(lengths.sum())).astype(np.int32)
    return np.repeat(seq_ids, lengths), blocks, seq_ids, lengths


# --------------------------------------------------------------------------- serving

# (mean, sigma, low, high) of the lognormal length distributions, clipped to [low, high].
SERVING = {
    "sharegpt": {"prompt": (161.0, 1.0, 4, 1024), "output": (338.0, 0.9, 4, 1024)},
    "alpaca": {"prompt": (19.0, 0.6, 2, 256), "output": (58.0, 0.8, 2, 512)},
}


def _lognormal_mu(mean: float, sigma: float, low: int, high: int) -> float:
    """The ``mu`` whose clipped, rounded lognormal has the given mean (bisection)."""
    z = np.random.default_rng(12345).standard_normal(200_000)
    lo, hi = math.log(max(low, 1)) - 3 * sigma, math.log(high) + 3 * sigma
    for _ in range(60):
        mu = (lo + hi) / 2
        value = np.clip(np.rint(np.exp(mu + sigma * z)), low, high).mean()
        lo, hi = (mu, hi) if value < mean else (lo, mu)
    return (lo + hi) / 2


def _serving_lengths(rng: np.random.Generator, spec: tuple[float, float, int, int], size: int) -> np.ndarray:
    mean, sigma, low, high = spec
    mu = _lognormal_mu(mean, sigma, low, high)
    return np.clip(np.rint(rng.lognormal(mu, sigma, size)), low, high).astype(np.int64)


def serving_requests(workload: str, steps: int, rate: float, samples: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every request arriving within ``steps`` engine steps: (arrival step, prompt tokens,
    output tokens per sample), int64 arrays of shapes ``[R]``, ``[R]``, ``[R, samples]``."""
    rng = np.random.default_rng(seed)
    arrivals = rng.poisson(rate, size=steps)
    total = int(arrivals.sum())
    spec: dict[str, Any] = SERVING[workload]
    prompts = _serving_lengths(rng, spec["prompt"], total)
    outputs = _serving_lengths(rng, spec["output"], total * samples).reshape(total, samples)
    return np.repeat(np.arange(steps, dtype=np.int64), arrivals), prompts, outputs


def serving_shortest_request(workload: str) -> int:
    """The fewest prompt tokens a request of ``workload`` can have."""
    return int(SERVING[workload]["prompt"][2])


# --------------------------------------------------------------------------- shared prefixes

#: Token ids are drawn from ``0..VOCAB_SIZE-1`` (Llama 2's vocabulary size).
VOCAB_SIZE = 32_000
#: A conversation ends before a turn whose prompt and answer would not fit this context.
SHARED_PREFIX_CONTEXT = 8192
#: The most turns one conversation has.
SHARED_PREFIX_MAX_TURNS = 16
#: (mean, sigma, low, high) of the clipped lognormal lengths of a user message and an
#: answer: chat turns, shorter than ShareGPT's whole first prompts.
SHARED_PREFIX_USER = (64.0, 0.8, 4, 512)
SHARED_PREFIX_ANSWER = (128.0, 0.8, 4, 1024)
#: Mean engine steps between an answer's last token and the user's next turn.
SHARED_PREFIX_THINK_STEPS = 50


@dataclass
class ChatTurn:
    """One request of a conversation: its prompt, each sample's answer, and what follows.

    The first turn of a conversation arrives at ``arrival``; a later turn is sent
    ``think`` steps after the turn before it has finished (its ``arrival`` is -1 until
    then).  ``next`` is the index of the conversation's next turn, -1 for its last.
    A conversation's prompts and sample 0's answers are views of one array.
    """

    conversation: int
    turn: int
    arrival: int
    think: int
    prompt: np.ndarray             # int64 [P] token ids
    outputs: list[np.ndarray]      # per sample, int64 token ids
    next: int = -1


def shared_prefix_requests(steps: int, rate: float, samples: int, seed: int, system_prompts: int = 4,
                           system_prompt_tokens: int = 1024, turns: float = 4) -> list[ChatTurn]:
    """Every turn of the conversations that start within ``steps`` engine steps.

    Each conversation starts from one of ``system_prompts`` prompts of
    ``system_prompt_tokens`` tokens (uniformly), has a geometric number of turns of mean
    ``turns`` (at most ``SHARED_PREFIX_MAX_TURNS``, and stopping before a turn whose
    prompt and answer would overflow ``SHARED_PREFIX_CONTEXT``), and starts at Poisson
    times of rate ``rate / turns`` per step, so that, once its later turns have come,
    about ``rate`` requests arrive per step in the long run.  Turn ``k``'s prompt is turn ``k-1``'s prompt,
    sample 0's answer to it and a new user message.  The list holds each conversation's
    turns in order, conversations by start step.
    """
    rng = np.random.default_rng([seed, 7])
    system = rng.integers(0, VOCAB_SIZE, size=(system_prompts, system_prompt_tokens), dtype=np.int64)
    starts = rng.poisson(rate / turns, size=steps)
    user_mu = _lognormal_mu(*SHARED_PREFIX_USER)
    answer_mu = _lognormal_mu(*SHARED_PREFIX_ANSWER)

    def length(mu: float, spec: tuple[float, float, int, int]) -> int:
        return int(np.clip(np.rint(rng.lognormal(mu, spec[1])), spec[2], spec[3]))

    def token_ids(count: int) -> np.ndarray:
        return rng.integers(0, VOCAB_SIZE, size=count, dtype=np.int64)

    requests: list[ChatTurn] = []
    for conversation, step in enumerate(np.repeat(np.arange(steps, dtype=np.int64), starts).tolist()):
        num_turns = min(int(rng.geometric(1.0 / turns)), SHARED_PREFIX_MAX_TURNS)
        pieces = [system[int(rng.integers(system_prompts))]]
        held = system_prompt_tokens
        spans: list[tuple[int, int, list[np.ndarray], int]] = []   # prompt end, answer end, others, think
        for turn in range(num_turns):
            user = length(user_mu, SHARED_PREFIX_USER)
            answers = [length(answer_mu, SHARED_PREFIX_ANSWER) for _ in range(samples)]
            if held + user + max(answers) > SHARED_PREFIX_CONTEXT:
                break
            pieces += [token_ids(user), token_ids(answers[0])]
            others = [token_ids(n) for n in answers[1:]]
            think = int(rng.geometric(1.0 / SHARED_PREFIX_THINK_STEPS)) if turn else 0
            spans.append((held + user, held + user + answers[0], others, think))
            held += user + answers[0]
        tokens = np.concatenate(pieces)
        first = len(requests)
        for turn, (prompt_end, answer_end, others, think) in enumerate(spans):
            requests.append(ChatTurn(conversation, turn, step if turn == 0 else -1, think, tokens[:prompt_end],
                                     [tokens[prompt_end:answer_end], *others],
                                     first + turn + 1 if turn + 1 < len(spans) else -1))
    return requests


def shared_prefix_tokens(steps: int, rate: float, samples: int, system_prompt_tokens: int,
                         turns: float) -> float:
    """About how many token ids ``shared_prefix_requests`` holds, from the means alone."""
    user, answer = SHARED_PREFIX_USER[0], SHARED_PREFIX_ANSWER[0]
    per_conversation = min(system_prompt_tokens + turns * (user + answer), SHARED_PREFIX_CONTEXT)
    return steps * rate / turns * (per_conversation + turns * (samples - 1) * answer)


def shared_prefix_shortest_request(system_prompt_tokens: int) -> int:
    """The fewest prompt tokens a shared-prefix request can have."""
    return system_prompt_tokens + SHARED_PREFIX_USER[2]


def shared_prefix_prompts(count: int = 256, prefixes: int = 8, prefix_tokens: int = 2048,
                          suffix_tokens: int = 128, seed: int = 0) -> list[list[int]]:
    """``count`` prompts, each one of ``prefixes`` shared prefixes (in turn) followed by
    ``suffix_tokens`` token ids of its own, as lists of Python ints."""
    rng = np.random.default_rng([seed, 8])
    shared = rng.integers(0, VOCAB_SIZE, size=(prefixes, prefix_tokens), dtype=np.int64)
    own = rng.integers(0, VOCAB_SIZE, size=(count, suffix_tokens), dtype=np.int64)
    return [shared[i % prefixes].tolist() + own[i].tolist() for i in range(count)]


def random_token_ids(seed: int, lengths: np.ndarray) -> list[np.ndarray]:
    """Independent random token ids (int64), one array per length: prompts that share
    nothing, for running a workload without token ids of its own with caching on."""
    rng = np.random.default_rng([seed, 9])
    return [rng.integers(0, VOCAB_SIZE, size=int(n), dtype=np.int64) for n in lengths]


# --------------------------------------------------------------------------- engine steps

#: Block size of the engine-step workloads (vLLM's default).
STEP_BLOCK_SIZE = 16
#: Decode steps in one timed sample: over 16 steps every sequence crosses exactly one
#: block boundary, so a sample holds the steps that allocate and those that do not.
DECODE_STEPS = 16
#: Prompt lengths of the decode-step batches: uniform in 1..2,048 tokens.
DECODE_MAX_PROMPT = 2048
#: The serving loop: steps, and sequences kept running.
SERVING_STEPS = 500
SERVING_RUNNING = 256
#: Prompts admitted at once in the admission workload.
ADMISSION_PROMPTS = 256


def step_sequence_ids(count: int, first: int = 0) -> np.ndarray:
    """Distinct scattered int64 ids for the engine-step workloads (the k-th is the same
    in every workload that asks for it)."""
    return (np.arange(first, first + count, dtype=np.int64) * 7919 + 1_000_003)


@dataclass
class DecodeBatch:
    """``B`` running sequences about to decode: ids, tokens held, and what the engines need."""

    seq_ids: np.ndarray            # int64 [B]
    num_tokens: np.ndarray         # int64 [B], 1..DECODE_MAX_PROMPT
    steps: int                     # decode steps the pool and rows are sized for
    block_size: int = STEP_BLOCK_SIZE

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-(int(self.num_tokens.max()) + self.steps) // self.block_size)

    @property
    def num_blocks(self) -> int:
        """Blocks for every sequence after ``steps`` steps, and one spare per sequence."""
        return int((-(-(self.num_tokens + self.steps) // self.block_size)).sum()) + len(self.seq_ids)


def decode_batch(num_seqs: int, steps: int = DECODE_STEPS, seed: int = 0) -> DecodeBatch:
    """``num_seqs`` sequences holding 1..2,048 tokens (uniform, seeded)."""
    rng = np.random.default_rng([seed, 10])
    lengths = rng.integers(1, DECODE_MAX_PROMPT + 1, size=num_seqs, dtype=np.int64)
    return DecodeBatch(step_sequence_ids(num_seqs), lengths, steps)


def admission_prompts(count: int = ADMISSION_PROMPTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` prompts of ShareGPT-like lengths (int64 ids, int64 token counts)."""
    rng = np.random.default_rng([seed, 11])
    return step_sequence_ids(count), _serving_lengths(rng, SERVING["sharegpt"]["prompt"], count)


@dataclass
class ServingStep:
    """One step of the serving loop, as the scheduler decided it (int64 arrays)."""

    finished: np.ndarray           # freed before the step
    new_ids: np.ndarray            # admitted this step (their prompts are its prefill)
    new_tokens: np.ndarray         # their prompt lengths
    decode_ids: np.ndarray         # running before the step and not finished: +1 token each


@dataclass
class ServingTrace:
    """The serving loop: sequences running when it starts, then every step's changes."""

    initial_ids: np.ndarray        # int64: running at the start ...
    initial_tokens: np.ndarray     # ... holding these many tokens
    steps: list[ServingStep]
    num_blocks: int                # pool that holds the peak, with a spare block per sequence
    max_blocks_per_seq: int
    max_tokens_per_step: int
    max_rows: int
    block_size: int = STEP_BLOCK_SIZE


def serving_trace(steps: int = SERVING_STEPS, running: int = SERVING_RUNNING, seed: int = 0,
                  block_size: int = STEP_BLOCK_SIZE) -> ServingTrace:
    """``steps`` engine steps keeping ``running`` sequences running (ShareGPT lengths).

    Each sequence decodes a sampled number of tokens after its prompt, then finishes
    and is freed; a new one is admitted in its place in the same step.  The sequences
    running at the start are part-way through their outputs (uniformly), so that
    sequences finish from the first step on.
    """
    rng = np.random.default_rng([seed, 12])
    spec = SERVING["sharegpt"]
    pool_prompts = _serving_lengths(rng, spec["prompt"], running + steps * running)
    pool_outputs = _serving_lengths(rng, spec["output"], running + steps * running)
    next_request = 0
    remaining: dict[int, int] = {}          # id -> decode steps still to run
    length: dict[int, int] = {}             # id -> tokens held
    ids = step_sequence_ids(len(pool_prompts))

    initial_ids, initial_tokens = [], []
    for _ in range(running):
        seq_id = int(ids[next_request])
        output = int(pool_outputs[next_request])
        done = int(rng.integers(0, output))
        length[seq_id] = int(pool_prompts[next_request]) + done
        remaining[seq_id] = output - done
        initial_ids.append(seq_id)
        initial_tokens.append(length[seq_id])
        next_request += 1

    def blocks(count: int) -> int:
        return -(-count // block_size)

    peak_blocks = sum(blocks(n + 1) for n in length.values())
    widest = max(blocks(n + r) for n, r in zip(length.values(), remaining.values()))
    most_tokens = 0
    plan = []
    for _ in range(steps):
        finished = [seq_id for seq_id, left in remaining.items() if left == 0]
        for seq_id in finished:
            del remaining[seq_id], length[seq_id]
        decode = list(remaining)
        new_ids, new_tokens = [], []
        while len(remaining) < running:
            seq_id = int(ids[next_request])
            prompt, output = int(pool_prompts[next_request]), int(pool_outputs[next_request])
            next_request += 1
            new_ids.append(seq_id)
            new_tokens.append(prompt)
            length[seq_id] = prompt
            remaining[seq_id] = output
            widest = max(widest, blocks(prompt + output))
        for seq_id in decode:
            length[seq_id] += 1
            remaining[seq_id] -= 1
        peak_blocks = max(peak_blocks, sum(blocks(n) for n in length.values()))
        most_tokens = max(most_tokens, len(decode) + sum(new_tokens))
        plan.append(ServingStep(np.array(finished, dtype=np.int64), np.array(new_ids, dtype=np.int64),
                                np.array(new_tokens, dtype=np.int64), np.array(decode, dtype=np.int64)))
    return ServingTrace(np.array(initial_ids, dtype=np.int64), np.array(initial_tokens, dtype=np.int64),
                        plan, peak_blocks + 2 * running, widest, most_tokens, running, block_size)


def serving_python_steps(trace: ServingTrace) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The trace's steps as the engines' schedulers hold them: Python lists of
    (finished ids, [(new id, prompt tokens), ...])."""
    return [(step.finished.tolist(), list(zip(step.new_ids.tolist(), step.new_tokens.tolist())))
            for step in trace.steps]
