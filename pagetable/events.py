"""KV-cache events in vLLM's wire schema, for KV-aware routers.

A router that places requests by prefix-cache hits (NVIDIA Dynamo, llm-d) learns what
each engine holds from a stream of events: `BlockStored` when blocks are registered
under their hashes, `BlockRemoved` when hashes are evicted, `AllBlocksCleared` when the
whole cache is dropped.  The events travel in a `KVEventBatch`, encoded as MessagePack
exactly as vLLM v0.33 encodes its own (``vllm/distributed/kv_events.py``), so that a
consumer written for vLLM reads ours unchanged.

The classes here are plain Python: importing this module imports neither msgspec nor
pyzmq.  Only `encode_batch` and `decode_batch` need msgspec, which the ``events`` extra
installs (``pip install 'pagetable[events]'``).

The wire format, as msgspec writes it for vLLM's structs:

- a batch is an array ``[ts, events, data_parallel_rank]``: ``ts`` a float64, and
  ``data_parallel_rank`` always present (``nil`` when ``None``), because msgspec never
  omits fields of an array-like struct, ``omit_defaults`` notwithstanding;
- an event is a map whose first key is ``"type"`` (``"BlockStored"``,
  ``"BlockRemoved"`` or ``"AllBlocksCleared"``), then its fields in declaration order;
  a field that has a default (``None`` for all of them) is left out while it holds that
  default, and a field without one is always written, ``nil`` included;
- a block hash is a MessagePack int or bin, as given; tuples are arrays.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, NoReturn, Union

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MEDIUM_GPU",
    "MEDIUM_CPU",
    "MEDIUM_STORAGE",
    "BlockHash",
    "KVCacheEvent",
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "KVEventBatch",
    "encode_batch",
    "decode_batch",
]

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

BlockHash = Union[bytes, int]
"""A block hash as events carry it: the digest's bytes, or an int (vLLM's default
takes the digest's low 64 bits, read big-endian)."""

# MessagePack holds ints from -2**63 to 2**64 - 1; msgspec refuses any other.
_INT_LOW = -(2**63)
_INT_HIGH = 2**64 - 1
# Leaves an extra key may hold; tuples of these nest.  msgspec encodes each natively.
_KEY_LEAVES = {str, int, bytes, float, bool, type(None)}

_new = object.__new__


# --------------------------------------------------------------------------- checks
# The common case costs one test per value; only a failure walks a value again, to
# name the bad element in the message.


def _type_name(value: object) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _integer(value: object, name: str, low: int = _INT_LOW) -> int:
    """A Python int from any integer (numpy's included), never from a bool."""
    if type(value) is int and low <= value <= _INT_HIGH:
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, not {_type_name(value)} ({value!r})")
    number = operator.index(value)  # type: ignore[arg-type]
    if number < low:
        raise ValueError(f"{name} must be at least {low}, got {number}")
    if number > _INT_HIGH:
        raise OverflowError(f"{name} must be at most 2**64 - 1, got {number}")
    return number


def _not_str(value: object, name: str) -> NoReturn:
    raise TypeError(f"{name} must be a str or None, not {_type_name(value)} ({value!r})")


def _optional_strs(**values: object) -> None:
    for name, value in values.items():
        if value is not None and type(value) is not str:
            _not_str(value, name)


def _not_list(value: object, name: str) -> NoReturn:
    raise TypeError(f"{name} must be a list, not {_type_name(value)}")


def _check_hash(value: object, name: str) -> None:
    kind = type(value)
    if kind is not bytes and kind is not int:
        raise TypeError(f"{name} must be bytes or int, not {_type_name(value)} ({value!r})")
    if kind is int and not _INT_LOW <= value <= _INT_HIGH:  # type: ignore[operator]
        raise OverflowError(f"{name} must fit in 64 bits, got {value}")


