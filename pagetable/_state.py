"""Saved state: one versioned on-disk format of plain arrays, validated on every load.

Every stateful class (:class:`~pagetable.PageTable`, :class:`~pagetable.BlockAllocator`,
:class:`~pagetable.KVCacheManager`) saves itself as a dict of integer arrays.  The same
dict is what pickling and copying carry, so a file, a pickle and a copy are all rebuilt
through the one validating path below.

File format (version 1)
-----------------------
An uncompressed ``.npz`` archive (a ZIP of ``.npy`` members, as :func:`numpy.savez`
writes it) holding:

* ``format``: the string ``"pagetable"``;  ``version``: int64, ``1``;
  ``kind``: ``"PageTable"``, ``"BlockAllocator"`` or ``"KVCacheManager"``;
* a PageTable: ``block_size`` (scalar), ``seq_ids`` (int64, insertion order),
  ``lengths`` (blocks of each sequence), ``blocks`` (int32, every sequence's blocks in
  order, concatenated);
* a BlockAllocator: ``num_blocks`` (scalar), ``refcount`` (int32 per block),
  ``free_stack`` (int32, bottom to top: the last entry is handed out next);
* a KVCacheManager: all of the above plus ``tokens`` (tokens held by each sequence).

Change stamps (:meth:`PageTable.versions`) are not saved: a loaded table starts new
ones, and a device mirror of it re-uploads everything on its first sync.

Reading never unpickles and never trusts a size it has not checked: each member must
be a stored (uncompressed) ``.npy`` of a plain integer or string dtype whose header
agrees with the member's length.  Then every value is checked before any object is
built.  A file or pickle that fails any check raises :class:`CorruptStateError`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import IO, Callable, Union

import numpy as np

from pagetable._convert import INT32_MAX, INT64_MAX

FORMAT = "pagetable"
VERSION = 1
KINDS = ("PageTable", "BlockAllocator", "KVCacheManager")
MAX_SEQUENCES = 2**30  # what a PageTable can hold

# Members: name -> dtype kinds allowed.  Anything else in a file is refused.
_MEMBERS = {
    "format": "U", "version": "iu", "kind": "U",
    "block_size": "iu", "seq_ids": "iu", "lengths": "iu", "blocks": "iu",
    "num_blocks": "iu", "refcount": "iu", "free_stack": "iu", "tokens": "iu",
    # a prefix-caching KVCacheManager's cache (see prefix_state)
    "prefix_lru_count": "iu", "prefix_algorithm": "U", "prefix_seed": "U",
    "prefix_medium": "U", "prefix_options": "iu", "prefix_hashes": "u",
    "prefix_parents": "u", "prefix_known": "u", "prefix_tokens": "iu", "prefix_cached": "u",
    "prefix_stats": "iu", "prefix_extra": "U", "prefix_chains": "U",
    # a KVCacheManager's attention kind: (kind, window or chunk, group index)
    "attention": "iu",
    # a KVCacheManager's draft positions reserved past each sequence's tokens
    "lookahead": "iu",
}
# prefix_chains is optional: only a windowed manager has chain tails to keep.
_PREFIX_MEMBERS = [key for key in _MEMBERS if key.startswith("prefix_") and key != "prefix_chains"]
_HEADER_LIMIT = 10000  # bytes of a .npy header, numpy's own default bound

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class CorruptStateError(ValueError):
    """Saved state (a file, a pickle, a state dict) that is not valid pagetable state.

    Raised for a truncated or tampered file, a file of another format, version or
    kind, and for state whose values are inconsistent (counts that do not add up,
    duplicate ids, reference counts that disagree with the table, ...).  The message
    names what is wrong.  Nothing is built from such state.
    """


# --------------------------------------------------------------------- writing

def header(kind: str) -> dict[str, np.ndarray]:
    """The arrays that open every state dict of ``kind``."""
    return {
        "format": np.array(FORMAT),
        "version": np.array(VERSION, dtype=np.int64),
        "kind": np.array(kind),
    }


def write(target: PathOrFile, arrays: dict[str, np.ndarray]) -> None:
    """Write a state dict (with its header) to a path or a binary file object.

    A path is written through a temporary file in the same folder and then renamed,
    so a crash while saving never leaves a half-written file under that name.
    """
    if hasattr(target, "write"):
        np.savez(target, **arrays)  # type: ignore[arg-type]
        return
    path = os.fspath(target)  # type: ignore[arg-type]
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------- reading

def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    name = info.filename
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CorruptStateError(f"member {name!r} is compressed; pagetable files store arrays plainly")
    if info.file_size > file_size:
        raise CorruptStateError(
            f"member {name!r} declares {info.file_size} bytes in a file of {file_size}")
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise CorruptStateError(f"member {name!r} is truncated")
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_HEADER_LIMIT)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_HEADER_LIMIT)
    else:
        raise CorruptStateError(f"member {name!r} has .npy version {version}")
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise CorruptStateError(f"member {name!r} has dtype {dtype}, not a plain integer or string")
    if fortran and len(shape) > 1:
        raise CorruptStateError(f"member {name!r} is in Fortran order")
    count = 1
    for extent in shape:
        count *= extent
    body = data[stream.tell():]
    if count * dtype.itemsize != len(body):
        raise CorruptStateError(
            f"member {name!r} declares {count} entries of {dtype.itemsize} bytes "
            f"but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape).copy()


def read(source: PathOrFile) -> dict[str, np.ndarray]:
    """Read the arrays of a saved state, checking the archive's structure.

    Only the container is checked here (members, dtypes, sizes); values are checked
    by the ``*_state`` functions below.  Every failure is a :class:`CorruptStateError`.
    """
    if hasattr(source, "read"):
        return _read_archive(source)  # type: ignore[arg-type]
    # Opening is not reading: a missing file, a folder or a permission problem is
    # the OSError it is, not a corrupt file.
    with open(os.fspath(source), "rb") as f:  # type: ignore[arg-type]
        return _read_archive(f)


def _read_archive(f: IO[bytes]) -> dict[str, np.ndarray]:
    try:
        start = f.tell()
        file_size = f.seek(0, os.SEEK_END) - start
        f.seek(start)
        with zipfile.ZipFile(f) as archive:
            arrays: dict[str, np.ndarray] = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise CorruptStateError(f"unexpected member {info.filename!r}")
                key = info.filename[:-4]
                if key not in _MEMBERS:
                    raise CorruptStateError(f"unexpected member {info.filename!r}")
                if key in arrays:
                    raise CorruptStateError(f"member {info.filename!r} appears twice")
                arrays[key] = _read_member(archive, info, file_size)
    except CorruptStateError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, TypeError,
            SyntaxError, KeyError, IndexError, OverflowError, UnicodeDecodeError,
            NotImplementedError, RuntimeError, MemoryError) as error:
        raise CorruptStateError(f"not a valid pagetable file: {type(error).__name__}: {error}") from None
    return arrays


# ------------------------------------------------------------------ validation

def _get(state: object, key: str) -> np.ndarray:
    if not isinstance(state, dict):
        raise CorruptStateError(f"state must be a dict of arrays, got {type(state).__name__}")
    if key not in state:
        raise CorruptStateError(f"state has no {key!r} array")
    value = state[key]
    if not isinstance(value, np.ndarray):
        raise CorruptStateError(f"state[{key!r}] must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in _MEMBERS[key]:
        raise CorruptStateError(f"state[{key!r}] has dtype {value.dtype}, expected integers")
    return value


def check_kind(state: object, kind: str) -> None:
    """Check the header arrays: the format's name, its version and the object kind."""
    for key in ("format", "version", "kind"):
        value = _get(state, key)
        if value.ndim != 0:
            raise CorruptStateError(f"state[{key!r}] must be a scalar, got shape {value.shape}")
    fmt, version, found = (_get(state, k).item() for k in ("format", "version", "kind"))
    if fmt != FORMAT:
        raise CorruptStateError(f"not pagetable state (format {fmt!r})")
    if version != VERSION:
        raise CorruptStateError(
            f"state of format version {version}; this pagetable reads version {VERSION}")
    if found not in KINDS:
        raise CorruptStateError(f"unknown kind {found!r}")
    if kind != found:
        raise CorruptStateError(f"state holds a {found}, not a {kind}")


