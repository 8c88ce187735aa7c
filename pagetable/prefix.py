"""Block hashes for prefix caching, bit-identical to vLLM v0.33's.

A full block ``k`` of a sequence (tokens ``k*B .. k*B+B-1``) is named by a chained
hash, as ``docs/PREFIX_CACHING.md`` defines it::

    h[k] = H((parent, tuple(token_ids of block k), extra_keys[k]))
    parent = h[k-1] for k > 0, none_hash(algorithm, seed) for k == 0

``H`` is one of :data:`ALGORITHMS`: ``pickle.dumps(obj, protocol=HIGHEST_PROTOCOL)``
or ``cbor2.dumps(obj, canonical=True)``, then SHA-256 (32 bytes) or XXH3-128 (16
bytes).  The same bytes as vLLM's ``vllm.utils.hashing`` and
``vllm.v1.core.kv_cache_utils.hash_block_tokens`` come out for the same input, so a
router or a second engine that speaks vLLM's hashes recognises ours;
``tests/data/vllm_hash_vectors.json`` holds answers computed by vLLM 0.33.0's own
functions and ``tests/test_prefix_hashing.py`` checks every one.

:class:`ExtraKeys` holds what else a request's blocks depend on (LoRA adapter,
multimodal items, cache salt) and gives each block's extra keys in vLLM's tagged
form (:meth:`ExtraKeys.for_block`, what is hashed) and its untagged form
(:meth:`ExtraKeys.event_keys`, what KV events publish).  :func:`event_block_hash`
turns a digest into the hash an event carries, and :func:`dynamo_block_hash` computes
NVIDIA Dynamo's router-local block hash, which is a different thing.

Only ``sha256`` works on a plain install: the others need ``cbor2`` and/or
``xxhash`` (``pip install 'pagetable[prefix]'``).  Importing this module never
imports either; asking for an algorithm whose package is missing raises
:class:`ModuleNotFoundError`.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from pagetable._convert import INT32_MAX, as_index

__all__ = [
    "ALGORITHMS",
    "DEFAULT_SEED",
    "DYNAMO_SEED",
    "MAX_TOKEN_ID",
    "ExtraKeys",
    "PrefixCacheStats",
    "digest_size",
    "dynamo_block_hash",
    "dynamo_block_hashes",
    "event_block_hash",
    "event_extra_keys",
    "hash_block_tokens",
    "hash_function",
    "hash_prompt",
    "none_hash",
    "resolve_seed",
]

ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
"""The hash algorithms, by vLLM's names (``--prefix-caching-hash-algo``)."""

DEFAULT_SEED = "vllm-none-hash"
"""The seed of the first block's parent for the SHA-256 algorithms when none is set."""

DYNAMO_SEED = 1337
"""The XXH3-64 seed of Dynamo's router-local block hash."""

MAX_TOKEN_ID = INT32_MAX
"""The largest token id a block may hold (token ids are ``0 .. 2**31 - 1``)."""

_MAX_HASH_SEED = 2**32 - 1  # what PYTHONHASHSEED may hold as an integer
_MAX_U32 = 2**32 - 1        # Dynamo hashes token ids as u32
_INSTALL_HINT = "pip install 'pagetable[prefix]'"

# algorithm -> (serialisation, digest, digest size in bytes)
_SPECS = {
    "sha256": ("pickle", "sha256", 32),
    "sha256_cbor": ("cbor", "sha256", 32),
    "xxhash": ("pickle", "xxh3_128", 16),
    "xxhash_cbor": ("cbor", "xxh3_128", 16),
}

# The random seed of the xxhash algorithms, drawn on first use and kept for the life
# of the process (vLLM draws one per engine process, for the same reason: XXH3 is not
# collision resistant, so its seed must not be predictable).
_random_seed: str | None = None
_random_seed_lock = threading.Lock()


# ------------------------------------------------------------ algorithms and seeds

def _check_algorithm(algorithm: object) -> str:
    if not isinstance(algorithm, str) or algorithm not in _SPECS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return algorithm