def _hashes(value: object, name: str) -> list[BlockHash]:
    if type(value) is not list:
        _not_list(value, name)
    for h in value:
        kind = type(h)
        if kind is not bytes and (kind is not int or not _INT_LOW <= h <= _INT_HIGH):
            for i, h in enumerate(value):
                _check_hash(h, f"{name}[{i}]")
    return value


def _token_list(value: object, name: str) -> list[int]:
    # Element types only, in the cheapest loop (about 30 ns a token): a token id
    # outside 64 bits is refused when the batch is encoded.  A numpy array, or a list
    # of numpy ints, is refused here: msgspec cannot encode numpy scalars.
    if type(value) is not list:
        _not_list(value, name)
    for t in value:
        if type(t) is not int:
            i, t = next((i, t) for i, t in enumerate(value) if type(t) is not int)
            raise TypeError(
                f"{name}[{i}] must be an int, not {_type_name(t)} ({t!r}); "
                "pass a list of Python ints (array.tolist())"
            )
    return value


def _valid_key(key: tuple[Any, ...]) -> bool:
    for item in key:
        kind = type(item)
        if kind is str or item is None or kind is bytes or kind is float or kind is bool:
            continue
        if kind is int and _INT_LOW <= item <= _INT_HIGH:
            continue
        if kind is tuple and _valid_key(item):
            continue
        return False
    return True


def _check_key(value: object, name: str) -> None:
    if type(value) is tuple:
        for i, item in enumerate(value):
            _check_key(item, f"{name}[{i}]")
        return
    if type(value) not in _KEY_LEAVES:
        raise TypeError(
            f"{name} must be a str, int, bytes, float, bool, None or a tuple of these, "
            f"not {_type_name(value)} ({value!r})"
        )
    if type(value) is int and not _INT_LOW <= value <= _INT_HIGH:
        raise OverflowError(f"{name} must fit in 64 bits, got {value}")


def _per_block(value: list[Any], name: str, num_blocks: int) -> None:
    if len(value) != num_blocks:
        raise ValueError(
            f"{name} must hold one entry per block hash ({num_blocks}), got {len(value)}"
        )


def _extra_keys(value: object, num_blocks: int) -> list[tuple[Any, ...] | None]:
    if type(value) is not list:
        _not_list(value, "extra_keys")
    _per_block(value, "extra_keys", num_blocks)
    for entry in value:
        if entry is not None and (type(entry) is not tuple or not _valid_key(entry)):
            for i, entry in enumerate(value):
                if entry is not None and type(entry) is not tuple:
                    raise TypeError(
                        f"extra_keys[{i}] must be a tuple or None, not {_type_name(entry)}"
                    )
                _check_key(entry, f"extra_keys[{i}]")
    return value


def _lookahead(value: object, num_blocks: int) -> list[list[int]]:
    if type(value) is not list:
        _not_list(value, "lookahead_token_ids")
    _per_block(value, "lookahead_token_ids", num_blocks)
    for i, tokens in enumerate(value):
        _token_list(tokens, f"lookahead_token_ids[{i}]")
    return value


def _fields_repr(event: object, fields: tuple[str, ...]) -> str:
    inner = ", ".join(f"{f}={getattr(event, f)!r}" for f in fields)
    return f"{type(event).__name__}({inner})"


def _fields_equal(a: object, b: object, fields: tuple[str, ...]) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)


# --------------------------------------------------------------------------- events


class KVCacheEvent:
    """Base class of the KV-cache events; on the wire its class name is the tag."""

    __slots__ = ()

    # The field names in vLLM's declaration order: the wire order.
    _fields: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        # Like a msgspec struct: equal only to an event of the very same class.
        if type(other) is not type(self):
            return NotImplemented
        return _fields_equal(self, other, self._fields)

    def __repr__(self) -> str:
        return _fields_repr(self, self._fields)


