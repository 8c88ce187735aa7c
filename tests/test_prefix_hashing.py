"""pagetable.prefix gives vLLM's block hashes bit for bit, and refuses bad input.

The known answers in ``tests/data/vllm_hash_vectors.json`` were computed by vLLM's own
functions, run unchanged from the vLLM 0.33.0 wheel
(``vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl``; the file records its SHA-256 and
that of each source file run): ``vllm.utils.hashing.get_hash_fn_by_name`` and, from
``vllm.v1.core.kv_cache_utils``, ``init_none_hash`` / ``resolve_none_hash_seed`` /
``get_none_hash_seed`` (NONE_HASH under ``PYTHONHASHSEED`` unset, ``"vllm-none-hash"``,
``"0"``, ``"12345"`` and ``""``), ``hash_block_tokens``, ``get_request_block_hasher``
(whole requests, fed in one call and a few tokens at a time),
``generate_block_hash_extra_keys`` (LoRA adapters as vLLM's ``LoRARequest``,
multimodal items as ``mm_features`` with ``identifier`` and ``mm_position``, cache
salts), ``to_event_extra_keys`` and ``maybe_convert_block_hash``.  Regenerate with::

    python tools/make_hash_vectors.py /work/vllm

(the folder holding the unpacked ``vllm/`` package and its wheel; see the script).
"""

from __future__ import annotations

import array
import dataclasses
import json
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import child_env
from pagetable import prefix
from pagetable.prefix import (ALGORITHMS, ExtraKeys, PrefixCacheStats, digest_size,
                              dynamo_block_hash, dynamo_block_hashes, event_block_hash,
                              event_extra_keys, hash_block_tokens, hash_function, hash_prompt,
                              none_hash, resolve_seed)

VECTORS = json.loads((pathlib.Path(__file__).parent / "data" / "vllm_hash_vectors.json")
                     .read_text(encoding="utf-8"))
PACKAGES = {"sha256": [], "sha256_cbor": ["cbor2"], "xxhash": ["xxhash"],
            "xxhash_cbor": ["cbor2", "xxhash"]}
INSTALL_HINT = "pip install 'pagetable[prefix]'"


def needs(algorithm):
    """Skip unless ``algorithm``'s optional packages are installed."""
    for name in PACKAGES[algorithm]:
        pytest.importorskip(name)


def tuples(value):
    """JSON lists back into the tuples vLLM hashed."""
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    return value