def _require(module: str, attribute: str, algorithm: str) -> ModuleType:
    """Import an optional dependency, or say how to install it."""
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(
            f"the {algorithm!r} hash needs the {module} package: {_INSTALL_HINT}",
            name=module,
        ) from None
    if not hasattr(loaded, attribute):
        raise ImportError(
            f"the {algorithm!r} hash needs a {module} with {attribute} "
            f"(xxhash>=3.1, cbor2>=5.4): {_INSTALL_HINT}",
            name=module,
        )
    return loaded


def hash_function(algorithm: str) -> Callable[[object], bytes]:
    """The function that serialises an object and hashes it, as vLLM's of that name.

    Parameters
    ----------
    algorithm : str
        One of :data:`ALGORITHMS`.

    Returns
    -------
    Callable[[object], bytes]
        ``sha256`` and ``xxhash`` serialise with
        ``pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)``, ``sha256_cbor`` and
        ``xxhash_cbor`` with ``cbor2.dumps(obj, canonical=True)``; the digest is
        SHA-256 (32 bytes) or XXH3-128 (16 bytes, ``xxhash.xxh3_128_digest``).

    Raises
    ------
    ValueError
        ``algorithm`` is not one of :data:`ALGORITHMS`.
    ModuleNotFoundError
        The algorithm needs ``cbor2`` or ``xxhash`` and it is not installed.
    """
    serialisation, digest, _ = _SPECS[_check_algorithm(algorithm)]
    # The optional packages are looked up on every call (a dict lookup once imported),
    # and bound into the returned function, so hashing a block imports nothing.
    if serialisation == "cbor":
        cbor_dumps = _require("cbor2", "dumps", algorithm).dumps
    if digest == "xxh3_128":
        xxh3_128 = _require("xxhash", "xxh3_128_digest", algorithm).xxh3_128_digest

    protocol = pickle.HIGHEST_PROTOCOL
    sha256 = hashlib.sha256
    if algorithm == "sha256":
        def hash_object(obj: object) -> bytes:
            return sha256(pickle.dumps(obj, protocol=protocol)).digest()
    elif algorithm == "sha256_cbor":
        def hash_object(obj: object) -> bytes:
            return sha256(cbor_dumps(obj, canonical=True)).digest()
    elif algorithm == "xxhash":
        def hash_object(obj: object) -> bytes:
            return xxh3_128(pickle.dumps(obj, protocol=protocol))  # type: ignore[no-any-return]
    else:
        def hash_object(obj: object) -> bytes:
            return xxh3_128(cbor_dumps(obj, canonical=True))  # type: ignore[no-any-return]
    hash_object.__name__ = hash_object.__qualname__ = algorithm
    return hash_object


def digest_size(algorithm: str) -> int:
    """Bytes in a digest of ``algorithm``: 32 for the SHA-256 ones, 16 for XXH3-128.

    Raises
    ------
    ValueError
        ``algorithm`` is not one of :data:`ALGORITHMS`.
    """
    return _SPECS[_check_algorithm(algorithm)][2]


def _process_random_seed() -> str:
    global _random_seed
    with _random_seed_lock:
        if _random_seed is None:
            _random_seed = os.urandom(32).hex()
        return _random_seed


def resolve_seed(algorithm: str, seed: str | int | None = None) -> str:
    """The seed the first block's parent hash is derived from, as vLLM resolves it.

    In order: ``seed`` when given; else ``$PYTHONHASHSEED`` when set (read on every
    call, used as the string it is, an empty one included, as vLLM reads it); else
    :data:`DEFAULT_SEED` (``"vllm-none-hash"``) for ``sha256`` and ``sha256_cbor``;
    else, for the xxhash algorithms, 32 random bytes as 64 hex digits, drawn once per
    process and returned by every later call.

    Parameters
    ----------
    algorithm : str
        One of :data:`ALGORITHMS`.
    seed : str, int or None
        A ``str`` is used as it is.  An ``int`` in ``0 .. 2**32 - 1`` (what
        ``PYTHONHASHSEED`` may hold) is written in decimal, as it would read in the
        environment: ``0`` gives ``"0"``.

    Raises
    ------
    ValueError
        ``algorithm`` is unknown, or ``seed`` is an int out of range.
    TypeError
        ``seed`` is neither a str, an int nor None (a bool is refused).
    """
    _check_algorithm(algorithm)
    if seed is None:
        from_environment = os.environ.get("PYTHONHASHSEED")
        if from_environment is not None:
            return from_environment
        if _SPECS[algorithm][1] == "sha256":
            return DEFAULT_SEED
        return _process_random_seed()
    if isinstance(seed, str):
        return str.__str__(seed)  # an exact str: a subclass would pickle differently
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be a str, an int or None, not bool ({seed!r})")
    try:
        value = as_index(seed, "seed")
    except TypeError:
        raise TypeError(
            f"seed must be a str, an int or None, got {type(seed).__name__} {seed!r}"
        ) from None
    if not 0 <= value <= _MAX_HASH_SEED:
        raise ValueError(f"seed must be in 0..{_MAX_HASH_SEED} as an int, got {value}")
    return str(int(value))


