"""Prefix-cached admission, vLLM's KV-cache manager against pagetable's, on the same prompts.

An engine admits a waiting request in two calls to vLLM's ``KVCacheManager``:
``get_computed_blocks(request)`` finds the longest cached prefix and
``allocate_slots(request, ...)`` takes its hit blocks and fresh blocks for the rest; the
request's block hashes were computed when the ``Request`` was made
(``Request.update_block_hashes``, through ``get_request_block_hasher``).  pagetable does
the same in one ``add_sequence(seq_id, token_ids=...)``, hashing included.  This script
times both on one workload (``pagetable.cli.workloads.shared_prefix_prompts``: requests
that share a few long prefixes, so most blocks hit), same block size, same pool, same
hash algorithm and seed, in one process, alternating which side goes first, over
several rounds, and prints the time per request and the ratio:

* with hashing on both sides: vLLM's hashing plus its two calls, against
  ``add_sequence``;
* without hashing on both sides: vLLM's two calls alone, against ``add_sequence``
  less the same prompt's hashing by the same manager code timed alone just before
  (``count_cached_tokens`` on a manager whose cache is empty), a difference of two
  timings, so only its median is given.

pagetable is timed twice, given the prompt as the list vLLM gets and as an int64 array.
Before any timing every prompt's block hashes from vLLM's hasher are checked equal to
``pagetable.prefix.hash_prompt``'s; while timing, both sides' hits are checked equal
request by request.

vLLM is not installed: its pure-Python KV-cache manager is loaded from an unpacked vLLM
wheel (``--vllm DIR``: a folder holding ``vllm/`` unpacked and/or the ``vllm-*.whl``;
files missing from the folder are read from the wheel), and the modules it imports for
configuration, torch, platforms, logging, events and metrics are replaced at run time by
the small stand-ins below, which hold just what the admission path reads; a few plain
definitions (``ConstantList``, the stats classes) are run from the wheel's own text.
Nothing of vLLM is copied into this repository.

    PYTHONPATH=. python tools/bench_vllm_admission.py             # from the checkout's root
    PYTHONPATH=. python tools/bench_vllm_admission.py --warm --json out.json
    PYTHONPATH=. python tools/bench_vllm_admission.py --vllm-only  # vLLM's half alone

Timing notes: the garbage collector is off inside the timed loops and runs between
them; every request is timed on its own with ``perf_counter_ns``; on a shared machine
a few requests in a hundred take milliseconds longer on either side, so the medians are
the figures to read.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import gc
import glob
import importlib.abc
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import types
import zipfile
from typing import Any

import numpy as np

# The vLLM modules the admission path runs, loaded as they are from the wheel.
VLLM_MODULES = (
    "vllm.v1.core.kv_cache_manager",
    "vllm.v1.core.kv_cache_coordinator",
    "vllm.v1.core.single_type_kv_cache_manager",
    "vllm.v1.core.block_pool",
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.core.kv_cache_metrics",
    "vllm.v1.request",
    "vllm.v1.kv_cache_interface",
    "vllm.v1.kv_cache_spec_registry",
    "vllm.v1.kv_cache_layout",
    "vllm.v1.hisparse.block_pool",
    "vllm.v1.metrics.cache_hit_source",
    "vllm.utils.hashing",
    "vllm.utils.math_utils",
)
# Definitions taken verbatim from wheel modules that cannot be imported whole here (they
# import torch, zmq or the engine): module -> names.
VLLM_DEFINITIONS = {
    "vllm.v1.utils": ("T", "ConstantList"),
    "vllm.v1.metrics.stats": ("BaseCacheStats", "PrefixCacheStats", "KVCacheEvictionEvent",
                              "PrefillStats", "RequestSpecDecodeMetrics"),
}


# --------------------------------------------------------------------------- loading vLLM


class _WheelSource:
    """Reads ``vllm/...`` files from an unpacked folder, else from the wheel beside it."""

    def __init__(self, where: str) -> None:
        self.folder = where if os.path.isdir(where) else os.path.dirname(where)
        wheels = [where] if where.endswith(".whl") else sorted(glob.glob(os.path.join(where, "vllm-*.whl")))
        self.wheel = zipfile.ZipFile(wheels[-1]) if wheels else None
        if not os.path.isdir(os.path.join(self.folder, "vllm")) and self.wheel is None:
            raise SystemExit(f"bench_vllm_admission: error: no vllm/ folder and no vllm-*.whl in {where}")

    def read(self, module: str) -> tuple[str, str]:
        """(source, file name shown in tracebacks) of a module."""
        relative = module.replace(".", "/") + ".py"
        path = os.path.join(self.folder, relative)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read(), path
        if self.wheel is not None:
            try:
                return self.wheel.read(relative).decode(), f"{self.wheel.filename}/{relative}"
            except KeyError:
                pass
        raise SystemExit(f"bench_vllm_admission: error: {relative} is neither under {self.folder} nor in the wheel")

    def version(self) -> str:
        if self.wheel is not None and self.wheel.filename:
            return os.path.basename(self.wheel.filename).split("-")[1]
        return "unknown"


class _WheelFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the named vLLM modules from the wheel's source, and nothing else."""

    def __init__(self, source: _WheelSource, modules: tuple[str, ...]) -> None:
        self.source = source
        self.modules = set(modules)

    def find_spec(self, name, path, target=None):
        if name in self.modules:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        text, filename = self.source.read(module.__name__)
        module.__file__ = filename
        exec(compile(text, filename, "exec"), module.__dict__)