def kind_of(state: object) -> str:
    """The kind of object a state dict holds (its header checked)."""
    found = _get(state, "kind")
    if found.ndim != 0 or found.item() not in KINDS:
        raise CorruptStateError(f"unknown kind {found!r}")
    check_kind(state, found.item())
    return str(found.item())


def _scalar(state: object, key: str, low: int, high: int) -> int:
    value = _get(state, key)
    if value.ndim != 0:
        raise CorruptStateError(f"state[{key!r}] must be a scalar, got shape {value.shape}")
    number = int(value.item())
    if not low <= number <= high:
        raise CorruptStateError(f"{key} = {number} is outside {low}..{high}")
    return number


def _vector(state: object, key: str, low: int, high: int, dtype: type = np.int64) -> np.ndarray:
    """A 1-D integer array of values in ``low .. high``, as a fresh ``dtype`` array."""
    value = _get(state, key)
    if value.ndim != 1:
        raise CorruptStateError(f"state[{key!r}] must be 1-D, got shape {value.shape}")
    if value.size:
        # Compared as Python ints: a uint64 array must not wrap into range.
        smallest, largest = int(value.min()), int(value.max())
        if smallest < low or largest > high:
            bad = smallest if smallest < low else largest
            raise CorruptStateError(f"state[{key!r}] holds {bad}, outside {low}..{high}")
    return np.array(value, dtype=dtype, order="C", copy=True)