def none_hash(algorithm: str, seed: str | int | None = None) -> bytes:
    """The parent hash of every sequence's first block: ``H(resolve_seed(...))``.

    vLLM's ``NONE_HASH`` after ``init_none_hash``.  Parameters and errors are those of
    :func:`resolve_seed` and :func:`hash_function`.
    """
    hash_object = hash_function(algorithm)
    return hash_object(resolve_seed(algorithm, seed))


# ------------------------------------------------------------------------- tokens

def _token_list(token_ids: object, name: str, high: int = MAX_TOKEN_ID) -> list[int]:
    """``token_ids`` as a list of exact Python ints in ``0 .. high``.

    Exact ints matter: pickle writes a numpy scalar, a bool or an int subclass
    differently from the int of the same value, and the hash would change.
    """
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got an array of shape {token_ids.shape}")
        kind = token_ids.dtype.kind
        if kind in "iu":
            bad = np.flatnonzero((token_ids < 0) | (token_ids > high))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"{name}[{i}] = {token_ids[i]} is out of range 0..{high}")
            return token_ids.tolist()  # type: ignore[no-any-return]
        if kind != "O":
            raise TypeError(f"{name} must hold integers, got dtype {token_ids.dtype}")
        values = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes, bytearray)) or not isinstance(token_ids, Sequence):
        raise TypeError(
            f"{name} must be a 1-D sequence or numpy array of ints, "
            f"got {type(token_ids).__name__}"
        )
    else:
        values = list(token_ids)
    if not all(type(v) is int for v in values):
        for i, v in enumerate(values):
            if type(v) is int:
                continue
            if isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name}[{i}] must be an integer, not bool ({v!r})")
            values[i] = int(as_index(v, f"{name}[{i}]"))
    if values and (min(values) < 0 or max(values) > high):
        i = next(i for i, v in enumerate(values) if not 0 <= v <= high)
        raise ValueError(f"{name}[{i}] = {values[i]} is out of range 0..{high}")
    return values


def _block_size(block_size: object) -> int:
    value = int(as_index(block_size, "block_size"))
    if value < 1:
        raise ValueError(f"block_size must be >= 1, got {value}")
    return value


# --------------------------------------------------------------------- extra keys

def _optional_str(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__} {value!r}")
    return str.__str__(value)


def _multimodal_items(mm: object) -> tuple[tuple[str, int, int], ...]:
    if isinstance(mm, (str, bytes)) or not isinstance(mm, Iterable):
        raise TypeError(
            f"mm must be a sequence of (identifier, offset, length), got {type(mm).__name__}"
        )
    items: list[tuple[str, int, int]] = []
    for i, item in enumerate(mm):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
            raise TypeError(f"mm[{i}] must be (identifier, offset, length), got {item!r}")
        identifier, offset, length = item
        if not isinstance(identifier, str):
            raise TypeError(
                f"mm[{i}] identifier must be a str, got {type(identifier).__name__} {identifier!r}"
            )
        offset = int(as_index(offset, f"mm[{i}] offset"))
        length = int(as_index(length, f"mm[{i}] length"))
        if offset < 0:
            raise ValueError(f"mm[{i}] offset must be >= 0, got {offset}")
        if length < 1:
            raise ValueError(f"mm[{i}] length must be >= 1, got {length}")
        if items and offset < items[-1][1] + items[-1][2]:
            raise ValueError(
                f"mm[{i}] (offset {offset}) must start at or after the end of mm[{i - 1}] "
                f"(offset {items[-1][1]} + length {items[-1][2]}): items are sorted by "
                f"offset and do not overlap"
            )
        items.append((str.__str__(identifier), offset, length))
    return tuple(items)