def jsonable(value):
    """Tuples as lists: the vectors' form of extra keys."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def extra_keys_of(extra):
    if extra is None:
        return None
    lora = extra.get("lora") or {}
    return ExtraKeys(lora_name=lora.get("name"), lora_path=lora.get("path"),
                     lora_id=lora.get("id"), mm=[tuple(item) for item in extra.get("mm", [])],
                     cache_salt=extra.get("cache_salt"))


def vector_id(case):
    return "-".join(str(case.get(k)) for k in ("algorithm", "seed", "block_size", "name"))


@pytest.fixture
def no_hash_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


# ------------------------------------------------------------------ the vectors

def test_vectors_came_from_vllm_0_33_0():
    source = VECTORS["source"]
    assert source["vllm_version"] == "0.33.0"
    assert source["wheel"].startswith("vllm-0.33.0-")
    assert re.fullmatch(r"[0-9a-f]{64}", source["wheel_sha256"])
    assert "vllm/v1/core/kv_cache_utils.py" in source["files"]
    for section in ("none_hash", "hash_block_tokens", "chains"):
        assert {case["algorithm"] for case in VECTORS[section]} == set(ALGORITHMS), section
    assert {c["block_size"] for c in VECTORS["chains"]} == {1, 4, 16, 17}
    tokens = {t for c in VECTORS["chains"] for t in c["token_ids"]}
    assert {0, 23, 24, 255, 256, 65535, 65536, 2**31 - 1} <= tokens


@pytest.mark.parametrize("case", VECTORS["none_hash"], ids=vector_id)
def test_none_hash_matches_vllm(case, monkeypatch):
    needs(case["algorithm"])
    algorithm, env_seed = case["algorithm"], case["pythonhashseed"]
    if env_seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", env_seed)
    assert resolve_seed(algorithm) == case["seed"]
    assert none_hash(algorithm).hex() == case["digest"]
    # The same seed given as an argument, with the environment saying otherwise.
    monkeypatch.setenv("PYTHONHASHSEED", "something else")
    assert none_hash(algorithm, case["seed"]).hex() == case["digest"]
    if case["seed"].isdigit():
        assert none_hash(algorithm, int(case["seed"])).hex() == case["digest"]


@pytest.mark.parametrize("case", VECTORS["random_seeds"], ids=vector_id)
def test_random_seed_has_vllms_shape_and_is_drawn_once(case, no_hash_seed):
    needs(case["algorithm"])
    seed = resolve_seed(case["algorithm"])
    assert len(seed) == case["hex_digits"] == 64 and re.fullmatch(r"[0-9a-f]+", seed)
    # vLLM draws anew on each call (and calls once per engine process); we draw once
    # per process, so every call in this process agrees.
    assert case["differs_between_calls"]
    assert resolve_seed(case["algorithm"]) == seed
    assert none_hash(case["algorithm"]) == hash_function(case["algorithm"])(seed)


@pytest.mark.parametrize("case", VECTORS["hash_block_tokens"], ids=vector_id)
def test_hash_block_tokens_matches_vllm(case):
    needs(case["algorithm"])
    parent = None if case["parent"] is None else bytes.fromhex(case["parent"])
    digest = hash_block_tokens(parent, case["token_ids"], tuples(case["extra_keys"]),
                               case["algorithm"], case["seed"])
    assert digest.hex() == case["digest"]
    assert len(digest) == digest_size(case["algorithm"])


@pytest.mark.parametrize("case", VECTORS["chains"], ids=vector_id)
def test_chain_matches_vllm(case, monkeypatch):
    needs(case["algorithm"])
    algorithm, block_size, seed = case["algorithm"], case["block_size"], case["seed"]
    tokens = case["token_ids"]
    extra = extra_keys_of(case["extra"])
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)

    hashes = hash_prompt(tokens, block_size, extra, algorithm)
    assert [h.hex() for h in hashes] == case["hashes"]
    assert len(hashes) == len(tokens) // block_size
    # The same from numpy arrays, and with the seed as an argument.
    monkeypatch.setenv("PYTHONHASHSEED", "not this one")
    seed_argument = case["none_hash_seed"]
    for dtype in (np.int64, np.int32, np.uint32):
        assert hash_prompt(np.array(tokens, dtype=dtype), block_size, extra, algorithm,
                           seed_argument) == hashes

    # Each block's extra keys, tagged (hashed) and untagged (published in events).
    blocks = range(len(hashes))
    keys = [None if extra is None else extra.for_block(k, block_size) for k in blocks]
    assert jsonable(keys) == case["block_extra_keys"]
    events = [None if extra is None else extra.event_keys(k, block_size) for k in blocks]
    assert jsonable(events) == (case["event_extra_keys"] or [])

    # Block by block, each hashing its parent.
    parent = None
    for k in blocks:
        parent = hash_block_tokens(parent, tokens[k * block_size:(k + 1) * block_size],
                                   keys[k], algorithm, seed_argument)
        assert parent == hashes[k]

    assert [event_block_hash(h) for h in hashes] == case["event_hashes"]["default"]
    assert [event_block_hash(h, "int") for h in hashes] == case["event_hashes"]["1"]
    assert [event_block_hash(h, "bytes").hex() for h in hashes] == case["event_hashes"]["0"]


@pytest.mark.parametrize("case", VECTORS["to_event_extra_keys"],
                         ids=lambda case: json.dumps(case["input"]))
def test_event_extra_keys_matches_vllm(case):
    assert [jsonable(event_extra_keys(tuples(keys))) for keys in case["input"]] == case["output"]


def test_the_rules_that_surprise():
    """vLLM's answers a reader might not guess, in the vectors and from pagetable alike."""
    chains = {(c["name"], c["algorithm"], c["block_size"]): c for c in VECTORS["chains"]
              if c["seed"] in (None, "0")}
    # An empty salt adds no key.
    assert chains["salt_empty", "sha256", 16]["block_extra_keys"] == [None, None, None]
    assert ExtraKeys(cache_salt="").for_block(0, 16) is None
    # An item begun in an earlier block keeps its offset, negative, in later blocks.
    assert chains["mm_spanning_blocks", "sha256", 16]["block_extra_keys"][1] == [["mm", "img-b", -11]]
    assert ExtraKeys(mm=[("img-b", 5, 30)]).for_block(1, 16) == (("mm", "img-b", -11),)
    # The events' LoRA key is the name alone; the hashed one carries the path too.
    lora = chains["lora", "sha256", 16]
    assert lora["block_extra_keys"][0] == [["lora", "sql-lora", "/adapters/sql-lora"]]
    assert lora["event_extra_keys"][0] == ["sql-lora"]
    assert ExtraKeys("sql-lora", "/adapters/sql-lora").event_keys(0, 16) == ("sql-lora",)
    # Blocks none of which has keys are published as a list of None, not as None.
    assert chains["none", "sha256", 16]["event_extra_keys"] == [None, None, None]
    assert [event_extra_keys(None)] * 3 == [None, None, None]