class BlockStored(KVCacheEvent):
    """Blocks registered in the prefix cache under their hashes, one run of a sequence.

    Parameters
    ----------
    block_hashes : list of bytes or int
        The run's block hashes, first block first.
    parent_block_hash : bytes, int or None
        The hash of the block before the run; ``None`` when the run starts at block 0.
    token_ids : list of int
        Every token of the run's blocks, as Python ints.
    block_size : int
        Tokens per block, at least 1.
    lora_id : int or None
        The LoRA adapter's id (vLLM keeps it for old consumers; the name is the key).
    medium : str or None
        Where the blocks live: `MEDIUM_GPU`, `MEDIUM_CPU`, `MEDIUM_STORAGE` or another
        tier's name.
    lora_name : str or None
        The LoRA adapter's name, which the block hashes include.
    extra_keys : list of (tuple or None), optional
        One entry per block hash: the untagged extra keys its hash covers, in order
        the LoRA name, ``(identifier, offset)`` pairs of multimodal items, the cache
        salt; ``None`` for a block without any.
    group_idx : int, optional
        The KV-cache group of the blocks.
    kv_cache_spec_kind : str, optional
        The kind of the group's cache spec, so consumers can classify groups.
    kv_cache_spec_sliding_window : int, optional
        The group's sliding window, for a sliding-window spec.
    locality : str, optional
        ``"LOCAL"`` or ``"REMOTE"`` relative to the publisher.
    ownership : str, optional
        The secondary offloading tier that produced the event.
    session_id : str, optional
        The session whose request stored the blocks (not an exclusive owner: blocks
        are shared).
    lookahead_token_ids : list of list of int, optional
        One list per block hash: the tokens past the block that its hash covers.

    Notes
    -----
    Each ``None`` default is left out of the encoded event.  The lists are kept, not
    copied.  Equal events hash equal (``lora_name`` included, which vLLM's hash
    leaves out), so a `collections.Counter` can count events across workers; an event
    whose extra keys hold something unhashable cannot be hashed.
    """

    __slots__ = (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
        "locality",
        "ownership",
        "session_id",
        "lookahead_token_ids",
    )
    _fields = __slots__

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None
    group_idx: int | None
    kv_cache_spec_kind: str | None
    kv_cache_spec_sliding_window: int | None
    locality: str | None
    ownership: str | None
    session_id: str | None
    lookahead_token_ids: list[list[int]] | None

    def __init__(
        self,
        block_hashes: list[BlockHash],
        parent_block_hash: BlockHash | None,
        token_ids: list[int],
        block_size: int,
        lora_id: int | None,
        medium: str | None,
        lora_name: str | None,
        extra_keys: list[tuple[Any, ...] | None] | None = None,
        group_idx: int | None = None,
        kv_cache_spec_kind: str | None = None,
        kv_cache_spec_sliding_window: int | None = None,
        locality: str | None = None,
        ownership: str | None = None,
        session_id: str | None = None,
        lookahead_token_ids: list[list[int]] | None = None,
    ) -> None:
        num_blocks = len(_hashes(block_hashes, "block_hashes"))
        if parent_block_hash is not None:
            _check_hash(parent_block_hash, "parent_block_hash")
        _token_list(token_ids, "token_ids")
        block_size = _integer(block_size, "block_size", 1)
        if lora_id is not None:
            lora_id = _integer(lora_id, "lora_id")
        if medium is not None and type(medium) is not str:
            _not_str(medium, "medium")
        if lora_name is not None and type(lora_name) is not str:
            _not_str(lora_name, "lora_name")
        if extra_keys is not None:
            _extra_keys(extra_keys, num_blocks)
        if group_idx is not None:
            group_idx = _integer(group_idx, "group_idx", 0)
        if kv_cache_spec_sliding_window is not None:
            kv_cache_spec_sliding_window = _integer(
                kv_cache_spec_sliding_window, "kv_cache_spec_sliding_window"
            )
        if (
            kv_cache_spec_kind is not None
            or locality is not None
            or ownership is not None
            or session_id is not None
        ):
            _optional_strs(
                kv_cache_spec_kind=kv_cache_spec_kind,
                locality=locality,
                ownership=ownership,
                session_id=session_id,
            )
        if lookahead_token_ids is not None:
            _lookahead(lookahead_token_ids, num_blocks)
        self.block_hashes = block_hashes
        self.parent_block_hash = parent_block_hash
        self.token_ids = token_ids
        self.block_size = block_size
        self.lora_id = lora_id
        self.medium = medium
        self.lora_name = lora_name
        self.extra_keys = extra_keys
        self.group_idx = group_idx
        self.kv_cache_spec_kind = kv_cache_spec_kind
        self.kv_cache_spec_sliding_window = kv_cache_spec_sliding_window
        self.locality = locality
        self.ownership = ownership
        self.session_id = session_id
        self.lookahead_token_ids = lookahead_token_ids

    def __hash__(self) -> int:
        extra = self.extra_keys
        lookahead = self.lookahead_token_ids
        return hash(
            (
                tuple(self.block_hashes),
                self.parent_block_hash,
                tuple(self.token_ids),
                self.block_size,
                self.lora_id,
                self.medium,
                self.lora_name,
                None if extra is None else tuple(extra),
                self.group_idx,
                self.kv_cache_spec_kind,
                self.kv_cache_spec_sliding_window,
                self.locality,
                self.ownership,
                self.session_id,
                None if lookahead is None else tuple(map(tuple, lookahead)),
            )
        )