@dataclass(frozen=True, slots=True)
class ExtraKeys:
    """What a request's block hashes depend on besides its tokens, as vLLM v0.33 keys it.

    Parameters
    ----------
    lora_name, lora_path : str or None
        The LoRA adapter's name and path (vLLM's ``LoRARequest.lora_name`` and
        ``lora_path``), both hashed; both None without an adapter.  vLLM refuses an
        adapter with an empty path (``LoRARequest`` asserts ``lora_path``), so an
        adapter needs a non-empty ``lora_path`` here too.
    lora_id : int or None
        The adapter's integer id (``lora_int_id``, >= 1 as vLLM requires).  Not hashed:
        KV events carry it (``BlockStored.lora_id``).  Optional even with an adapter.
    mm : sequence of (identifier, offset, length)
        Multimodal items: the item's cache identifier (vLLM's
        ``MultiModalFeatureSpec.identifier``) and its placeholder's token range
        (``mm_position.offset`` >= 0 and ``length`` >= 1).  They must be given sorted by
        offset and must not overlap, which vLLM assumes of its ``mm_features`` without
        checking (its key generator gives other keys for overlapping items).  Stored as
        a tuple of ``(str, int, int)``.
    cache_salt : str or None
        Hashed into block 0 only.  vLLM adds no key for an empty salt, so ``""`` is
        stored as None: ``ExtraKeys(cache_salt="") == ExtraKeys()``.

    Notes
    -----
    A block's keys (:meth:`for_block`) are, in this order: ``("lora", lora_name,
    lora_path)`` with an adapter; ``("mm", identifier, offset - k*B)`` for each item
    overlapping tokens ``k*B .. k*B+B-1``, so that an item begun in an earlier block
    has a negative offset; ``("cache_salt", salt)`` on block 0.  No key at all gives
    None, never an empty tuple.  vLLM's prompt-embeddings keys are not modelled.
    These are exactly ``vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys``
    for a request without prompt embeddings, and :meth:`event_keys` is
    ``to_event_extra_keys`` of them.
    """

    lora_name: str | None = None
    lora_path: str | None = None
    lora_id: int | None = None
    mm: Sequence[tuple[str, int, int]] = ()  # stored as a tuple of tuples
    cache_salt: str | None = None
    # The end (offset + length) of each item, ascending: the first item overlapping a
    # block is found by bisection instead of a scan from the first item.
    _mm_ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        lora_name = _optional_str(self.lora_name, "lora_name")
        lora_path = _optional_str(self.lora_path, "lora_path")
        lora_id = self.lora_id
        if lora_id is not None:
            lora_id = int(as_index(lora_id, "lora_id"))
            if lora_id < 1:
                raise ValueError(f"lora_id must be >= 1, got {lora_id}")
        if lora_name is None:
            if lora_path is not None or lora_id is not None:
                raise ValueError("lora_path and lora_id need a lora_name (the adapter's name)")
        elif not lora_path:
            raise ValueError(
                f"lora_path must be a non-empty str with lora_name={lora_name!r}, "
                f"got {lora_path!r}"
            )
        cache_salt = _optional_str(self.cache_salt, "cache_salt") or None
        mm = _multimodal_items(self.mm)
        set_field(self, "lora_name", lora_name)
        set_field(self, "lora_path", lora_path)
        set_field(self, "lora_id", lora_id)
        set_field(self, "mm", mm)
        set_field(self, "cache_salt", cache_salt)
        set_field(self, "_mm_ends", tuple(offset + length for _, offset, length in mm))

    def _keys(self, index: int, block_size: int) -> tuple[tuple[object, ...], ...] | None:
        """:meth:`for_block` without checking its arguments."""
        keys: list[tuple[object, ...]] = []
        if self.lora_name is not None:
            keys.append(("lora", self.lora_name, self.lora_path))
        start = index * block_size
        stop = start + block_size
        mm = self.mm
        i = bisect.bisect_right(self._mm_ends, start)
        while i < len(mm) and mm[i][1] < stop:
            keys.append(("mm", mm[i][0], mm[i][1] - start))
            i += 1
        if index == 0 and self.cache_salt is not None:
            keys.append(("cache_salt", self.cache_salt))
        return tuple(keys) if keys else None

    def for_block(self, index: int, block_size: int) -> tuple[tuple[object, ...], ...] | None:
        """The tagged extra keys of block ``index`` (what :func:`hash_block_tokens` hashes).

        Parameters
        ----------
        index : int
            The block's index in its sequence (>= 0).
        block_size : int
            Tokens per block (>= 1).

        Returns
        -------
        tuple or None
            ``("lora", name, path)``, then ``("mm", identifier, offset - index *
            block_size)`` per overlapping item, then ``("cache_salt", salt)`` on block
            0; None when there are none.
        """
        block_size = _block_size(block_size)
        index = int(as_index(index, "index"))
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return self._keys(index, block_size)

    def _to_json(self) -> dict[str, object]:
        """The fields as JSON-ready values (a saved manager's state holds them)."""
        return {"lora_name": self.lora_name, "lora_path": self.lora_path,
                "lora_id": self.lora_id, "mm": [list(item) for item in self.mm],
                "cache_salt": self.cache_salt}

    @staticmethod
    def _from_json(fields: object) -> "ExtraKeys":
        """The ExtraKeys ``_to_json`` gave ``fields`` of; raises on anything else."""
        if not isinstance(fields, dict) or set(fields) != {
                "lora_name", "lora_path", "lora_id", "mm", "cache_salt"}:
            raise ValueError(f"not the fields of an ExtraKeys: {fields!r}")
        mm = fields["mm"]
        if not isinstance(mm, list) or not all(isinstance(item, list) for item in mm):
            raise ValueError(f"mm must be a list of [identifier, offset, length], got {mm!r}")
        return ExtraKeys(fields["lora_name"], fields["lora_path"], fields["lora_id"],
                         [tuple(item) for item in mm], fields["cache_salt"])

    def event_keys(self, index: int, block_size: int) -> tuple[object, ...] | None:
        """The untagged extra keys of block ``index``, as vLLM's KV events publish them.

        vLLM's ``to_event_extra_keys``: the LoRA name alone (not its path), each
        multimodal key as an ``(identifier, offset)`` pair, the salt alone; None when
        :meth:`for_block` is None.  Arguments as :meth:`for_block`.
        """
        return event_extra_keys(self.for_block(index, block_size))