def table_state(state: object, allow_pad: bool = False) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(block_size, seq_ids, lengths, blocks)`` of a table's state.

    ``allow_pad``: entries may be ``PAD_SLOT_ID`` (-1), the released blocks of a
    windowed manager (only its own state may hold them).
    """
    block_size = _scalar(state, "block_size", 1, INT32_MAX)
    seq_ids = _vector(state, "seq_ids", 0, INT64_MAX)
    lengths = _vector(state, "lengths", 0, INT32_MAX)
    blocks = _vector(state, "blocks", -1 if allow_pad else 0, INT32_MAX, np.int32)
    if seq_ids.shape[0] > MAX_SEQUENCES:
        raise CorruptStateError(f"{seq_ids.shape[0]} sequences; a PageTable holds at most 2**30")
    if lengths.shape != seq_ids.shape:
        raise CorruptStateError(
            f"{seq_ids.shape[0]} sequence ids but {lengths.shape[0]} lengths")
    if np.unique(seq_ids).shape[0] != seq_ids.shape[0]:
        sorted_ids = np.sort(seq_ids)
        repeated = int(sorted_ids[np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])[0]])
        raise CorruptStateError(f"sequence id {repeated} appears more than once")
    # At most 2**30 lengths below 2**31 each: the int64 sum cannot overflow.
    total = int(lengths.sum(dtype=np.int64))
    if total != blocks.shape[0]:
        raise CorruptStateError(
            f"the lengths add up to {total} blocks but {blocks.shape[0]} blocks are stored")
    return block_size, seq_ids, lengths, blocks


def allocator_state(state: object) -> tuple[int, np.ndarray, np.ndarray]:
    """Validated ``(num_blocks, refcount, free_stack)`` of an allocator's state."""
    num_blocks = _scalar(state, "num_blocks", 1, INT32_MAX)
    refcount = _vector(state, "refcount", 0, INT32_MAX, np.int32)
    free_stack = _vector(state, "free_stack", 0, num_blocks - 1, np.int32)
    if refcount.shape[0] != num_blocks:
        raise CorruptStateError(
            f"{refcount.shape[0]} reference counts for a pool of {num_blocks} blocks")
    on_stack = np.bincount(free_stack, minlength=num_blocks)
    twice = np.flatnonzero(on_stack > 1)
    if twice.size:
        raise CorruptStateError(f"block {int(twice[0])} is on the free stack more than once")
    used_and_free = np.flatnonzero((on_stack == 1) & (refcount > 0))
    if used_and_free.size:
        block = int(used_and_free[0])
        raise CorruptStateError(
            f"block {block} is on the free stack but has reference count {int(refcount[block])}")
    lost = np.flatnonzero((on_stack == 0) & (refcount == 0))
    if lost.size:
        raise CorruptStateError(f"block {int(lost[0])} has no reference and is not on the free stack")
    return num_blocks, refcount, free_stack


def attention_state(state: object) -> tuple[int, int, int]:
    """Validated ``(kind, span, group_idx)`` of a manager's state; full attention,
    group 0 for state saved before windows existed.  Kinds: 0 full, 1 sliding
    window, 2 chunked local."""
    if not isinstance(state, dict) or "attention" not in state:
        return 0, 0, 0
    value = _vector(state, "attention", 0, INT32_MAX)
    if value.shape[0] != 3 or value[0] > 2 or (value[0] == 0) != (value[1] == 0):
        raise CorruptStateError(f"state['attention'] = {value.tolist()} is not valid")
    return int(value[0]), int(value[1]), int(value[2])