# ---------------------------------------------------------- seeds and algorithms

def test_algorithms_and_digest_sizes():
    assert ALGORITHMS == ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
    assert [digest_size(a) for a in ALGORITHMS] == [32, 32, 16, 16]
    for algorithm in ALGORITHMS:
        needs(algorithm)
        assert len(hash_function(algorithm)("x")) == digest_size(algorithm)


def test_seed_precedence(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert resolve_seed("sha256") == "42"
    assert resolve_seed("xxhash") == "42"
    assert resolve_seed("sha256", "7") == "7"
    assert resolve_seed("sha256", 7) == "7"
    assert resolve_seed("sha256", np.uint32(4294967295)) == "4294967295"
    monkeypatch.setenv("PYTHONHASHSEED", "")
    assert resolve_seed("sha256") == ""  # vLLM uses an empty PYTHONHASHSEED as it is
    monkeypatch.delenv("PYTHONHASHSEED")
    assert resolve_seed("sha256") == resolve_seed("sha256_cbor") == "vllm-none-hash"


def test_random_seed_is_one_per_process_and_yields_to_the_environment(no_hash_seed, monkeypatch):
    seed = resolve_seed("xxhash")
    assert resolve_seed("xxhash_cbor") == seed
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert resolve_seed("xxhash") == "0"
    monkeypatch.delenv("PYTHONHASHSEED")
    assert resolve_seed("xxhash") == seed


def test_random_seed_differs_between_processes(tmp_path):
    env = child_env()
    env.pop("PYTHONHASHSEED", None)
    code = ("from pagetable.prefix import resolve_seed; "
            "a = resolve_seed('xxhash'); assert resolve_seed('xxhash') == a; print(a)")
    # Outside the checkout, which would shadow the installed (compiled) package.
    seeds = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=tmp_path,
                            text=True, check=True, timeout=120).stdout.strip() for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in seeds), seeds
    assert seeds[0] != seeds[1]


# ------------------------------------------------------------ optional packages