def _lift(source: _WheelSource, module: str, names: tuple[str, ...], into: types.ModuleType) -> None:
    """Runs only the top-level definitions ``names`` of a wheel module, inside ``into``."""
    text, filename = source.read(module)
    tree = ast.parse(text, filename)

    def defines(node: ast.stmt) -> set[str]:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            return {node.name}
        if isinstance(node, ast.Assign):
            return {t.id for t in node.targets if isinstance(t, ast.Name)}
        return set()

    picked = [node for node in tree.body if defines(node) & set(names)]
    missing = set(names) - set().union(*(defines(n) for n in picked))
    if missing:
        raise SystemExit(f"bench_vllm_admission: error: {module} defines none of {sorted(missing)}")
    exec(compile(ast.Module(body=picked, type_ignores=[]), filename, "exec"), into.__dict__)


class _Logger(logging.LoggerAdapter):
    """vLLM's logger adds ``*_once`` methods to the standard one."""

    def info_once(self, msg, *args, **kwargs):
        self.info(msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self.warning(msg, *args)

    def debug_once(self, msg, *args, **kwargs):
        self.debug(msg, *args)


def _module(name: str, package: bool = False, **attributes: Any) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    if package and not hasattr(module, "__path__"):
        module.__path__ = []        # submodules come from _WheelFinder or a stand-in
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def install_vllm(where: str) -> tuple[dict[str, types.ModuleType], str]:
    """Makes vLLM's KV-cache manager importable; returns its modules by short name and
    the wheel's version."""
    source = _WheelSource(where)
    if any(name == "vllm" or name.startswith("vllm.") for name in sys.modules):
        raise SystemExit("bench_vllm_admission: error: a vllm package is already imported")

    # Packages whose __init__ would import the whole engine: empty here.
    for name in ("vllm", "vllm.v1", "vllm.v1.core", "vllm.v1.hisparse", "vllm.v1.metrics",
                 "vllm.v1.attention", "vllm.v1.attention.backends", "vllm.v1.structured_output",
                 "vllm.distributed", "vllm.multimodal", "vllm.config", "vllm.lora"):
        _module(name, package=True)

    # torch: only type names appear on the admission path.
    class _DType:
        def __init__(self, name: str, itemsize: int) -> None:
            self.name, self.itemsize = name, itemsize

        def __repr__(self) -> str:
            return f"torch.{self.name}"

    _module("torch", package=True, dtype=_DType, Tensor=type("Tensor", (), {}),
                    float16=_DType("float16", 2), bfloat16=_DType("bfloat16", 2),
                    float32=_DType("float32", 4), uint8=_DType("uint8", 1), int8=_DType("int8", 1))
    _module("torch.nn", Module=type("Module", (), {}))

    _module("vllm.envs", VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=True)
    _module("vllm.logger", init_logger=lambda name: _Logger(logging.getLogger(name), {}))
    _module("vllm.config", VllmConfig=type("VllmConfig", (), {}),
            get_current_vllm_config_or_none=lambda: None)
    _module("vllm.config.cache", get_kv_cache_dtype_handler=lambda *a, **k: None)
    _module("vllm.platforms", current_platform=types.SimpleNamespace(
        register_custom_kv_cache_specs=lambda vllm_config: None))
    _module("vllm.utils", package=True, length_from_prompt_token_ids_or_embeds=_prompt_length)
    _module("vllm.utils.torch_utils", get_dtype_size=lambda dtype: dtype.itemsize)
    # Only the default of a Mamba spec's field is read (at import).
    _module("vllm.v1.attention.backends.registry", MambaAttentionBackendEnum=enum.Enum(
        "MambaAttentionBackendEnum", ["MAMBA2"]))
    _module("vllm.v1.attention.backend", MultipleOf=type("MultipleOf", (), {}))

    # Events are off on both sides; the names must exist for the imports.
    def _event(name: str) -> type:
        return dataclasses.make_dataclass(name, [("fields", dict, dataclasses.field(default_factory=dict))])

    _module("vllm.distributed.kv_events", MEDIUM_GPU="GPU", MEDIUM_CPU="CPU",
            KVCacheEvent=_event("KVCacheEvent"), BlockStored=_event("BlockStored"),
            BlockRemoved=_event("BlockRemoved"), AllBlocksCleared=_event("AllBlocksCleared"))
    # Requests here carry no multimodal input, LoRA, pooling or structured output.
    _module("vllm.multimodal.inputs", MultiModalFeatureSpec=type("MultiModalFeatureSpec", (), {}))
    _module("vllm.multimodal.utils", get_mm_features_in_window=_no_multimodal)
    _module("vllm.lora.request", LoRARequest=type("LoRARequest", (), {}))
    _module("vllm.pooling_params", PoolingParams=type("PoolingParams", (), {}))
    _module("vllm.sampling_params", SamplingParams=SamplingParams)
    _module("vllm.v1.structured_output.request", StructuredOutputRequest=types.SimpleNamespace(
        from_sampling_params=lambda sampling_params: None))
    _module("vllm.v1.kv_hints", KvHintsEnvelope=type("KvHintsEnvelope", (), {}))
    _module("vllm.v1.engine", EngineCoreEvent=type("EngineCoreEvent", (), {}),
            EngineCoreEventType=enum.IntEnum("EngineCoreEventType", ["QUEUED"]),
            EngineCoreRequest=type("EngineCoreRequest", (), {}),
            FinishReason=enum.IntEnum("FinishReason", ["STOP", "LENGTH", "ABORT", "ERROR", "REPETITION"]))
    # Lifted definitions: run from the wheel's own text.
    import typing
    utils = _module("vllm.v1.utils", tensor_data=lambda tensor: bytes(tensor))
    utils.__dict__.update(Generic=typing.Generic, TypeVar=typing.TypeVar, overload=typing.overload,
                          Sequence=__import__("collections.abc").abc.Sequence)
    _lift(source, "vllm.v1.utils", VLLM_DEFINITIONS["vllm.v1.utils"], utils)

    sys.meta_path.insert(0, _WheelFinder(source, VLLM_MODULES))
    cache_hit_source = importlib.import_module("vllm.v1.metrics.cache_hit_source")

    stats = _module("vllm.v1.metrics.stats")
    stats.__dict__.update(dataclass=dataclasses.dataclass, field=dataclasses.field,
                          CacheHitSource=cache_hit_source.CacheHitSource, Any=Any, TYPE_CHECKING=False)
    _lift(source, "vllm.v1.metrics.stats", VLLM_DEFINITIONS["vllm.v1.metrics.stats"], stats)

    modules = {name: importlib.import_module(f"vllm.{path}") for name, path in (
        ("hashing", "utils.hashing"), ("kv_cache_manager", "v1.core.kv_cache_manager"),
        ("kv_cache_utils", "v1.core.kv_cache_utils"), ("kv_cache_interface", "v1.kv_cache_interface"),
        ("request", "v1.request"))}
    return modules, source.version()


def _prompt_length(prompt_token_ids, prompt_embeds) -> int:
    if prompt_token_ids is None:
        raise ValueError("Neither prompt_token_ids nor prompt_embeds were defined.")
    return len(prompt_token_ids)


def _no_multimodal(*args, **kwargs):
    raise AssertionError("the benchmark's requests carry no multimodal input")


@dataclasses.dataclass
class SamplingParams:
    """What ``Request.__init__`` reads of vLLM's SamplingParams."""

    max_tokens: int = 16
    extra_args: dict[str, Any] | None = None
    skip_reading_prefix_cache: bool | None = None


# --------------------------------------------------------------------------- the two sides


class VllmAdmission:
    """vLLM's admission of a waiting request, as its scheduler makes it.

    ``hash`` computes the request's block hashes with vLLM's own hasher (the engine
    does it when the request is made, ``Request.update_block_hashes``); ``admit`` is
    ``get_computed_blocks`` then ``allocate_slots`` for every token not found cached.
    """

    name = "vLLM"
    hashes_inside = False

    def __init__(self, vllm: dict[str, types.ModuleType], block_size: int, num_blocks: int, max_model_len: int,
                 hash_algorithm: str) -> None:
        torch = sys.modules["torch"]   # the stand-in install_vllm put there

        interface, utils = vllm["kv_cache_interface"], vllm["kv_cache_utils"]
        spec = interface.FullAttentionSpec(block_size=block_size, num_kv_heads=8, head_size=128,
                                           dtype=torch.float16)
        # vLLM keeps block 0 as its null block: one more, so that both pools hand out
        # ``num_blocks``.
        config = interface.KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[],
                                         kv_cache_groups=[interface.KVCacheGroupSpec(["layers.0.attn"], spec)])
        self.manager = vllm["kv_cache_manager"].KVCacheManager(
            config, max_model_len=max_model_len, scheduler_block_size=block_size, hash_block_size=block_size,
            enable_caching=True)
        hash_function = vllm["hashing"].get_hash_fn_by_name(hash_algorithm)
        utils.init_none_hash(hash_function)
        # The seed of NONE_HASH (random per process for xxhash): pagetable is given it.
        self.hash_seed = utils.get_none_hash_seed()
        self.hasher = utils.get_request_block_hasher(block_size, hash_function)
        self.request_class = vllm["request"].Request
        self.requests: list[Any] = []

    def prepare(self, index: int, prompt: list[int]) -> Any:
        """The request as the engine makes it, before its hashes (not timed)."""
        request = self.request_class(f"request-{index}", prompt, SamplingParams(max_tokens=1), None)
        self.requests.append(request)
        return request

    def hash(self, request: Any) -> None:
        request.block_hashes.extend(self.hasher(request))

    def admit(self, request: Any) -> int:
        manager = self.manager
        blocks, num_cached, _ = manager.get_computed_blocks(request)
        new_blocks = manager.allocate_slots(request, request.num_tokens - num_cached,
                                            num_new_computed_tokens=num_cached, new_computed_blocks=blocks)
        if new_blocks is None:
            raise SystemExit("bench_vllm_admission: error: vLLM's pool ran out; give it more --num-blocks")
        return num_cached

    def block_hashes(self, request: Any) -> list[bytes]:
        return [bytes(h) for h in request.block_hashes]

    def clear(self, reset: bool) -> None:
        for request in self.requests:
            self.manager.free(request)
        self.requests = []
        if reset and not self.manager.reset_prefix_cache():
            raise AssertionError("vLLM refused to reset its prefix cache with every request freed")