def lookahead_state(state: object, tokens: np.ndarray, lengths: np.ndarray,
                    block_size: int) -> np.ndarray:
    """Each sequence's reserved draft positions (0 for state saved before lookahead),
    within the blocks it holds."""
    if not isinstance(state, dict) or "lookahead" not in state:
        return np.zeros(tokens.shape[0], dtype=np.int64)
    lookahead = _vector(state, "lookahead", 0, INT32_MAX)
    if lookahead.shape != tokens.shape:
        raise CorruptStateError(f"{tokens.shape[0]} sequences but {lookahead.shape[0]} lookahead counts")
    wrong = np.flatnonzero(tokens + lookahead > lengths.astype(np.int64) * block_size)
    if wrong.size:
        raise CorruptStateError(
            f"sequence {int(wrong[0])} of the state reserves positions past the blocks it holds")
    return lookahead


def chains_state(state: object, digest: int) -> dict[int, bytes]:
    """A windowed caching manager's chain tails: sequence id -> digest."""
    if not isinstance(state, dict) or "prefix_chains" not in state:
        return {}
    try:
        saved = json.loads(_string(state, "prefix_chains"))
        chains = {int(seq): bytes.fromhex(tail) for seq, tail in saved.items()}
    except CorruptStateError:
        raise
    except (ValueError, TypeError, AttributeError) as error:
        raise CorruptStateError(f"state['prefix_chains'] is not valid: {error}") from None
    if any(len(tail) != digest for tail in chains.values()):
        raise CorruptStateError(f"state['prefix_chains'] holds a digest that is not {digest} bytes")
    return chains


