"""asv suites: an engine step with pagetable against the engines' own host-side bookkeeping.

The models of vLLM v1 and LMDeploy are ``pagetable/cli/_engines.py`` (loaded from this
checkout by path, as the workloads are); every suite takes a ``side`` parameter,
``"pagetable"``, ``"vLLM"`` or ``"LMDeploy"``, so the graphs show the three together.
Each sample runs on state rebuilt by ``setup`` (``number = 1``).

- ``DecodeStep``: 16 decode steps of ``num_seqs`` sequences of 1..2,048 tokens (divide
  by 16 for one step): growth, slot mapping and the batch's block table.
- ``ServingLoop``: 500 steps keeping 256 sequences running, with admissions and frees.
- ``Admission`` / ``Free``: 256 ShareGPT-like prompts admitted, or freed.
- ``SlotMappingAlone``: the slot mapping of a prefill (every prompt token) or of a
  decode step over the same tables, against the vLLM model's numpy formula.
- ``VLLMOwnBlockTable``: vLLM's own ``BlockTable.compute_slot_mapping``, when vLLM is
  importable and its block table still maps slots in numpy (skipped otherwise).

``python benchmarks/bench_engine_step.py`` runs the suites once outside asv, the sides
alternating, and prints the ratios.
"""

import time

import numpy as np

try:
    from .workloads import engines, workloads
except ImportError:  # run as a script, or imported by path (tests/benchmarks)
    from workloads import engines, workloads  # type: ignore[no-redef]

SIDES = ["pagetable", "vLLM", "LMDeploy"]


def _usable():
    if engines is None or not hasattr(workloads, "decode_batch"):
        raise NotImplementedError("no engine models in this checkout")


class _Mutating:
    number = 1
    repeat = (5, 30, 20.0)
    warmup_time = 0.0


class DecodeStep(_Mutating):
    params = ([256, 1024], SIDES)
    param_names = ["num_seqs", "side"]

    def setup(self, num_seqs, side):
        _usable()
        self.batch = workloads.decode_batch(num_seqs)
        self.engine = engines.decode_setup(side, self.batch)

    def time_decode_steps(self, num_seqs, side):
        engines.decode_run(side, self.engine, self.batch)


class ServingLoop(_Mutating):
    repeat = (3, 10, 30.0)
    params = (SIDES,)
    param_names = ["side"]

    def setup(self, side):
        _usable()
        self.trace = workloads.serving_trace()
        self.python_steps = workloads.serving_python_steps(self.trace)
        self.engine = engines.serving_setup(side, self.trace)

    def time_serving_loop(self, side):
        engines.serving_run(side, self.engine, self.trace, self.python_steps)


class Admission(_Mutating):
    params = (SIDES,)
    param_names = ["side"]

    def setup(self, side):
        _usable()
        self.seq_ids, self.num_tokens = workloads.admission_prompts()
        self.lists = (self.seq_ids.tolist(), self.num_tokens.tolist())
        self.engine = engines.admission_setup(side, self.num_tokens)

    def time_admit(self, side):
        engines.admission_run(side, self.engine, self.seq_ids, self.num_tokens, self.lists)



class AdmissionOneByOne(Admission):
    """pagetable admitting from a Python loop, one add_sequence per prompt (the models
    admit one by one in Admission.time_admit already)."""
    params = (["pagetable"],)

    def time_admit(self, side):
        self.engine.admit_one_by_one(*self.lists)


class Free(_Mutating):
    params = (SIDES,)
    param_names = ["side"]

    def setup(self, side):
        _usable()
        self.seq_ids, num_tokens = workloads.admission_prompts()
        self.seq_list = self.seq_ids.tolist()
        self.engine = engines.free_setup(side, self.seq_ids, num_tokens)

    def time_free(self, side):
        engines.free_run(side, self.engine, self.seq_ids, self.seq_list)


class SlotMappingAlone:
    """Read-only: timed many times on one case per parameter set."""

    params = (["prefill", "decode"], ["pagetable", "pagetable+hints", "vLLM"])
    param_names = ["tokens", "side"]

    def setup(self, tokens, side):
        _usable()
        if tokens == "prefill":
            seq_ids, num_tokens = workloads.admission_prompts()
        else:
            batch = workloads.decode_batch(1024)
            seq_ids, num_tokens = batch.seq_ids, batch.num_tokens
        self.case = engines.slot_mapping_case(seq_ids, num_tokens, decode=tokens == "decode")

    def time_slot_mapping(self, tokens, side):
        if side == "vLLM":
            self.case.vllm()
        else:
            self.case.pagetable(hints=side == "pagetable+hints")


def vllm_block_table(case):
    """vLLM's own ``BlockTable`` holding the case's vLLM-model table, or NotImplementedError."""
    try:
        import inspect

        import torch
        from vllm.v1.worker.block_table import BlockTable
    except ImportError:
        raise NotImplementedError("vLLM is not installed") from None
    if "req_indices" not in inspect.signature(BlockTable.compute_slot_mapping).parameters:
        raise NotImplementedError("this vLLM maps slots on the device")
    model = case.vllm_table
    rows, width = model.block_table.shape
    wanted = {"block_size": model.block_size, "max_num_reqs": rows, "max_num_blocks_per_req": width,
              "max_num_batched_tokens": len(case.positions), "pin_memory": False,
              "device": torch.device("cpu"), "kernel_block_size": model.block_size}
    accepted = inspect.signature(BlockTable).parameters
    table = BlockTable(**{name: value for name, value in wanted.items() if name in accepted})
    for row in range(rows):
        table.add_row(model.block_table[row, :model.num_blocks_per_row[row]].tolist(), row)
    return table


class VLLMOwnBlockTable:
    params = (["prefill", "decode"],)
    param_names = ["tokens"]

    def setup(self, tokens):
        SlotMappingAlone.setup(self, tokens, "vLLM")
        self.table = vllm_block_table(self.case)

    def time_compute_slot_mapping(self, tokens):
        self.table.compute_slot_mapping(self.case.req_indices, self.case.positions)


def _sample(suite, method, params):
    bench = suite()
    bench.setup(*params)
    run = getattr(bench, method)
    start = time.perf_counter()
    run(*params)
    return time.perf_counter() - start


def main(rounds=7):
    """Every mutating suite outside asv: best of ``rounds``, the sides alternating."""
    _usable()
    cases = [(DecodeStep, "time_decode_steps", (n,), 16, f"decode step, {n} sequences")
             for n in DecodeStep.params[0]]
    cases += [(ServingLoop, "time_serving_loop", (), workloads.SERVING_STEPS, "serving step"),
              (Admission, "time_admit", (), 1, "admit 256 prompts"),
              (Free, "time_free", (), 1, "free 256 sequences")]
    for suite, method, params, per, name in cases:
        best = {side: float("inf") for side in SIDES}
        for _ in range(rounds):
            for side in SIDES:
                best[side] = min(best[side], _sample(suite, method, params + (side,)) / per)
        ours = best["pagetable"]
        print(f"{name:28s} pagetable {ours * 1e6:9.1f} us   " + "   ".join(
            f"{side} {best[side] * 1e6:9.1f} us ({best[side] / ours:6.1f}x)" for side in SIDES[1:]),
            flush=True)


if __name__ == "__main__":
    main()
