"""Write tests/data/vllm_hash_vectors.json: block hashes computed by vLLM's own code.

Every answer in the file comes from the functions of an unpacked vLLM wheel (0.33.0),
run here unchanged: ``vllm.utils.hashing`` (the four hash functions,
``get_hash_fn_by_name``), and from ``vllm.v1.core.kv_cache_utils``
``init_none_hash`` / ``resolve_none_hash_seed`` / ``get_none_hash_seed`` (NONE_HASH
and its seed, read from ``PYTHONHASHSEED`` as vLLM reads it), ``hash_block_tokens``,
``get_request_block_hasher`` (the chained hashes of a request, in one call and fed a
few tokens at a time), ``generate_block_hash_extra_keys`` (the tagged per-block extra
keys of LoRA, multimodal items and cache salt), ``to_event_extra_keys`` and
``maybe_convert_block_hash`` (what KV events carry, under
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` unset, ``1`` and ``0``).  The LoRA requests
are vLLM's own ``LoRARequest``.

vLLM's package ``__init__`` files and several modules those functions import need
torch and a GPU stack, so the packages are entered without their ``__init__`` and a
few imports are replaced by stand-ins installed into ``sys.modules`` (a logger, a
config class, KV-cache spec classes, the request class; none is called by the code
paths used).  ``vllm.multimodal.utils`` needs PIL, so its one function the block
hasher calls, ``get_mm_features_in_window``, is compiled from the wheel's own source.
Requests are plain objects with the attributes the hasher reads (``all_token_ids``,
``num_tokens``, ``block_hashes``, ``lora_request``, ``mm_features`` with
``identifier`` and ``mm_position.offset`` / ``.length``, ``cache_salt``,
``prompt_embeds=None``).

Nothing of vLLM is copied into this repository: this script reads it at run time.  The
source files it runs are checked against the wheel's RECORD, and the wheel's version
and SHA-256 are written into the file.  Regenerate with::

    python tools/make_hash_vectors.py /work/vllm

where ``/work/vllm`` holds the unpacked ``vllm/`` package and the ``vllm-*.whl`` it
came from.  Needs xxhash, cbor2 and msgspec; not torch.
"""

from __future__ import annotations

import __future__
import argparse
import ast
import base64
import hashlib
import importlib
import json
import logging
import os
import pathlib
import sys
import types
import zipfile
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = REPO / "tests" / "data" / "vllm_hash_vectors.json"

# The wheel's files this script runs (the rest of vLLM is never imported).
SOURCES = [
    "vllm/envs.py",
    "vllm/utils/hashing.py",
    "vllm/utils/math_utils.py",
    "vllm/lora/request.py",
    "vllm/multimodal/utils.py",
    "vllm/v1/core/kv_cache_utils.py",
]
ALGORITHMS = ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
BOUNDARY_TOKENS = [0, 23, 24, 255, 256, 65535, 65536, 2**31 - 1]


# ------------------------------------------------------------------ loading vLLM

def _placeholder(module: str, name: str) -> type:
    """A class standing in for one vLLM name the hashing code imports but never uses."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{module}.{name} is a stand-in of make_hash_vectors.py")
    return type(name, (), {"__init__": refuse, "__module__": module})


def _stand_in(name: str, **attributes: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__file__ = f"<stand-in for {name}>"
    sys.modules[name] = module


def _check_against_record(root: pathlib.Path, wheel: pathlib.Path) -> dict[str, str]:
    """Each source file's SHA-256 as the wheel's RECORD lists it; a mismatch aborts."""
    with zipfile.ZipFile(wheel) as archive:
        record_name = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        record = {}
        for line in archive.read(record_name).decode().splitlines():
            path, digest, _ = line.rsplit(",", 2)
            record[path] = digest
    checked = {}
    for path in SOURCES:
        data = (root / path).read_bytes()
        digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if record.get(path) != digest:
            raise SystemExit(f"{root / path} is not the file {wheel.name} ships ({record.get(path)})")
        checked[path] = hashlib.sha256(data).hexdigest()
    return checked


def _wheel_version(wheel: pathlib.Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata_name).decode().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise SystemExit(f"{wheel} has no Version in its METADATA")


def _function_from_source(path: pathlib.Path, name: str, namespace: dict[str, Any]) -> Any:
    """Compile one top-level function of a vLLM source file, unchanged, into ``namespace``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace[name]