class PagetableAdmission:
    """pagetable's admission: one ``add_sequence(seq_id, token_ids=...)``, which hashes.

    ``hash`` times the manager's own hashing alone: ``count_cached_tokens`` of the same
    prompt on a second manager whose cache is empty (the same conversion and hashing,
    then one lookup that misses), so that the admission without hashing can be told
    as a difference.
    """

    hashes_inside = True

    def __init__(self, block_size: int, num_blocks: int, hash_algorithm: str, hash_seed: str,
                 as_array: bool) -> None:
        from pagetable import KVCacheManager

        self.name = "pagetable (int64 array)" if as_array else "pagetable (list)"
        options: dict[str, Any] = dict(enable_prefix_caching=True, hash_algorithm=hash_algorithm, hash_seed=hash_seed)
        try:
            self.manager = KVCacheManager(num_blocks, block_size, **options)
            self.hashing_only = KVCacheManager(num_blocks, block_size, **options)
        except TypeError as exc:
            raise SystemExit(f"bench_vllm_admission: error: this pagetable build has no prefix caching "
                             f"({exc}); --vllm-only times vLLM alone") from None
        self.as_array = as_array
        self.seq_ids: list[int] = []

    def prepare(self, index: int, prompt: list[int]) -> Any:
        self.seq_ids.append(index)
        return index, np.array(prompt, dtype=np.int64) if self.as_array else prompt

    def hash(self, prepared: Any) -> None:
        if self.hashing_only.count_cached_tokens(prepared[1]):
            raise AssertionError("the hashing-only manager found something cached")

    def admit(self, prepared: Any) -> int:
        seq_id, token_ids = prepared
        return self.manager.add_sequence(seq_id, token_ids=token_ids).num_cached_tokens

    def clear(self, reset: bool) -> None:
        self.manager.free_sequence(np.array(self.seq_ids, dtype=np.int64))
        self.seq_ids = []
        if reset:
            self.manager.reset_prefix_cache()