@pytest.mark.parametrize("missing, algorithms", [
    ("xxhash", ["xxhash", "xxhash_cbor"]),
    ("cbor2", ["sha256_cbor", "xxhash_cbor"]),
])
def test_a_missing_package_says_how_to_install_it(missing, algorithms, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # import now fails as if absent
    for algorithm in algorithms:
        with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL_HINT)):
            hash_function(algorithm)
        with pytest.raises(ModuleNotFoundError, match=missing):
            hash_prompt([1, 2], 1, algorithm=algorithm)
    if missing == "xxhash":
        with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL_HINT)):
            dynamo_block_hash([1])
    # What needs no optional package still works.
    assert len(hash_prompt([1, 2], 1)) == 2
    sizes = {"sha256_cbor": 32, "xxhash": 16, "xxhash_cbor": 16}
    assert [digest_size(a) for a in algorithms] == [sizes[a] for a in algorithms]
    assert [resolve_seed(a, 5) for a in algorithms] == ["5", "5"]


def test_imports_without_xxhash_or_cbor2(tmp_path):
    code = ("import sys; sys.modules['xxhash'] = None; sys.modules['cbor2'] = None\n"
            "from pagetable import prefix\n"
            "assert prefix.none_hash('sha256', 'vllm-none-hash').hex().startswith('066b1e89')\n"
            "try:\n    prefix.hash_function('xxhash')\nexcept ModuleNotFoundError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                         cwd=tmp_path, text=True, check=True, timeout=120).stdout
    assert INSTALL_HINT in out


# -------------------------------------------------------------------- ExtraKeys

def test_extra_keys_is_an_immutable_value():
    keys = ExtraKeys("a", "/a", 2, [["img", 3, 4], ("vid", 9, 1)], "salt")
    assert keys.mm == (("img", 3, 4), ("vid", 9, 1))
    assert keys == ExtraKeys("a", "/a", 2, (("img", 3, 4), ("vid", 9, 1)), "salt")
    assert hash(keys) == hash(ExtraKeys("a", "/a", 2, (("img", 3, 4), ("vid", 9, 1)), "salt"))
    assert keys != ExtraKeys("a", "/a", 3, keys.mm, "salt")
    assert eval(repr(keys), {"ExtraKeys": ExtraKeys}) == keys
    assert pickle.loads(pickle.dumps(keys)) == keys
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.cache_salt = "other"  # type: ignore[misc]
    assert ExtraKeys(cache_salt="") == ExtraKeys()
    assert ExtraKeys().for_block(0, 16) is None
    assert ExtraKeys().event_keys(0, 16) is None


def test_extra_keys_hold_exact_python_values():
    keys = ExtraKeys(mm=[("img", np.int64(3), np.int32(4))])
    (identifier, offset, length), = keys.mm
    assert type(offset) is int and type(length) is int
    (key,) = keys.for_block(0, 4)
    assert key == ("mm", "img", 3) and type(key[2]) is int


def test_lora_keys_need_a_path():
    assert ExtraKeys("n", "/p").for_block(5, 16) == (("lora", "n", "/p"),)
    assert ExtraKeys("n", "/p").event_keys(5, 16) == ("n",)
    assert ExtraKeys("", "/p").for_block(0, 16) == (("lora", "", "/p"),)  # vLLM allows it


# ------------------------------------------------------------------- tokens

def test_token_ids_are_hashed_as_python_ints():
    # Why converting matters: pickle writes a numpy scalar unlike an int.
    assert pickle.dumps((np.int64(1),)) != pickle.dumps((1,))
    expected = hash_block_tokens(None, [1, 2, 3])
    for tokens in ([np.int64(1), np.int32(2), np.uint8(3)], (1, 2, 3), range(1, 4),
                   array.array("i", [1, 2, 3]), np.array([1, 2, 3], dtype=np.uint16),
                   np.array([1, 2, 3], dtype=object), np.array([0, 1, 2, 3])[1:],
                   np.array([3, 2, 1])[::-1]):
        assert hash_block_tokens(None, tokens) == expected, tokens
        assert hash_prompt(tokens, 3) == [expected], tokens


def test_partial_last_block_is_not_hashed():
    assert hash_prompt([1, 2, 3], 4) == []
    assert hash_prompt([], 4) == []
    assert len(hash_prompt(list(range(9)), 4)) == 2


def test_token_id_bounds():
    assert hash_block_tokens(None, [0, 2**31 - 1])
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 2147483648"):
        hash_block_tokens(None, [0, 2**31])
    with pytest.raises(ValueError, match=r"token_ids\[2\] = -1"):
        hash_prompt(np.array([5, 6, -1, 7]), 2)


# ---------------------------------------------------------------------- Dynamo

def test_dynamo_block_hash_known_answer():
    pytest.importorskip("xxhash")
    assert dynamo_block_hash([1, 2, 3, 4]) == 14643705804678351452
    assert dynamo_block_hash(np.array([1, 2, 3, 4], dtype=np.int64)) == 14643705804678351452


def test_dynamo_block_hashes_are_per_block_not_chained():
    xxhash = pytest.importorskip("xxhash")
    tokens = list(range(10))
    assert dynamo_block_hashes(tokens, 4) == [dynamo_block_hash(tokens[0:4]),
                                              dynamo_block_hash(tokens[4:8])]
    assert dynamo_block_hashes([1, 2, 3, 4] * 2, 4) == [14643705804678351452] * 2
    little_endian = b"".join(t.to_bytes(4, "little") for t in [2**32 - 1, 7])
    assert dynamo_block_hash([2**32 - 1, 7]) == xxhash.xxh3_64_intdigest(little_endian, seed=1337)
    assert dynamo_block_hashes([1, 2, 3], 4) == []


# ----------------------------------------------------------------------- events

def test_event_block_hash_is_the_low_64_bits_big_endian():
    digest = bytes(range(32))
    assert event_block_hash(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert event_block_hash(bytes(range(16))) == 0x08090A0B0C0D0E0F
    assert event_block_hash(b"\x01" + bytes(8)) == 0
    assert event_block_hash(digest, "bytes") == digest


# ------------------------------------------------------------------------ stats

def test_prefix_cache_stats():
    assert PrefixCacheStats().hit_rate == 0.0
    stats = PrefixCacheStats(requests=2, queries=64, hits=16, evictions=1)
    assert stats.hit_rate == 0.25
    assert stats == PrefixCacheStats(2, 64, 16, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 0  # type: ignore[misc]


# ------------------------------------------------------------------- bad input

BAD = [
    (lambda: hash_function("md5"), ValueError, "algorithm"),
    (lambda: hash_function(None), ValueError, "algorithm"),
    (lambda: digest_size("sha512"), ValueError, "algorithm"),
    (lambda: none_hash("SHA256"), ValueError, "algorithm"),
    (lambda: resolve_seed("sha256", 1.5), TypeError, "seed"),
    (lambda: resolve_seed("sha256", True), TypeError, "seed"),
    (lambda: resolve_seed("sha256", b"0"), TypeError, "seed"),
    (lambda: resolve_seed("sha256", -1), ValueError, "seed"),
    (lambda: resolve_seed("sha256", 2**32), ValueError, "seed"),
    (lambda: hash_block_tokens("ab", [1]), TypeError, "parent_block_hash"),
    (lambda: hash_block_tokens(bytearray(32), [1]), TypeError, "parent_block_hash"),
    (lambda: hash_block_tokens(bytes(16), [1]), ValueError, "parent_block_hash"),
    (lambda: hash_block_tokens(None, [1], extra_keys=[("mm", "a", 0)]), TypeError, "extra_keys"),
    (lambda: hash_block_tokens(None, [1], algorithm="md5"), ValueError, "algorithm"),
    (lambda: hash_block_tokens(None, []), ValueError, "token_ids"),
    (lambda: hash_block_tokens(None, [1, -1]), ValueError, r"token_ids\[1\]"),
    (lambda: hash_block_tokens(None, [2**64]), ValueError, r"token_ids\[0\]"),
    (lambda: hash_block_tokens(None, [1, 2.0]), TypeError, r"token_ids\[1\]"),
    (lambda: hash_block_tokens(None, [True]), TypeError, r"token_ids\[0\]"),
    (lambda: hash_block_tokens(None, [np.bool_(True)]), TypeError, r"token_ids\[0\]"),
    (lambda: hash_block_tokens(None, [[1]]), TypeError, r"token_ids\[0\]"),
    (lambda: hash_block_tokens(None, "12"), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, b"12"), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, {1, 2}), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, 5), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, np.ones((2, 2), dtype=np.int64)), ValueError, "token_ids"),
    (lambda: hash_block_tokens(None, np.array([1.0])), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, np.array([True])), TypeError, "token_ids"),
    (lambda: hash_block_tokens(None, np.array([1, 2**31], dtype=np.int64)), ValueError,
     r"token_ids\[1\]"),
    (lambda: hash_block_tokens(None, np.array([1, None], dtype=object)), TypeError,
     r"token_ids\[1\]"),
    (lambda: hash_prompt([1, 2], 0), ValueError, "block_size"),
    (lambda: hash_prompt([1, 2], "2"), TypeError, "block_size"),
    (lambda: hash_prompt([1, 2], 2.0), TypeError, "block_size"),
    (lambda: hash_prompt([1, 2], 2, extra_keys=(("mm", "a", 0),)), TypeError, "extra_keys"),
    (lambda: hash_prompt([1, 2], 2, seed=[0]), TypeError, "seed"),
    (lambda: ExtraKeys(lora_name=1, lora_path="/p"), TypeError, "lora_name"),
    (lambda: ExtraKeys(lora_name="n"), ValueError, "lora_path"),
    (lambda: ExtraKeys(lora_name="n", lora_path=""), ValueError, "lora_path"),
    (lambda: ExtraKeys(lora_name="n", lora_path=b"/p"), TypeError, "lora_path"),
    (lambda: ExtraKeys(lora_path="/p"), ValueError, "lora_name"),
    (lambda: ExtraKeys(lora_id=1), ValueError, "lora_name"),
    (lambda: ExtraKeys("n", "/p", lora_id=0), ValueError, "lora_id"),
    (lambda: ExtraKeys("n", "/p", lora_id="1"), TypeError, "lora_id"),
    (lambda: ExtraKeys("n", "/p", lora_id=True), TypeError, "lora_id"),
    (lambda: ExtraKeys(mm="img"), TypeError, "mm"),
    (lambda: ExtraKeys(mm=5), TypeError, "mm"),
    (lambda: ExtraKeys(mm=[("img", 0)]), TypeError, r"mm\[0\]"),
    (lambda: ExtraKeys(mm=["abc"]), TypeError, r"mm\[0\]"),
    (lambda: ExtraKeys(mm=[(7, 0, 1)]), TypeError, r"mm\[0\] identifier"),
    (lambda: ExtraKeys(mm=[("a", -1, 1)]), ValueError, r"mm\[0\] offset"),
    (lambda: ExtraKeys(mm=[("a", 0, 0)]), ValueError, r"mm\[0\] length"),
    (lambda: ExtraKeys(mm=[("a", 0.5, 1)]), TypeError, r"mm\[0\] offset"),
    (lambda: ExtraKeys(mm=[("a", 5, 1), ("b", 0, 1)]), ValueError, r"mm\[1\]"),
    (lambda: ExtraKeys(mm=[("a", 0, 5), ("b", 4, 1)]), ValueError, r"mm\[1\]"),
    (lambda: ExtraKeys(cache_salt=5), TypeError, "cache_salt"),
    (lambda: ExtraKeys().for_block(-1, 16), ValueError, "index"),
    (lambda: ExtraKeys().for_block(0.0, 16), TypeError, "index"),
    (lambda: ExtraKeys().for_block(0, 0), ValueError, "block_size"),
    (lambda: ExtraKeys().event_keys(0, -3), ValueError, "block_size"),
    (lambda: event_extra_keys([("mm", "a", 0)]), TypeError, "block_keys"),
    (lambda: event_extra_keys((("mm",),)), TypeError, r"block_keys\[0\]"),
    (lambda: event_block_hash("00"), TypeError, "digest"),
    (lambda: event_block_hash(b""), ValueError, "digest"),
    (lambda: event_block_hash(bytes(32), "hex"), ValueError, "format"),
    (lambda: dynamo_block_hash([2**32]), ValueError, r"token_ids\[0\]"),
    (lambda: dynamo_block_hash([]), ValueError, "token_ids"),
    (lambda: dynamo_block_hashes([1, 2], 0), ValueError, "block_size"),
    (lambda: PrefixCacheStats(requests=-1), ValueError, "requests"),
    (lambda: PrefixCacheStats(hits=1.5), TypeError, "hits"),
    (lambda: PrefixCacheStats(evictions=True), TypeError, "evictions"),
]