def event_extra_keys(block_keys: tuple[tuple[object, ...], ...] | None) -> tuple[object, ...] | None:
    """One block's tagged extra keys in the untagged form KV events publish.

    vLLM's ``to_event_extra_keys`` for one entry: ``("mm", identifier, offset)``
    becomes the pair ``(identifier, offset)``, any other key its value alone
    (``("lora", name, path)`` gives ``name``, ``("cache_salt", salt)`` gives ``salt``).

    Parameters
    ----------
    block_keys : tuple of tagged keys, or None
        As :meth:`ExtraKeys.for_block` returns them.

    Returns
    -------
    tuple or None
        None for None.

    Raises
    ------
    TypeError
        ``block_keys`` is not None or a tuple of non-empty tuples whose first item is
        a str tag.
    """
    if block_keys is None:
        return None
    if not isinstance(block_keys, tuple):
        raise TypeError(f"block_keys must be a tuple or None, got {type(block_keys).__name__}")
    for i, key in enumerate(block_keys):
        if not isinstance(key, tuple) or len(key) < 2 or not isinstance(key[0], str):
            raise TypeError(f"block_keys[{i}] must be a tagged key such as ('mm', id, offset), got {key!r}")
    return tuple(key[1:] if key[0] == "mm" else key[1] for key in block_keys)


# ---------------------------------------------------------------- block hashes