def run_round(side: Any, prompts: list[list[int]], reset: bool) -> dict[str, Any]:
    """Admits every prompt once on one side; per-request nanoseconds and hits.

    ``with_hashing_ns`` and ``without_hashing_ns`` are each request's admission with its
    block hashes and without.  vLLM's are measured apart (hashing, then admission);
    pagetable's admission hashes inside, so its time without hashing is the difference
    of the admission and the same prompt's hashing timed alone just before.
    """
    clock = time.perf_counter_ns
    prepared = [side.prepare(i, prompt) for i, prompt in enumerate(prompts)]
    hash_ns, admit_ns, hits = [], [], []
    gc.collect()
    gc.disable()
    try:
        for item in prepared:
            start = clock()
            side.hash(item)
            hash_ns.append(clock() - start)
            start = clock()
            hits.append(side.admit(item))
            admit_ns.append(clock() - start)
    finally:
        gc.enable()
    block_hashes = side.block_hashes(prepared[0]) if hasattr(side, "block_hashes") else None
    side.clear(reset)
    if side.hashes_inside:
        with_hashing, without_hashing = admit_ns, [a - h for a, h in zip(admit_ns, hash_ns)]
    else:
        with_hashing, without_hashing = [a + h for a, h in zip(admit_ns, hash_ns)], admit_ns
    return {"hash_ns": hash_ns, "with_hashing_ns": with_hashing, "without_hashing_ns": without_hashing,
            "hits": hits, "first_block_hashes": block_hashes}