class BlockRemoved(KVCacheEvent):
    """Block hashes dropped from the prefix cache (evicted, or their block rewritten).

    Parameters
    ----------
    block_hashes : list of bytes or int
        The hashes dropped.
    medium : str or None
        Where the blocks lived (`MEDIUM_GPU` ...).
    group_idx : int, optional
        The KV-cache group of the blocks.
    locality : str, optional
        ``"LOCAL"`` or ``"REMOTE"`` relative to the publisher.
    ownership : str, optional
        The secondary offloading tier that produced the event.

    Notes
    -----
    Equal events hash equal.
    """

    __slots__ = ("block_hashes", "medium", "group_idx", "locality", "ownership")
    _fields = __slots__

    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None
    locality: str | None
    ownership: str | None

    def __init__(
        self,
        block_hashes: list[BlockHash],
        medium: str | None,
        group_idx: int | None = None,
        locality: str | None = None,
        ownership: str | None = None,
    ) -> None:
        _hashes(block_hashes, "block_hashes")
        if group_idx is not None:
            group_idx = _integer(group_idx, "group_idx", 0)
        if medium is not None and type(medium) is not str:
            _not_str(medium, "medium")
        if locality is not None or ownership is not None:
            _optional_strs(locality=locality, ownership=ownership)
        self.block_hashes = block_hashes
        self.medium = medium
        self.group_idx = group_idx
        self.locality = locality
        self.ownership = ownership

    def __hash__(self) -> int:
        return hash(
            (tuple(self.block_hashes), self.medium, self.group_idx, self.locality, self.ownership)
        )


class AllBlocksCleared(KVCacheEvent):
    """Every block hash of the publisher dropped at once (a prefix-cache reset).

    Unhashable, as vLLM's is.
    """

    __slots__ = ()

    # vLLM's events are unhashable unless they define __hash__, and this one does not.
    __hash__ = None  # type: ignore[assignment]


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]
_EVENT_TYPES = (BlockStored, BlockRemoved, AllBlocksCleared)