def hash_block_tokens(
    parent_block_hash: bytes | None,
    token_ids: object,
    extra_keys: tuple[object, ...] | None = None,
    algorithm: str = "sha256",
    seed: str | int | None = None,
) -> bytes:
    """The hash of one block: ``H((parent, tuple(token_ids), extra_keys))``.

    vLLM's ``hash_block_tokens``, with the hash function named and the first block's
    parent derived here instead of read from a process-wide ``NONE_HASH``.

    Parameters
    ----------
    parent_block_hash : bytes or None
        The previous block's hash; None or ``b""`` for a sequence's first block, whose
        parent is :func:`none_hash` ``(algorithm, seed)``.  Otherwise it must be a
        digest of ``algorithm`` (:func:`digest_size` bytes).
    token_ids : sequence of int or numpy array
        The block's tokens (at least one), each in ``0 .. 2**31 - 1``; hashed as a
        tuple of Python ints.
    extra_keys : tuple or None
        The block's extra keys, e.g. :meth:`ExtraKeys.for_block`; hashed as given.
    algorithm : str
        One of :data:`ALGORITHMS`.
    seed : str, int or None
        The seed of the first block's parent (:func:`resolve_seed`); unused otherwise.

    Returns
    -------
    bytes
        The block's digest.

    Raises
    ------
    TypeError
        An argument of the wrong type (the message names it).
    ValueError
        An unknown ``algorithm``, a parent of the wrong length, no tokens, or a token
        id out of range (named as ``token_ids[i]``).
    """
    hash_object = hash_function(algorithm)
    if parent_block_hash is not None and not isinstance(parent_block_hash, bytes):
        raise TypeError(
            f"parent_block_hash must be bytes or None, got {type(parent_block_hash).__name__}"
        )
    if extra_keys is not None and not isinstance(extra_keys, tuple):
        raise TypeError(f"extra_keys must be a tuple or None, got {type(extra_keys).__name__}")
    tokens = _token_list(token_ids, "token_ids")
    if not tokens:
        raise ValueError("token_ids must hold at least one token")
    if not parent_block_hash:
        parent = hash_object(resolve_seed(algorithm, seed))
    else:
        if len(parent_block_hash) != _SPECS[algorithm][2]:
            raise ValueError(
                f"parent_block_hash must be a {_SPECS[algorithm][2]}-byte {algorithm} "
                f"digest, got {len(parent_block_hash)} bytes"
            )
        parent = bytes(parent_block_hash)  # a bytes subclass would pickle differently
    return hash_object((parent, tuple(tokens), extra_keys))