def manager_state(state: object, allow_pad: bool = False) -> tuple[int, int, np.ndarray, np.ndarray,
                                                                   np.ndarray, np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Validated ``(block_size, num_blocks, seq_ids, lengths, blocks, tokens, refcount,
    free_stack)`` of a manager's state: the table and the allocator each valid, and
    consistent with each other."""
    block_size, seq_ids, lengths, blocks = table_state(state, allow_pad)
    num_blocks, refcount, free_stack = allocator_state(state)
    if num_blocks * block_size > INT32_MAX:
        raise CorruptStateError(
            f"num_blocks * block_size must be below 2**31, got {num_blocks} * {block_size}")
    # A windowed manager's sequences release blocks, so its pool does not bound them.
    tokens = _vector(state, "tokens", 0, INT32_MAX if allow_pad else num_blocks * block_size)
    if tokens.shape != seq_ids.shape:
        raise CorruptStateError(f"{seq_ids.shape[0]} sequences but {tokens.shape[0]} token counts")
    needed = (tokens + block_size - 1) // block_size
    # More blocks than the tokens need: room a lookahead reserved for draft tokens.
    wrong = np.flatnonzero(needed > lengths)
    if wrong.size:
        i = int(wrong[0])
        raise CorruptStateError(
            f"sequence {int(seq_ids[i])} holds {int(tokens[i])} tokens in {int(lengths[i])} "
            f"blocks (block_size {block_size} needs {int(needed[i])})")
    if blocks.size and int(blocks.max()) >= num_blocks:
        raise CorruptStateError(
            f"the table names block {int(blocks.max())}, outside the pool of {num_blocks}")
    references = np.bincount(blocks[blocks >= 0], minlength=num_blocks)
    wrong = np.flatnonzero(references != refcount)
    if wrong.size:
        block = int(wrong[0])
        raise CorruptStateError(
            f"block {block} has reference count {int(refcount[block])} but the table names "
            f"it {int(references[block])} times")
    return block_size, num_blocks, seq_ids, lengths, blocks, tokens, refcount, free_stack


def _string(state: object, key: str) -> str:
    value = _get(state, key)
    if value.ndim != 0 or value.dtype.kind != "U":
        raise CorruptStateError(f"state[{key!r}] must be a string")
    return str(value.item())


def _bytes_vector(state: object, key: str, size: int, high: int = 255) -> np.ndarray:
    value = _vector(state, key, 0, high, np.uint8)
    if value.shape[0] != size:
        raise CorruptStateError(f"state[{key!r}] has {value.shape[0]} entries, expected {size}")
    return value


def _tuples(value: object, key: str) -> object:
    """JSON lists back into the tuples they were, checking every leaf is a str or int."""
    if isinstance(value, list):
        return tuple(_tuples(item, key) for item in value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    raise CorruptStateError(f"{key} holds {value!r}, not a str, int or list")


def prefix_state(state: object, num_blocks: int, block_size: int,
                 free_count: int) -> dict[str, object] | None:
    """The validated prefix cache of a manager's state, or None if it has none.

    Values are checked one by one here; how they fit together (hashes matching their
    tokens, the cached-free list matching the flags) is checked by the rebuilt
    manager's ``check()``.
    """
    from pagetable import prefix

    present = [key for key in _PREFIX_MEMBERS if isinstance(state, dict) and key in state]
    if not present:
        return None
    missing = [key for key in _PREFIX_MEMBERS if key not in present]
    if missing:
        raise CorruptStateError(f"the prefix cache's state lacks {', '.join(missing)}")
    algorithm = _string(state, "prefix_algorithm")
    if algorithm not in prefix.ALGORITHMS:
        raise CorruptStateError(f"unknown prefix hash algorithm {algorithm!r}")
    digest = prefix.digest_size(algorithm)
    options = _vector(state, "prefix_options", -1, INT32_MAX)
    if options.shape[0] != 3 or not 0 <= options[0] <= 1 or not 0 <= options[1] <= 1:
        raise CorruptStateError(f"state['prefix_options'] = {options.tolist()} is not valid")
    stats = _vector(state, "prefix_stats", 0, INT64_MAX)
    if stats.shape[0] != 4:
        raise CorruptStateError("state['prefix_stats'] must hold 4 counters")
    tokens = _vector(state, "prefix_tokens", 0, INT32_MAX, np.int32)
    if tokens.shape[0] != num_blocks * block_size:
        raise CorruptStateError(
            f"state['prefix_tokens'] has {tokens.shape[0]} entries, expected {num_blocks * block_size}")
    try:
        extra = json.loads(_string(state, "prefix_extra"))
        blocks = {int(b): _tuples(keys, "prefix_extra") for b, keys in extra["blocks"].items()}
        sequences = {int(seq): prefix.ExtraKeys._from_json(keys)
                     for seq, keys in extra["sequences"].items()}
    except CorruptStateError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CorruptStateError(f"state['prefix_extra'] is not valid: {error}") from None
    if any(not 0 <= b < num_blocks for b in blocks):
        raise CorruptStateError("state['prefix_extra'] names a block outside the pool")
    return {
        "algorithm": algorithm,
        "seed": _string(state, "prefix_seed"),
        "medium": _string(state, "prefix_medium"),
        "events": bool(options[0]),
        "int_hashes": bool(options[1]),
        "dp_rank": None if options[2] < 0 else int(options[2]),
        "lru_count": _scalar(state, "prefix_lru_count", 0, free_count),
        "hashes": _bytes_vector(state, "prefix_hashes", num_blocks * digest),
        "parents": _bytes_vector(state, "prefix_parents", num_blocks * digest),
        "known": _bytes_vector(state, "prefix_known", num_blocks, 1),
        "cached": _bytes_vector(state, "prefix_cached", num_blocks, 1),
        "tokens": tokens,
        "stats": [int(value) for value in stats],
        "block_extra": blocks,
        "sequence_extra": sequences,
    }


# --------------------------------------------------------------------- building

# kind -> the function that builds an object of that kind from a state dict (each
# class's ``_from_state``, which validates it).  Every module that defines a stateful
# class registers it on import, and importing any of them imports the package, so a
# pickle loaded in a fresh process finds every builder.
_BUILDERS: dict[str, Callable[[dict[str, np.ndarray]], object]] = {}


def register(kind: str, build: Callable[[dict[str, np.ndarray]], object]) -> None:
    """Make ``build`` the builder of state dicts of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    _BUILDERS[kind] = build


def rebuild(state: object) -> object:
    """Build the object a state dict describes: the one path for files, pickles and copies.

    Raises
    ------
    CorruptStateError
        The state is not valid state of any kind.
    """
    kind = kind_of(state)
    return _BUILDERS[kind](state)  # type: ignore[arg-type]


def load(source: PathOrFile) -> object:
    """Load whatever a pagetable file holds: a PageTable, BlockAllocator or KVCacheManager.

    Raises
    ------
    CorruptStateError
        The file is truncated, tampered with, of another format or version, or holds
        inconsistent state.
    FileNotFoundError
        There is no such file.
    """
    return rebuild(read(source))


def load_kind(source: PathOrFile, kind: str) -> object:
    """Load a file that must hold an object of ``kind``; ``CorruptStateError`` otherwise."""
    state = read(source)
    check_kind(state, kind)
    return _BUILDERS[kind](state)