class KVEventBatch:
    """The events of one engine step, as one message.

    Parameters
    ----------
    ts : float
        When the batch was made, in seconds since the epoch (``time.time()``);
        finite.  An int is stored as a float.
    events : list of BlockStored, BlockRemoved or AllBlocksCleared
        The events in the order they happened; the list is kept, not copied.
    data_parallel_rank : int, optional
        The data-parallel rank of the engine that made them; a publisher fills in its
        own rank while this is ``None``.

    Notes
    -----
    Mutable and unhashable, as vLLM's is: a publisher sets ``data_parallel_rank``.
    """

    __slots__ = ("ts", "events", "data_parallel_rank")
    _fields = __slots__

    ts: float
    events: list[Event]
    data_parallel_rank: int | None

    def __init__(
        self, ts: float, events: list[Event], data_parallel_rank: int | None = None
    ) -> None:
        if type(ts) is not float:
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise TypeError(f"ts must be a float, not {_type_name(ts)} ({ts!r})")
            ts = float(ts)
        if not math.isfinite(ts):
            raise ValueError(f"ts must be finite, got {ts}")
        if type(events) is not list:
            _not_list(events, "events")
        for i, event in enumerate(events):
            if type(event) not in _EVENT_TYPES:
                raise TypeError(
                    f"events[{i}] must be a BlockStored, BlockRemoved or "
                    f"AllBlocksCleared, not {_type_name(event)}"
                )
        if data_parallel_rank is not None:
            data_parallel_rank = _integer(data_parallel_rank, "data_parallel_rank", 0)
        self.ts = ts
        self.events = events
        self.data_parallel_rank = data_parallel_rank

    def __eq__(self, other: object) -> bool:
        if type(other) is not KVEventBatch:
            return NotImplemented
        return _fields_equal(self, other, self._fields)

    def __repr__(self) -> str:
        return _fields_repr(self, self._fields)

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- trusted
# Constructors without checks, for code that builds events from values it already
# holds in the right types (the manager, the decoder).


def _block_stored(
    block_hashes: list[BlockHash],
    parent_block_hash: BlockHash | None,
    token_ids: list[int],
    block_size: int,
    lora_id: int | None,
    medium: str | None,
    lora_name: str | None,
    extra_keys: list[tuple[Any, ...] | None] | None = None,
    group_idx: int | None = None,
    kv_cache_spec_kind: str | None = None,
    kv_cache_spec_sliding_window: int | None = None,
    locality: str | None = None,
    ownership: str | None = None,
    session_id: str | None = None,
    lookahead_token_ids: list[list[int]] | None = None,
) -> BlockStored:
    event: BlockStored = _new(BlockStored)
    event.block_hashes = block_hashes
    event.parent_block_hash = parent_block_hash
    event.token_ids = token_ids
    event.block_size = block_size
    event.lora_id = lora_id
    event.medium = medium
    event.lora_name = lora_name
    event.extra_keys = extra_keys
    event.group_idx = group_idx
    event.kv_cache_spec_kind = kv_cache_spec_kind
    event.kv_cache_spec_sliding_window = kv_cache_spec_sliding_window
    event.locality = locality
    event.ownership = ownership
    event.session_id = session_id
    event.lookahead_token_ids = lookahead_token_ids
    return event


def _block_removed(
    block_hashes: list[BlockHash],
    medium: str | None,
    group_idx: int | None = None,
    locality: str | None = None,
    ownership: str | None = None,
) -> BlockRemoved:
    event: BlockRemoved = _new(BlockRemoved)
    event.block_hashes = block_hashes
    event.medium = medium
    event.group_idx = group_idx
    event.locality = locality
    event.ownership = ownership
    return event


def _event_batch(
    ts: float, events: list[Event], data_parallel_rank: int | None = None
) -> KVEventBatch:
    batch: KVEventBatch = _new(KVEventBatch)
    batch.ts = ts
    batch.events = events
    batch.data_parallel_rank = data_parallel_rank
    return batch


# --------------------------------------------------------------------------- wire