def hash_prompt(
    token_ids: object,
    block_size: int,
    extra_keys: ExtraKeys | None = None,
    algorithm: str = "sha256",
    seed: str | int | None = None,
) -> list[bytes]:
    """The chained hashes of every full block of a prompt, block 0 first.

    ``len(token_ids) // block_size`` digests; a partial last block has none.  Equal to
    vLLM's ``get_request_block_hasher(block_size, hash_fn)`` over a request of these
    tokens and extra keys.

    Parameters
    ----------
    token_ids : sequence of int or numpy array
        The prompt, each id in ``0 .. 2**31 - 1``.
    block_size : int
        Tokens per block (>= 1).
    extra_keys : ExtraKeys or None
        The request's LoRA adapter, multimodal items and cache salt.
    algorithm : str
        One of :data:`ALGORITHMS`.
    seed : str, int or None
        The seed of block 0's parent (:func:`resolve_seed`).

    Returns
    -------
    list of bytes
        ``h[0], h[1], ...``, each hashing the one before.

    Raises
    ------
    TypeError, ValueError
        As :func:`hash_block_tokens`; ``extra_keys`` that is not an :class:`ExtraKeys`
        raises TypeError.
    """
    hash_object = hash_function(algorithm)
    block_size = _block_size(block_size)
    if extra_keys is not None and not isinstance(extra_keys, ExtraKeys):
        raise TypeError(
            f"extra_keys must be an ExtraKeys or None, got {type(extra_keys).__name__}"
        )
    tokens = _token_list(token_ids, "token_ids")
    parent = hash_object(resolve_seed(algorithm, seed))
    hashes: list[bytes] = []
    for index in range(len(tokens) // block_size):
        start = index * block_size
        keys = None if extra_keys is None else extra_keys._keys(index, block_size)
        parent = hash_object((parent, tuple(tokens[start:start + block_size]), keys))
        hashes.append(parent)
    return hashes


def event_block_hash(digest: bytes, format: str = "int") -> int | bytes:
    """The block hash a KV event carries for ``digest``.

    Parameters
    ----------
    digest : bytes
        A block's digest.
    format : {"int", "bytes"}
        ``"int"``: the low 64 bits of the digest read big-endian,
        ``int.from_bytes(digest, "big") & (2**64 - 1)``, as vLLM publishes by default
        (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, its ``maybe_convert_block_hash``);
        ``"bytes"``: the digest itself.

    Raises
    ------
    TypeError
        ``digest`` is not bytes.
    ValueError
        ``digest`` is empty, or ``format`` is neither ``"int"`` nor ``"bytes"``.
    """
    if not isinstance(digest, bytes):
        raise TypeError(f"digest must be bytes, got {type(digest).__name__}")
    if not digest:
        raise ValueError("digest must not be empty")
    if format == "int":
        return int.from_bytes(digest, "big") & (2**64 - 1)
    if format == "bytes":
        return bytes(digest)
    raise ValueError(f"format must be 'int' or 'bytes', got {format!r}")


# ---------------------------------------------------------------------- Dynamo

def _xxh3_64(algorithm: str) -> Callable[..., int]:
    return _require("xxhash", "xxh3_64_intdigest", algorithm).xxh3_64_intdigest  # type: ignore[no-any-return]


def dynamo_block_hash(token_ids: object) -> int:
    """NVIDIA Dynamo's router-local hash of one block: XXH3-64, seed 1337, over u32 LE tokens.

    Not chained and not vLLM's hash: Dynamo's KV router hashes each block's tokens on
    their own to match what workers report.  ``[1, 2, 3, 4]`` gives
    ``14643705804678351452``.

    Parameters
    ----------
    token_ids : sequence of int or numpy array
        The block's tokens (at least one), each in ``0 .. 2**32 - 1``.

    Raises
    ------
    TypeError, ValueError
        A bad ``token_ids`` (named, as ``token_ids[i]`` for one bad id).
    ModuleNotFoundError
        ``xxhash`` is not installed.
    """
    xxh3_64 = _xxh3_64("dynamo")
    tokens = _token_list(token_ids, "token_ids", _MAX_U32)
    if not tokens:
        raise ValueError("token_ids must hold at least one token")
    return xxh3_64(np.array(tokens, dtype="<u4").tobytes(), seed=DYNAMO_SEED)


def dynamo_block_hashes(token_ids: object, block_size: int) -> list[int]:
    """:func:`dynamo_block_hash` of every full block of ``token_ids``, block 0 first.

    Raises
    ------
    TypeError, ValueError
        A bad ``token_ids`` or ``block_size`` (named).
    ModuleNotFoundError
        ``xxhash`` is not installed.
    """
    xxh3_64 = _xxh3_64("dynamo")
    block_size = _block_size(block_size)
    tokens = _token_list(token_ids, "token_ids", _MAX_U32)
    data = memoryview(np.array(tokens, dtype="<u4").tobytes())
    step = 4 * block_size
    return [xxh3_64(data[start:start + step], seed=DYNAMO_SEED)
            for start in range(0, (len(tokens) // block_size) * step, step)]


# ------------------------------------------------------------------------ stats

@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache counters of a KV-cache manager since it was made.

    Parameters
    ----------
    requests : int
        Prompts looked up (``add_sequence`` calls).
    queries : int
        Prompt tokens looked up.
    hits : int
        Of those, tokens found cached.
    evictions : int
        Cached blocks evicted to make room.
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0
    evictions: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "queries", "hits", "evictions"):
            value = int(as_index(getattr(self, name), name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)

    @property
    def hit_rate(self) -> float:
        """``hits / queries``; 0.0 before any query."""
        return self.hits / self.queries if self.queries else 0.0