# --------------------------------------------------------------------------- the run


def _median_us(values: list[int]) -> float:
    return statistics.median(values) / 1e3


def _mean_us(values: list[int]) -> float:
    return statistics.fmean(values) / 1e3


def _summarise(rounds: list[dict[str, Any]], misses: list[bool], difference: bool) -> dict[str, Any]:
    """Per-request figures of one side over every round.

    Where the time without hashing is a difference of two timings (``difference``),
    only its median is given: the occasional spike of either timing (a shared machine)
    makes a mean of differences meaningless, even negative.
    """
    figures: dict[str, Any] = {"hits_tokens": sum(rounds[0]["hits"])}
    for key in ("with_hashing", "without_hashing", "hash"):
        values = [ns for r in rounds for ns in r[f"{key}_ns"]]
        figures[f"{key}_p50_us"] = _median_us(values)
        figures[f"{key}_mean_us"] = None if difference and key == "without_hashing" else _mean_us(values)
        figures[f"{key}_p50_us_per_round"] = [_median_us(r[f"{key}_ns"]) for r in rounds]
        miss = [ns for r in rounds for ns, m in zip(r[f"{key}_ns"], misses) if m]
        rest = [ns for r in rounds for ns, m in zip(r[f"{key}_ns"], misses) if not m]
        figures[f"{key}_p50_us_first_of_prefix"] = _median_us(miss) if miss else None
        figures[f"{key}_p50_us_rest"] = _median_us(rest) if rest else None
    return figures