class _Wire:
    """msgspec structs declaring the schema, and the coders over them; built once."""

    def __init__(self) -> None:
        import msgspec

        # The options vLLM declares its structs with: they decide the layout (gc=False
        # only spares the garbage collector).  Events are maps tagged with their class
        # name and leave out fields at their defaults; the batch is an array, from
        # which msgspec omits nothing.  defstruct takes the types as objects, so no
        # annotation is looked up in this module (where the names are the plain classes).
        hash_type = Union[bytes, int]
        optional_int = Union[int, None]
        optional_str = Union[str, None]
        BlockStored = msgspec.defstruct(
            "BlockStored",
            [
                ("block_hashes", list[hash_type]),
                ("parent_block_hash", Union[bytes, int, None]),
                ("token_ids", list[int]),
                ("block_size", int),
                ("lora_id", optional_int),
                ("medium", optional_str),
                ("lora_name", optional_str),
                ("extra_keys", Union[list[Union[tuple[Any, ...], None]], None], None),
                ("group_idx", optional_int, None),
                ("kv_cache_spec_kind", optional_str, None),
                ("kv_cache_spec_sliding_window", optional_int, None),
                ("locality", optional_str, None),
                ("ownership", optional_str, None),
                ("session_id", optional_str, None),
                ("lookahead_token_ids", Union[list[list[int]], None], None),
            ],
            omit_defaults=True,
            gc=False,
            tag=True,
        )
        BlockRemoved = msgspec.defstruct(
            "BlockRemoved",
            [
                ("block_hashes", list[hash_type]),
                ("medium", optional_str),
                ("group_idx", optional_int, None),
                ("locality", optional_str, None),
                ("ownership", optional_str, None),
            ],
            omit_defaults=True,
            gc=False,
            tag=True,
        )
        AllBlocksCleared = msgspec.defstruct(
            "AllBlocksCleared", [], omit_defaults=True, gc=False, tag=True
        )
        # Classes made at run time: mypy cannot read their union as a type.
        any_event = Union[BlockStored, BlockRemoved, AllBlocksCleared]  # type: ignore[valid-type]
        Batch = msgspec.defstruct(
            "KVEventBatch",
            [
                ("ts", float),
                ("events", list[any_event]),
                ("data_parallel_rank", optional_int, None),
            ],
            array_like=True,
            omit_defaults=True,
            gc=False,
        )

        self.batch = Batch
        self.stored = BlockStored
        self.removed = BlockRemoved
        self.cleared = AllBlocksCleared
        self.encode: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode
        self.decode: Callable[[Any], Any] = msgspec.msgpack.Decoder(Batch).decode
        self.errors = (msgspec.DecodeError,)


_WIRE: _Wire | None = None


def _wire() -> _Wire:
    global _WIRE
    if _WIRE is None:
        try:
            _WIRE = _Wire()
        except ModuleNotFoundError as exc:
            if exc.name != "msgspec":
                raise
            raise ModuleNotFoundError(
                "encoding KV events needs msgspec: pip install 'pagetable[events]'",
                name="msgspec",
            ) from exc
    return _WIRE


def encode_batch(batch: KVEventBatch) -> bytes:
    """The MessagePack bytes of ``batch``, exactly as vLLM encodes the same batch.

    Parameters
    ----------
    batch : KVEventBatch

    Returns
    -------
    bytes
        What vLLM's ``msgspec.msgpack.Encoder().encode(KVEventBatch(...))`` returns
        for the same content.

    Raises
    ------
    ModuleNotFoundError
        msgspec is not installed.
    TypeError
        ``batch`` is not a `KVEventBatch`, or an attribute set after construction
        holds something MessagePack cannot carry.
    OverflowError
        An int (a token id, say) does not fit in 64 bits.
    """
    if type(batch) is not KVEventBatch:
        raise TypeError(f"batch must be a KVEventBatch, not {_type_name(batch)}")
    wire = _wire()
    stored, removed, cleared = wire.stored, wire.removed, wire.cleared
    events = []
    for event in batch.events:
        kind = type(event)
        if kind is BlockStored:
            e: Any = event
            events.append(
                stored(
                    e.block_hashes,
                    e.parent_block_hash,
                    e.token_ids,
                    e.block_size,
                    e.lora_id,
                    e.medium,
                    e.lora_name,
                    e.extra_keys,
                    e.group_idx,
                    e.kv_cache_spec_kind,
                    e.kv_cache_spec_sliding_window,
                    e.locality,
                    e.ownership,
                    e.session_id,
                    e.lookahead_token_ids,
                )
            )
        elif kind is BlockRemoved:
            e = event
            events.append(removed(e.block_hashes, e.medium, e.group_idx, e.locality, e.ownership))
        elif kind is AllBlocksCleared:
            events.append(cleared())
        else:
            raise TypeError(
                f"batch.events[{len(events)}] must be a BlockStored, BlockRemoved or "
                f"AllBlocksCleared, not {_type_name(event)}"
            )
    try:
        return wire.encode(wire.batch(batch.ts, events, batch.data_parallel_rank))
    except TypeError as exc:
        raise TypeError(f"batch cannot be encoded as MessagePack: {exc}") from None
    except OverflowError as exc:
        raise OverflowError(f"batch cannot be encoded as MessagePack: {exc}") from None