@pytest.mark.parametrize("call, error, name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_raises_naming_the_argument(call, error, name):
    if "dynamo" in call.__code__.co_names:
        pytest.importorskip("xxhash")
    with pytest.raises(error, match=name):
        call()


# -------------------------------------------------------------------- properties

TOKENS = st.lists(st.integers(0, 2**31 - 1), max_size=70)


@st.composite
def extra_keys(draw):
    """ExtraKeys with sorted, non-overlapping items (gaps of 0 included)."""
    items, position = [], draw(st.integers(0, 20))
    for i in range(draw(st.integers(0, 5))):
        length = draw(st.integers(1, 25))
        items.append((draw(st.sampled_from(["a", "b", "ü"])), position, length))
        position += length + draw(st.integers(0, 10))
    lora = draw(st.booleans())
    return ExtraKeys(lora_name="n" if lora else None, lora_path="/p" if lora else None,
                     mm=items, cache_salt=draw(st.sampled_from([None, "", "s"])))


@settings(max_examples=60, deadline=None)
@given(TOKENS, st.integers(1, 20), extra_keys(), st.sampled_from(ALGORITHMS))
def test_hash_prompt_is_the_chain_of_hash_block_tokens(tokens, block_size, keys, algorithm):
    needs(algorithm)
    hashes = hash_prompt(tokens, block_size, keys, algorithm, seed="0")
    parent = None
    for k, digest in enumerate(hashes):
        parent = hash_block_tokens(parent, tokens[k * block_size:(k + 1) * block_size],
                                   keys.for_block(k, block_size), algorithm, seed="0")
        assert digest == parent
    assert len(hashes) == len(tokens) // block_size
    # A prefix of the prompt hashes to a prefix of the hashes.
    cut = len(tokens) // 2
    assert hash_prompt(tokens[:cut], block_size, keys, algorithm, seed="0") == hashes[:cut // block_size]


@settings(max_examples=200, deadline=None)
@given(extra_keys(), st.integers(0, 40), st.integers(1, 20))
def test_for_block_is_the_contracts_overlap_rule(keys, index, block_size):
    start, stop = index * block_size, (index + 1) * block_size
    expected = []
    if keys.lora_name is not None:
        expected.append(("lora", keys.lora_name, keys.lora_path))
    expected += [("mm", identifier, offset - start) for identifier, offset, length in keys.mm
                 if offset < stop and offset + length > start]
    if index == 0 and keys.cache_salt:
        expected.append(("cache_salt", keys.cache_salt))
    assert keys.for_block(index, block_size) == (tuple(expected) or None)
    untagged = [key[1:] if key[0] == "mm" else key[1] for key in expected]
    assert keys.event_keys(index, block_size) == (tuple(untagged) or None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=8, max_size=40), st.integers(1, 8))
def test_a_salt_changes_every_block_and_its_absence_none(tokens, block_size):
    plain = hash_prompt(tokens, block_size)
    salted = hash_prompt(tokens, block_size, ExtraKeys(cache_salt="t"))
    assert all(a != b for a, b in zip(plain, salted))
    assert hash_prompt(tokens, block_size, ExtraKeys()) == plain
    assert hash_prompt(tokens, block_size, ExtraKeys(cache_salt="")) == plain