def _check_hashes(vllm_side: VllmAdmission, prompts: list[list[int]], args: argparse.Namespace) -> None:
    """vLLM's block hashes of every prompt equal pagetable.prefix's (before any timing)."""
    from pagetable.prefix import hash_prompt

    for index, prompt in enumerate(prompts):
        request = vllm_side.request_class(f"check-{index}", prompt, SamplingParams(max_tokens=1), None)
        vllm_side.hash(request)
        ours = hash_prompt(prompt, args.block_size, algorithm=args.hash_algorithm, seed=vllm_side.hash_seed)
        if vllm_side.block_hashes(request) != ours:
            raise SystemExit(f"bench_vllm_admission: error: prompt {index}: vLLM's block hashes differ from "
                             f"pagetable.prefix.hash_prompt's")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", default="/work/vllm",
                        help="folder with vLLM's wheel unpacked (vllm/...) and/or the vllm-*.whl itself "
                             "(default /work/vllm)")
    parser.add_argument("--requests", type=int, default=256, help="requests per round (default 256)")
    parser.add_argument("--prefixes", type=int, default=8, help="shared prefixes, in turn (default 8)")
    parser.add_argument("--prefix-tokens", type=int, default=2048, help="tokens per prefix (default 2048)")
    parser.add_argument("--suffix-tokens", type=int, default=128,
                        help="tokens of each request's own after the prefix (default 128)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="blocks each pool hands out (default: a round's need plus a quarter)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the order (default 5)")
    parser.add_argument("--hash-algorithm", default="sha256",
                        choices=("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"),
                        help="block hash on both sides (default sha256)")
    parser.add_argument("--warm", action="store_true",
                        help="keep the cache between rounds, after an untimed round that fills it, so every "
                             "full block hits (default: reset it, so every round starts cold and only the "
                             "first request of each prefix misses)")
    parser.add_argument("--vllm-only", action="store_true", help="time vLLM alone (no pagetable side)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "prefixes", "prefix_tokens", "block_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.suffix_tokens < 0 or args.seed < 0:
        parser.error("--suffix-tokens and --seed must be >= 0")
    blocks_needed = (args.prefixes * (args.prefix_tokens // args.block_size)
                     + args.requests * (-(-(args.prefix_tokens + args.suffix_tokens) // args.block_size)
                                        - args.prefix_tokens // args.block_size))
    if args.num_blocks is None:
        args.num_blocks = blocks_needed + blocks_needed // 4
    elif args.num_blocks < blocks_needed:
        parser.error(f"--num-blocks {args.num_blocks} cannot hold a round: it needs {blocks_needed}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vllm, version = install_vllm(args.vllm)
    from pagetable.cli import workloads

    prompts = workloads.shared_prefix_prompts(args.requests, args.prefixes, args.prefix_tokens,
                                              args.suffix_tokens, args.seed)
    max_model_len = args.prefix_tokens + args.suffix_tokens + args.block_size
    vllm_side = VllmAdmission(vllm, args.block_size, args.num_blocks, max_model_len, args.hash_algorithm)
    sides: list[Any] = [vllm_side]
    if not args.vllm_only:
        _check_hashes(vllm_side, prompts, args)
        sides += [PagetableAdmission(args.block_size, args.num_blocks, args.hash_algorithm, vllm_side.hash_seed,
                                     as_array) for as_array in (False, True)]
    # The first request of each prefix finds nothing cached in a cold round.
    misses = [i < args.prefixes and not args.warm for i in range(args.requests)]

    if args.warm:
        # An untimed first round fills each cache, so that every timed round finds the same.
        for side in sides:
            run_round(side, prompts, reset=False)
    results: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for round_index in range(args.rounds):
        shift = round_index % len(sides)
        for side in sides[shift:] + sides[:shift]:     # alternating who goes first
            results[side.name].append(run_round(side, prompts, reset=not args.warm))

    # Both sides must have found the same hits, request by request, every round.
    reference = results[sides[0].name]
    for side in sides[1:]:
        for round_index, (ours, theirs) in enumerate(zip(results[side.name], reference)):
            if ours["hits"] != theirs["hits"]:
                first = next(i for i, (a, b) in enumerate(zip(ours["hits"], theirs["hits"])) if a != b)
                raise SystemExit(f"bench_vllm_admission: error: round {round_index}, request {first}: "
                                 f"{side.name} found {ours['hits'][first]} tokens cached, vLLM "
                                 f"{theirs['hits'][first]}")

    figures = {side.name: _summarise(results[side.name], misses, side.hashes_inside) for side in sides}
    report = _report(args, version, prompts, figures, sides)
    print(report["text"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "vllm_version": version, "sides": figures,
                       "ratios": report["ratios"],
                       "per_request_ns": {name: [{key: r[f"{key}_ns"] for key in
                                                  ("hash", "with_hashing", "without_hashing")} for r in rounds]
                                          for name, rounds in results.items()},
                       "hits": {name: rounds[0]["hits"] for name, rounds in results.items()}}, f, indent=1)
        print(f"figures written to {args.json}")
    return 0


def _report(args: argparse.Namespace, version: str, prompts: list[list[int]], figures: dict[str, Any],
            sides: list[Any]) -> dict[str, Any]:
    tokens = sum(len(p) for p in prompts)
    vllm = figures[sides[0].name]
    hits = vllm["hits_tokens"]
    lines = [
        f"admission with prefix caching: vLLM {version} KVCacheManager.get_computed_blocks + allocate_slots "
        f"vs pagetable KVCacheManager.add_sequence(token_ids=...)",
        f"  {args.requests} requests per round: {args.prefixes} prefixes of {args.prefix_tokens} tokens, "
        f"{args.suffix_tokens} own tokens each; block size {args.block_size}, {args.num_blocks} blocks, "
        f"{args.hash_algorithm}, {args.rounds} rounds ({'warm' if args.warm else 'cold'}: "
        f"{'cache kept' if args.warm else 'cache reset'} between rounds), order alternating",
        f"  hits per round: {hits:,} of {tokens:,} prompt tokens ({100 * hits / tokens:.1f}%), "
        f"{'the same on every side, request by request' if len(sides) > 1 else 'vLLM alone'}",
        "",
        f"  {'per request, us':<26} {'with hashing':>21} {'hashing':>9} {'without hashing':>21}",
        f"  {'':<26} {'p50':>10} {'mean':>10} {'p50':>9} {'p50':>10} {'mean':>10}",
    ]
    for side in sides:
        f = figures[side.name]
        mean = f["without_hashing_mean_us"]
        lines.append(f"  {side.name:<26} {f['with_hashing_p50_us']:>10.1f} {f['with_hashing_mean_us']:>10.1f} "
                     f"{f['hash_p50_us']:>9.1f} {f['without_hashing_p50_us']:>10.1f} "
                     + (f"{mean:>10.1f}" if mean is not None else f"{'-':>10}  (difference: with - hashing)"))
    ratios: dict[str, Any] = {}
    for side in sides[1:]:
        ours = figures[side.name]
        ratios[side.name] = {
            "with_hashing_p50": vllm["with_hashing_p50_us"] / ours["with_hashing_p50_us"],
            "with_hashing_mean": vllm["with_hashing_mean_us"] / ours["with_hashing_mean_us"],
            "without_hashing_p50": vllm["without_hashing_p50_us"] / ours["without_hashing_p50_us"]
            if ours["without_hashing_p50_us"] > 0 else None,
        }
        r = ratios[side.name]
        without = f"{r['without_hashing_p50']:.0f}x" if r["without_hashing_p50"] else "-"
        lines.append(f"  vLLM / {side.name}: {r['with_hashing_p50']:.2f}x p50 ({r['with_hashing_mean']:.2f}x mean) "
                     f"with hashing; about {without} p50 without")
    lines.append("  with hashing, p50 per round, us: " + "; ".join(
        f"{side.name} " + " ".join(f"{v:.1f}" for v in figures[side.name]["with_hashing_p50_us_per_round"])
        for side in sides))
    if not args.warm:
        lines.append("  with hashing, p50 of the first request of each prefix / of the rest, us: " + "; ".join(
            f"{side.name} {figures[side.name]['with_hashing_p50_us_first_of_prefix']:.1f} / "
            f"{figures[side.name]['with_hashing_p50_us_rest']:.1f}" for side in sides))
    lines.append("  vLLM's hashing is its Request.update_block_hashes work (get_request_block_hasher); "
                 "pagetable's is count_cached_tokens of the prompt on an empty cache")
    return {"text": "\n".join(lines), "ratios": ratios}


if __name__ == "__main__":
    sys.exit(main())