def load_vllm(root: pathlib.Path) -> types.SimpleNamespace:
    """Import the hashing code of the vLLM package under ``root`` with stand-ins."""
    package = root / "vllm"
    for name in ["vllm", "vllm.utils", "vllm.lora", "vllm.multimodal", "vllm.v1", "vllm.v1.core"]:
        module = types.ModuleType(name)
        module.__path__ = [str(package.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module

    _stand_in("vllm.logger", init_logger=logging.getLogger)
    _stand_in("vllm.config", VllmConfig=_placeholder("vllm.config", "VllmConfig"))
    interface = "vllm.v1.kv_cache_interface"
    _stand_in(interface, **{name: _placeholder(interface, name) for name in [
        "KVCacheConfig", "KVCacheGroupSpec", "KVCacheSpec", "MambaSpec",
        "UniformTypeKVCacheSpecs", "iter_layer_specs"]})
    _stand_in("vllm.v1.kv_cache_spec_registry",
              KVCacheSpecRegistry=_placeholder("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry"))
    _stand_in("vllm.v1.request", Request=_placeholder("vllm.v1.request", "Request"))
    _stand_in("vllm.v1.utils", tensor_data=_placeholder("vllm.v1.utils", "tensor_data"))
    import bisect
    namespace: dict[str, Any] = {"bisect": bisect, "__name__": "vllm.multimodal.utils"}
    window = _function_from_source(package / "multimodal" / "utils.py",
                                   "get_mm_features_in_window", namespace)
    _stand_in("vllm.multimodal.utils", get_mm_features_in_window=window)

    # init_none_hash warns of the random xxhash seed on every call; the file says so.
    logging.getLogger("vllm.v1.core.kv_cache_utils").setLevel(logging.ERROR)
    return types.SimpleNamespace(
        envs=importlib.import_module("vllm.envs"),
        hashing=importlib.import_module("vllm.utils.hashing"),
        lora=importlib.import_module("vllm.lora.request"),
        kv=importlib.import_module("vllm.v1.core.kv_cache_utils"),
    )


# ---------------------------------------------------------------- the requests

class FakeRequest:
    """What ``get_request_block_hasher`` and ``generate_block_hash_extra_keys`` read."""

    def __init__(self, vllm: types.SimpleNamespace, token_ids: list[int], extra: dict | None):
        extra = extra or {}
        self.all_token_ids = list(token_ids)
        self.num_tokens = len(self.all_token_ids)
        self.block_hashes: list[bytes] = []
        lora = extra.get("lora")
        self.lora_request = (None if lora is None else vllm.lora.LoRARequest(
            lora_name=lora["name"], lora_int_id=lora["id"], lora_path=lora["path"]))
        self.mm_features = [
            types.SimpleNamespace(identifier=identifier, modality="image",
                                  mm_position=types.SimpleNamespace(offset=offset, length=length))
            for identifier, offset, length in extra.get("mm", [])
        ]
        self.cache_salt = extra.get("cache_salt")
        self.prompt_embeds = None
        self._prompt_embeds_per_block_hashes: dict = {}


def set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def jsonable(value: Any) -> Any:
    """Tuples as lists, bytes as hex: what the test turns pagetable's answers into too."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def chain(vllm: types.SimpleNamespace, algorithm: str, seed: str | None, block_size: int,
          token_ids: list[int], extra: dict | None) -> dict:
    """One request's hashes, extra keys and event forms, all from vLLM."""
    hash_fn = vllm.hashing.get_hash_fn_by_name(algorithm)
    set_env("PYTHONHASHSEED", seed)
    vllm.kv.init_none_hash(hash_fn)
    hasher = vllm.kv.get_request_block_hasher(block_size, hash_fn)

    request = FakeRequest(vllm, token_ids, extra)
    hashes = hasher(request)

    # The engine's path: the same request growing a few tokens per step (prefill in
    # chunks, then decode), hashing only the blocks each step completes.
    growing = FakeRequest(vllm, token_ids, extra)
    for end in range(0, len(token_ids) + 1, 5):
        growing.num_tokens = end
        growing.block_hashes.extend(hasher(growing))
    growing.num_tokens = len(token_ids)
    growing.block_hashes.extend(hasher(growing))
    if growing.block_hashes != hashes:
        raise SystemExit(f"vLLM's incremental hashes differ from its one-call hashes: {algorithm} "
                         f"{block_size} {extra}")

    keys: list = []
    mm_index = 0
    for k in range(len(token_ids) // block_size):
        block_keys, mm_index = vllm.kv.generate_block_hash_extra_keys(
            request, k * block_size, (k + 1) * block_size, mm_index)
        keys.append(block_keys)

    events: dict[str, list] = {}
    for setting in (None, "1", "0"):
        set_env("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", setting)
        events["default" if setting is None else setting] = [
            jsonable(vllm.kv.maybe_convert_block_hash(h)) for h in hashes]
    set_env("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", None)
    return {
        "algorithm": algorithm,
        "seed": seed,
        "none_hash_seed": vllm.kv.get_none_hash_seed(),
        "block_size": block_size,
        "token_ids": token_ids,
        "extra": extra,
        "block_extra_keys": jsonable(keys),
        "event_extra_keys": jsonable(vllm.kv.to_event_extra_keys(keys)),
        "hashes": [h.hex() for h in hashes],
        "event_hashes": events,
    }


# The requests' extra keys: pagetable.prefix.ExtraKeys arguments, given to vLLM as a
# LoRARequest, mm_features and cache_salt.
EXTRAS: dict[str, dict | None] = {
    "none": None,
    "lora": {"lora": {"name": "sql-lora", "id": 1, "path": "/adapters/sql-lora"}},
    "lora_unicode": {"lora": {"name": "lörä-日本", "id": 7, "path": "/adapters/ü"}},
    "salt": {"cache_salt": "tenant-a"},
    "salt_empty": {"cache_salt": ""},
    "mm_inside_block0": {"mm": [["img-a", 2, 3]]},
    "mm_spanning_blocks": {"mm": [["img-b", 5, 30]]},
    "mm_several_in_one_block": {"mm": [["a", 1, 1], ["b", 2, 1], ["c", 3, 2], ["d", 6, 9]]},
    "mm_on_block_edges": {"mm": [["e", 0, 4], ["f", 8, 8], ["g", 16, 17]]},
    "mm_same_identifier_twice": {"mm": [["same", 3, 2], ["same", 20, 2]]},
    "mm_past_full_blocks": {"mm": [["late", 50, 3]]},
    "everything": {
        "lora": {"name": "sql-lora", "id": 3, "path": "/adapters/sql-lora"},
        "mm": [["img-x", 1, 2], ["img-y", 3, 18], ["img-z", 30, 4]],
        "cache_salt": "sälty",
    },
}


def prompt(length: int, salt: int) -> list[int]:
    """Tokens cycling through the CBOR/pickle integer boundaries, mixed with others."""
    return [BOUNDARY_TOKENS[(i + salt) % len(BOUNDARY_TOKENS)] if i % 3 else (i * 7919 + salt) % 50_000
            for i in range(length)]


def build(vllm: types.SimpleNamespace) -> dict:
    out: dict[str, Any] = {}

    # NONE_HASH: vLLM's init_none_hash under each PYTHONHASHSEED.  Unset, the SHA-256
    # algorithms take the fixed default and the xxhash ones a fresh random seed.
    out["none_hash"] = []
    for algorithm in ALGORITHMS:
        hash_fn = vllm.hashing.get_hash_fn_by_name(algorithm)
        for seed in [None, "vllm-none-hash", "0", "12345", ""]:
            set_env("PYTHONHASHSEED", seed)
            vllm.kv.init_none_hash(hash_fn)
            resolved = vllm.kv.get_none_hash_seed()
            if seed is None and algorithm.startswith("xxhash"):
                # Random: only its shape is kept, so that the file is the same each run.
                again = vllm.kv.resolve_none_hash_seed(hash_fn)
                out.setdefault("random_seeds", []).append({
                    "algorithm": algorithm,
                    "hex_digits": len(resolved) if all(c in "0123456789abcdef" for c in resolved) else None,
                    "differs_between_calls": again != resolved})
                continue
            out["none_hash"].append({"algorithm": algorithm, "pythonhashseed": seed,
                                     "seed": resolved, "digest": vllm.kv.NONE_HASH.hex()})
    set_env("PYTHONHASHSEED", None)

    # hash_block_tokens alone: the parent None or b"" (both NONE_HASH), or a digest.
    out["hash_block_tokens"] = []
    for algorithm in ALGORITHMS:
        hash_fn = vllm.hashing.get_hash_fn_by_name(algorithm)
        set_env("PYTHONHASHSEED", "0")
        vllm.kv.init_none_hash(hash_fn)
        parent = vllm.kv.hash_block_tokens(hash_fn, None, [1, 2, 3, 4])
        cases: list[tuple[bytes | None, list[int], tuple | None]] = [
            (None, BOUNDARY_TOKENS, None),
            (b"", BOUNDARY_TOKENS, None),
            (parent, BOUNDARY_TOKENS, None),
            (parent, [65536] * 3, (("lora", "x", "/x"), ("mm", "h", -3), ("cache_salt", "s"))),
        ]
        # Canonical CBOR shows only on floats (shortest form) and maps (sorted keys).
        cases.append((parent, [1, 2], (("custom", 1.5, {"b": 1, "a": 2}),)))
        cases += [(None, [token], None) for token in BOUNDARY_TOKENS]
        cases += [(parent, [token], (("mm", "h", token),)) for token in BOUNDARY_TOKENS]
        for parent_hash, tokens, extra_keys in cases:
            digest = vllm.kv.hash_block_tokens(hash_fn, parent_hash, tokens, extra_keys)
            out["hash_block_tokens"].append({
                "algorithm": algorithm, "seed": "0",
                "parent": None if parent_hash is None else parent_hash.hex(),
                "token_ids": tokens, "extra_keys": jsonable(extra_keys), "digest": digest.hex()})
    set_env("PYTHONHASHSEED", None)

    # Whole requests.
    out["chains"] = []
    for algorithm in ALGORITHMS:
        # Every case under the algorithm's usual seed (the default for SHA-256, which
        # the xxhash ones do not have), a few under a second one.
        seeds = [None, "12345"] if algorithm.startswith("sha256") else ["0", "12345"]
        for seed in seeds:
            for block_size in (1, 4, 16, 17):
                length = {1: 9, 4: 19, 16: 53, 17: 60}[block_size]
                for name, extra in EXTRAS.items():
                    if (block_size == 1 or seed == "12345") and name not in (
                            "none", "everything", "mm_several_in_one_block"):
                        continue
                    case = chain(vllm, algorithm, seed, block_size,
                                 prompt(length, len(out["chains"])), extra)
                    case["name"] = name
                    out["chains"].append(case)

    # to_event_extra_keys on its own, for lists of entries.  (None and [] give None.)
    out["to_event_extra_keys"] = [
        {"input": jsonable(keys), "output": jsonable(vllm.kv.to_event_extra_keys(keys))}
        for keys in [[None], [None, None],
                     [(("lora", "n", "/p"), ("mm", "i", 0), ("cache_salt", "s")), None],
                     [(("mm", "i", -4), ("mm", "j", 2))]]
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="/work/vllm", type=pathlib.Path,
                        help="folder holding the unpacked vllm/ package and its wheel")
    parser.add_argument("--wheel", type=pathlib.Path,
                        help="the wheel vllm/ was unpacked from (default: the vllm-*.whl in root)")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args(argv)

    wheel = args.wheel
    if wheel is None:
        wheels = sorted(args.root.glob("vllm-*.whl"))
        if len(wheels) != 1:
            parser.error(f"expected one vllm-*.whl in {args.root}, found {len(wheels)}; use --wheel")
        wheel = wheels[0]
    checked = _check_against_record(args.root, wheel)
    version = _wheel_version(wheel)
    vllm = load_vllm(args.root)

    import cbor2
    import msgspec
    import xxhash
    from importlib.metadata import version as installed

    vectors = {
        "source": {
            "vllm_version": version,
            "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "files": checked,
            "functions": [
                "vllm.utils.hashing.get_hash_fn_by_name",
                "vllm.v1.core.kv_cache_utils.init_none_hash",
                "vllm.v1.core.kv_cache_utils.resolve_none_hash_seed",
                "vllm.v1.core.kv_cache_utils.get_none_hash_seed",
                "vllm.v1.core.kv_cache_utils.hash_block_tokens",
                "vllm.v1.core.kv_cache_utils.get_request_block_hasher",
                "vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys",
                "vllm.v1.core.kv_cache_utils.to_event_extra_keys",
                "vllm.v1.core.kv_cache_utils.maybe_convert_block_hash",
                "vllm.lora.request.LoRARequest",
            ],
            "command": "python tools/make_hash_vectors.py /work/vllm",
            "python": sys.version.split()[0],
            "packages": {name: installed(name) for name in ("xxhash", "cbor2", "msgspec")},
        },
    }
    del cbor2, msgspec, xxhash
    vectors.update(build(vllm))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # One vector a line, so that a change of vLLM shows as a readable diff.
    sections = []
    for key, value in vectors.items():
        if isinstance(value, list):
            body = ",\n".join("  " + json.dumps(item, ensure_ascii=False) for item in value)
            sections.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            sections.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    args.output.write_text("{\n" + ",\n".join(sections) + "\n}\n")
    counts = {k: len(v) for k, v in vectors.items() if isinstance(v, list)}
    print(f"wrote {args.output} from {wheel.name}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
