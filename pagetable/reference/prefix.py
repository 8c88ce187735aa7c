"""Block hashes and extra keys of prefix caching, written out plainly for the model.

Everything here follows ``docs/PREFIX_CACHING.md`` line by line and shares no code
with :mod:`pagetable.prefix`, so that the tests compare two independent readings of
the contract.  Nothing is cached or tuned: every hash is serialised and digested on
the spot.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Callable

HASH_ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
EVENT_HASH_FORMATS = ("int", "bytes")
TOKEN_ID_MAX = 2**31 - 1

# The seed of the xxhash algorithms when neither hash_seed nor $PYTHONHASHSEED is
# given: drawn once per process, the first time a model needs it.
_process_seed: str | None = None


def _pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: object) -> bytes:
    import cbor2  # only the CBOR algorithms need it

    return cbor2.dumps(obj, canonical=True)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh3_128(data: bytes) -> bytes:
    import xxhash  # only the xxhash algorithms need it

    return xxhash.xxh3_128_digest(data)


_SERIALISE_AND_DIGEST: dict[str, tuple[Callable[[object], bytes], Callable[[bytes], bytes]]] = {
    "sha256": (_pickled, _sha256),
    "sha256_cbor": (_cbor, _sha256),
    "xxhash": (_pickled, _xxh3_128),
    "xxhash_cbor": (_cbor, _xxh3_128),
}


def hash_function(algorithm: str) -> Callable[[object], bytes]:
    """``H`` of the contract: serialise the object, digest the bytes."""
    if algorithm not in _SERIALISE_AND_DIGEST:
        raise ValueError(f"hash_algorithm must be one of {', '.join(HASH_ALGORITHMS)}, got {algorithm!r}")
    serialise, digest = _SERIALISE_AND_DIGEST[algorithm]
    return lambda obj: digest(serialise(obj))


def none_hash_seed(algorithm: str, hash_seed: str | int | None) -> str:
    """The string whose hash is NONE_HASH, the parent of every block 0."""
    global _process_seed
    if isinstance(hash_seed, str):
        return str.__str__(hash_seed)   # a str subclass would pickle as its class
    if hash_seed is not None:
        # An int is read as $PYTHONHASHSEED would hold it: in decimal, 0..2**32-1.
        if isinstance(hash_seed, bool) or not isinstance(hash_seed, int):
            raise TypeError(f"hash_seed must be a str, an int or None, got {type(hash_seed).__name__}")
        if not 0 <= hash_seed <= 2**32 - 1:
            raise ValueError(f"hash_seed must be in 0..4294967295 as an int, got {hash_seed}")
        return str(hash_seed)
    environment = os.environ.get("PYTHONHASHSEED")
    if environment is not None:
        return environment
    if algorithm in ("sha256", "sha256_cbor"):
        return "vllm-none-hash"
    if _process_seed is None:
        _process_seed = os.urandom(32).hex()
    return _process_seed


def _request_keys(extra_keys: Any) -> tuple[Any, Any, Any, list[tuple[Any, int, int]], Any]:
    """(lora_name, lora_path, lora_id, mm items, cache_salt) of any object with those
    attributes (``pagetable.prefix.ExtraKeys`` or a stand-in); all absent for None."""
    if extra_keys is None:
        return None, None, None, [], None
    mm = [(identifier, int(offset), int(length)) for identifier, offset, length in (extra_keys.mm or ())]
    return extra_keys.lora_name, extra_keys.lora_path, extra_keys.lora_id, mm, extra_keys.cache_salt


def _overlapping(mm: list[tuple[Any, int, int]], k: int, block_size: int) -> list[tuple[Any, int]]:
    """(identifier, offset within block k) of every item overlapping block k, in order."""
    start, stop = k * block_size, k * block_size + block_size
    return [(identifier, offset - start) for identifier, offset, length in mm
            if offset < stop and offset + length > start]


def block_extra_keys(extra_keys: Any, k: int, block_size: int) -> tuple[Any, ...] | None:
    """``extra_keys[k]``: the tagged keys that enter block k's hash, or None."""
    lora_name, lora_path, _, mm, salt = _request_keys(extra_keys)
    keys: list[tuple[Any, ...]] = []
    if lora_name is not None:
        keys.append(("lora", lora_name, lora_path))
    for identifier, offset in _overlapping(mm, k, block_size):
        keys.append(("mm", identifier, offset))
    if k == 0 and salt:
        keys.append(("cache_salt", salt))
    return tuple(keys) if keys else None


def event_extra_keys(extra_keys: Any, k: int, block_size: int) -> tuple[Any, ...] | None:
    """Block k's entry in ``BlockStored.extra_keys``: the same keys without their tags."""
    lora_name, _, _, mm, salt = _request_keys(extra_keys)
    entry: list[Any] = []
    if lora_name is not None:
        entry.append(lora_name)
    entry.extend(_overlapping(mm, k, block_size))
    if k == 0 and salt:
        entry.append(salt)
    return tuple(entry) if entry else None


def lora_of(extra_keys: Any) -> tuple[Any, Any]:
    """(lora_id, lora_name) for a BlockStored event."""
    lora_name, _, lora_id, _, _ = _request_keys(extra_keys)
    return lora_id, lora_name


def event_hash(block_hash: bytes, event_hash_format: str) -> int | bytes:
    """A hash as events carry it: the low 64 bits read big-endian, or the raw bytes."""
    if event_hash_format == "bytes":
        return block_hash
    return int.from_bytes(block_hash, "big") & (2**64 - 1)