def _as_tuples(value: Any) -> Any:
    """A decoded extra key with every array inside it a tuple again."""
    if type(value) is list or type(value) is tuple:
        return tuple(_as_tuples(v) for v in value)
    return value


def _restore_keys(keys: list[Any] | None) -> list[tuple[Any, ...] | None] | None:
    # The schema types each entry as a tuple, so msgspec decodes the entry itself as
    # one, but arrays nested in it (the multimodal pairs) as lists.  vLLM made them
    # tuples, and so does the encoder's input here: give them back as tuples.
    if keys is None:
        return None
    return [
        entry
        if entry is None or not any(type(v) is list for v in entry)
        else _as_tuples(entry)
        for entry in keys
    ]


def decode_batch(payload: bytes | bytearray | memoryview) -> KVEventBatch:
    """The batch a MessagePack payload from vLLM (or `encode_batch`) holds.

    Parameters
    ----------
    payload : bytes, bytearray or memoryview
        One batch as published: the third frame of a ZeroMQ message.

    Returns
    -------
    KVEventBatch
        With the hashes as they travelled (bytes or int) and each extra key's nested
        arrays as tuples, so that ``decode_batch(encode_batch(b)) == b``.

    Raises
    ------
    ModuleNotFoundError
        msgspec is not installed.
    TypeError
        ``payload`` is not bytes-like.
    ValueError
        ``payload`` is not a batch in the schema (bad MessagePack, an unknown event
        type, a field of the wrong type or missing).

    Notes
    -----
    What is accepted is what vLLM's own typed decoder accepts, no more and no less:
    the schema's types, checked by msgspec.  Relations the constructors check beyond
    types (one extra key per block, a positive block size) are not checked here, so a
    consumer never refuses a batch vLLM would read.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes-like, not {_type_name(payload)}")
    wire = _wire()
    try:
        decoded = wire.decode(payload)
    except wire.errors as exc:
        raise ValueError(f"payload is not a KV event batch: {exc}") from None
    stored, removed = wire.stored, wire.removed
    events: list[Event] = []
    for e in decoded.events:
        kind = type(e)
        if kind is stored:
            events.append(
                _block_stored(
                    e.block_hashes,
                    e.parent_block_hash,
                    e.token_ids,
                    e.block_size,
                    e.lora_id,
                    e.medium,
                    e.lora_name,
                    _restore_keys(e.extra_keys),
                    e.group_idx,
                    e.kv_cache_spec_kind,
                    e.kv_cache_spec_sliding_window,
                    e.locality,
                    e.ownership,
                    e.session_id,
                    e.lookahead_token_ids,
                )
            )
        elif kind is removed:
            events.append(
                _block_removed(e.block_hashes, e.medium, e.group_idx, e.locality, e.ownership)
            )
        else:
            events.append(_new(AllBlocksCleared))
    return _event_batch(decoded.ts, events, decoded.data_parallel_rank)
