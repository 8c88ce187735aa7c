"""KV-cache events in vLLM's schema, and the ZeroMQ publisher that sends them.

The schema is declared here a second time, independently of ``pagetable.events``, as
msgspec structs written from vLLM v0.33's ``vllm/distributed/kv_events.py`` the way a
consumer (a router) declares it: the bytes ``encode_batch`` writes must be the bytes
msgspec writes for these structs, and what vLLM's decoder reads from them must be what
went in.  The publisher is exercised over real sockets on the loopback interface and
``inproc``; every receive waits with a timeout.
"""

import collections
import inspect
import subprocess
import sys
import time
from typing import Any, Optional, Union

import numpy as np
import pytest

msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")

from hypothesis import given, settings, strategies as st  # noqa: E402

from pagetable import events  # noqa: E402
from pagetable.events import (  # noqa: E402
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from pagetable.publisher import (  # noqa: E402
    NullEventPublisher,
    ZmqEventPublisher,
    offset_endpoint_port,
)

from conftest import child_env  # noqa: E402

# ----------------------------------------------------------------- the schema, again
# vLLM v0.33: EventBatch is array_like + omit_defaults; KVCacheEvent is a tagged
# struct with omit_defaults; gc=False changes nothing on the wire and is left out.


class SchemaEvent(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class SchemaBlockStored(SchemaEvent, tag="BlockStored"):
    block_hashes: list[Union[bytes, int]]
    parent_block_hash: Union[bytes, int, None]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list[Optional[tuple[Any, ...]]]] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None
    session_id: Optional[str] = None
    lookahead_token_ids: Optional[list[list[int]]] = None


class SchemaBlockRemoved(SchemaEvent, tag="BlockRemoved"):
    block_hashes: list[Union[bytes, int]]
    medium: Optional[str]
    group_idx: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None


class SchemaAllBlocksCleared(SchemaEvent, tag="AllBlocksCleared"):
    pass


class SchemaKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Union[SchemaBlockStored, SchemaBlockRemoved, SchemaAllBlocksCleared]]
    data_parallel_rank: Optional[int] = None


OURS = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}
SCHEMA = {
    "BlockStored": SchemaBlockStored,
    "BlockRemoved": SchemaBlockRemoved,
    "AllBlocksCleared": SchemaAllBlocksCleared,
}
ENCODER = msgspec.msgpack.Encoder()
SCHEMA_DECODER = msgspec.msgpack.Decoder(SchemaKVEventBatch)


def both(ts, specs, data_parallel_rank=None):
    """Our batch and the schema's, built from the same ``(kind, kwargs)`` pairs."""
    ours = KVEventBatch(ts, [OURS[kind](**kw) for kind, kw in specs], data_parallel_rank)
    theirs = SchemaKVEventBatch(ts, [SCHEMA[kind](**kw) for kind, kw in specs], data_parallel_rank)
    return ours, theirs


STORED_MIN = dict(block_hashes=[11, 12], parent_block_hash=None, token_ids=[1, 2, 3, 4],
                  block_size=2, lora_id=None, medium=MEDIUM_GPU, lora_name=None)
STORED_FULL = dict(
    block_hashes=[b"\x00" * 32, b"\xff" * 32],
    parent_block_hash=b"\x01" * 32,
    token_ids=list(range(32)),
    block_size=16,
    lora_id=7,
    medium=MEDIUM_CPU,
    lora_name="sql-adapter",
    extra_keys=[("sql-adapter", ("img-0", 3), "salt"), None],
    group_idx=1,
    kv_cache_spec_kind="sliding_window",
    kv_cache_spec_sliding_window=4096,
    locality="LOCAL",
    ownership="tier-2",
    session_id="session-9",
    lookahead_token_ids=[[16, 17], [32, 33]],
)

CASES = {
    "stored-defaults": [("BlockStored", STORED_MIN)],
    "stored-every-field": [("BlockStored", STORED_FULL)],
    "stored-int-parent": [("BlockStored", dict(STORED_MIN, parent_block_hash=2**64 - 1,
                                               block_hashes=[0, 2**63]))],
    "stored-none-extra-key-entries": [("BlockStored", dict(STORED_MIN, extra_keys=[None, None]))],
    "stored-empty-lists": [("BlockStored", dict(STORED_MIN, block_hashes=[], token_ids=[],
                                                extra_keys=[], lookahead_token_ids=[]))],
    "stored-group-0": [("BlockStored", dict(STORED_MIN, group_idx=0))],
    "stored-medium-none": [("BlockStored", dict(STORED_MIN, medium=None, lora_id=0))],
    "removed-defaults": [("BlockRemoved", dict(block_hashes=[5], medium=MEDIUM_GPU))],
    "removed-every-field": [("BlockRemoved", dict(block_hashes=[b"ab", 5], medium=MEDIUM_STORAGE,
                                                  group_idx=3, locality="REMOTE", ownership="x"))],
    "cleared": [("AllBlocksCleared", {})],
    "empty": [],
    "mixed": [("BlockRemoved", dict(block_hashes=[1], medium=MEDIUM_GPU, group_idx=0)),
              ("BlockRemoved", dict(block_hashes=[2], medium=MEDIUM_GPU, group_idx=0)),
              ("BlockStored", dict(STORED_MIN, group_idx=0)),
              ("AllBlocksCleared", {}),
              ("BlockStored", dict(STORED_FULL))],
}


# ----------------------------------------------------------------- schema


@pytest.mark.parametrize("kind", sorted(OURS))
def test_constructor_fields_follow_the_schema(kind):
    """Same names, same order, same defaults, so positional and keyword calls carry over."""
    params = list(inspect.signature(OURS[kind]).parameters.values())
    fields = msgspec.structs.fields(SCHEMA[kind])
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields):
        if f.default is msgspec.NODEFAULT:
            assert p.default is inspect.Parameter.empty, p.name
        else:
            assert p.default is f.default, p.name
    assert OURS[kind].__slots__ == tuple(f.name for f in fields)


def test_batch_fields_follow_the_schema():
    params = list(inspect.signature(KVEventBatch).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("ts", inspect.Parameter.empty),
        ("events", inspect.Parameter.empty),
        ("data_parallel_rank", None),
    ]
    assert [f.name for f in msgspec.structs.fields(SchemaKVEventBatch)] == [p.name for p in params]


def test_media():
    assert (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE) == ("GPU", "CPU", "STORAGE")


def test_positional_construction_matches_keywords():
    values = list(STORED_FULL.values())
    assert BlockStored(*values) == BlockStored(**STORED_FULL)
    assert BlockRemoved([1], "GPU", 0, "LOCAL", "o") == BlockRemoved(
        block_hashes=[1], medium="GPU", group_idx=0, locality="LOCAL", ownership="o")
    assert KVEventBatch(1.0, [], 2) == KVEventBatch(ts=1.0, events=[], data_parallel_rank=2)


# ----------------------------------------------------------------- bytes


@pytest.mark.parametrize("rank", [None, 0, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_equal_msgspec_bytes_for_the_schema(case, rank):
    ours, theirs = both(1_700_000_000.25, CASES[case], rank)
    payload = encode_batch(ours)
    assert payload == ENCODER.encode(theirs)
    assert decode_batch(payload) == ours
    assert ENCODER.encode(SCHEMA_DECODER.decode(payload)) == payload


def test_layout_defaults_left_out_required_fields_kept():
    ours, _ = both(2.5, CASES["mixed"])
    ts, wire_events, rank = msgspec.msgpack.decode(encode_batch(ours))
    # An array-like batch keeps its trailing default: msgspec omits nothing from arrays.
    assert (ts, rank) == (2.5, None)
    removed, _, stored, cleared, full = wire_events
    assert list(removed) == ["type", "block_hashes", "medium", "group_idx"]
    assert removed == {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 0}
    # lora_id and lora_name have no default: written as nil.  extra_keys and the rest
    # are at their default None and left out; group_idx=0 is not a default.
    assert list(stored) == ["type", "block_hashes", "parent_block_hash", "token_ids",
                            "block_size", "lora_id", "medium", "lora_name", "group_idx"]
    assert stored["lora_id"] is None and stored["parent_block_hash"] is None
    assert cleared == {"type": "AllBlocksCleared"}
    assert list(full) == ["type"] + list(STORED_FULL)
    assert full["extra_keys"] == [["sql-adapter", ["img-0", 3], "salt"], None]
    assert full["block_hashes"] == [b"\x00" * 32, b"\xff" * 32]


def test_batch_header_bytes():
    payload = encode_batch(KVEventBatch(1.5, []))
    # fixarray(3), float64 1.5, fixarray(0), nil
    assert payload == b"\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x90\xc0"
    assert encode_batch(KVEventBatch(1.5, [], 2))[-1:] == b"\x02"


def test_int_ts_is_encoded_as_a_float():
    batch = KVEventBatch(7, [])
    assert type(batch.ts) is float
    assert encode_batch(batch) == ENCODER.encode(SchemaKVEventBatch(7.0, []))


def test_decoding_restores_nested_tuples():
    ours, theirs = both(1.0, [("BlockStored", STORED_FULL)])
    decoded = decode_batch(ENCODER.encode(theirs))
    assert decoded.events[0].extra_keys == [("sql-adapter", ("img-0", 3), "salt"), None]
    assert type(decoded.events[0].extra_keys[0][1]) is tuple
    # vLLM's typed decoder gives the nested pair back as a list.
    assert SCHEMA_DECODER.decode(ENCODER.encode(theirs)).events[0].extra_keys[0][1] == ["img-0", 3]
    assert decoded == ours


def test_decoding_accepts_what_the_schema_accepts():
    # Lengths the constructor would refuse, but vLLM's typed decoder reads.
    theirs = SchemaKVEventBatch(1.0, [SchemaBlockStored([1, 2], None, [], 0, None, None, None,
                                                        extra_keys=[None])])
    decoded = decode_batch(ENCODER.encode(theirs))
    assert decoded.events[0].block_size == 0 and decoded.events[0].extra_keys == [None]
    assert decode_batch(bytearray(ENCODER.encode(theirs))) == decoded
    assert decode_batch(memoryview(ENCODER.encode(theirs))) == decoded


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "payload is not a KV event batch"),
        (b"\xc1", "payload is not a KV event batch"),
        (ENCODER.encode([1.0, [{"type": "BlockEvicted", "block_hashes": []}]]), "BlockEvicted"),
        (ENCODER.encode([1.0, [{"type": "BlockRemoved", "block_hashes": [1]}]]), "medium"),
        (ENCODER.encode([1.0, [{"type": "BlockRemoved", "block_hashes": ["x"], "medium": None}]]),
         "block_hashes"),
        (ENCODER.encode({"ts": 1.0, "events": []}), "payload is not a KV event batch"),
    ],
)
def test_decoding_a_bad_payload_raises_value_error(payload, match):
    with pytest.raises(ValueError, match=match):
        decode_batch(payload)


def test_decoding_a_non_bytes_payload_raises_type_error():
    with pytest.raises(TypeError, match="payload"):
        decode_batch("not bytes")


def test_encoding_checks_its_argument_and_what_was_set_later():
    with pytest.raises(TypeError, match="batch must be a KVEventBatch"):
        encode_batch(SchemaKVEventBatch(1.0, []))
    event = BlockStored(**STORED_MIN)
    event.token_ids = [2**70]
    with pytest.raises(OverflowError, match="cannot be encoded"):
        encode_batch(KVEventBatch(1.0, [event]))
    event = BlockRemoved([1], "GPU")
    event.medium = object()
    with pytest.raises(TypeError, match="cannot be encoded"):
        encode_batch(KVEventBatch(1.0, [event]))
    batch = KVEventBatch(1.0, [])
    batch.events.append("not an event")
    with pytest.raises(TypeError, match=r"batch.events\[0\]"):
        encode_batch(batch)


# Random content: every field, every hash kind, nested extra keys.
_ints = st.integers(-(2**63), 2**64 - 1)
_hash = st.one_of(st.binary(max_size=32), st.integers(0, 2**64 - 1), st.integers(-(2**63), -1))
_text = st.none() | st.text(max_size=6)
_leaf = st.one_of(st.text(max_size=6), _ints, st.binary(max_size=6), st.none(), st.booleans(),
                  st.floats(allow_nan=False))
_key = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)
_entry = st.none() | st.lists(_key, max_size=4).map(tuple)


@st.composite
def _stored(draw):
    n = draw(st.integers(0, 4))
    return "BlockStored", dict(
        block_hashes=draw(st.lists(_hash, min_size=n, max_size=n)),
        parent_block_hash=draw(st.none() | _hash),
        token_ids=draw(st.lists(st.integers(0, 2**31 - 1), max_size=20)),
        block_size=draw(st.integers(1, 2**64 - 1)),
        lora_id=draw(st.none() | _ints),
        medium=draw(_text),
        lora_name=draw(_text),
        extra_keys=draw(st.none() | st.lists(_entry, min_size=n, max_size=n)),
        group_idx=draw(st.none() | st.integers(0, 2**64 - 1)),
        kv_cache_spec_kind=draw(_text),
        kv_cache_spec_sliding_window=draw(st.none() | _ints),
        locality=draw(_text),
        ownership=draw(_text),
        session_id=draw(_text),
        lookahead_token_ids=draw(st.none() | st.lists(st.lists(_ints, max_size=3),
                                                      min_size=n, max_size=n)),
    )


_removed = st.builds(
    lambda h, m, g, loc, own: ("BlockRemoved", dict(block_hashes=h, medium=m, group_idx=g,
                                                    locality=loc, ownership=own)),
    st.lists(_hash, max_size=4), _text, st.none() | st.integers(0, 2**64 - 1), _text, _text,
)
_event = st.one_of(_stored(), _removed, st.just(("AllBlocksCleared", {})))


@settings(max_examples=150, deadline=None)
@given(
    ts=st.floats(allow_nan=False, allow_infinity=False),
    specs=st.lists(_event, max_size=5),
    rank=st.none() | st.integers(0, 2**64 - 1),
)
def test_random_batches_encode_as_msgspec_does_and_round_trip(ts, specs, rank):
    ours, theirs = both(ts, specs, rank)
    payload = encode_batch(ours)
    assert payload == ENCODER.encode(theirs)
    assert decode_batch(payload) == ours
    assert ENCODER.encode(SCHEMA_DECODER.decode(payload)) == payload


# ----------------------------------------------------------------- the classes


@pytest.mark.parametrize("case", ["stored-every-field", "removed-every-field", "cleared", "mixed"])
def test_repr_is_msgspec_repr(case):
    ours, theirs = both(3.0, CASES[case], 1)
    assert repr(ours) == repr(theirs).replace("SchemaKVEventBatch(", "KVEventBatch(").replace(
        "SchemaBlock", "Block").replace("SchemaAll", "All")
    for a, b in zip(ours.events, theirs.events):
        assert repr(a) == repr(b).replace("Schema", "")


def test_equality_is_by_type_and_every_field():
    assert BlockStored(**STORED_FULL) == BlockStored(**STORED_FULL)
    for name, value in [("lora_name", "other"), ("session_id", None), ("group_idx", 2),
                        ("lookahead_token_ids", None), ("block_hashes", [b"", b""])]:
        assert BlockStored(**STORED_FULL) != BlockStored(**dict(STORED_FULL, **{name: value})), name
    assert AllBlocksCleared() == AllBlocksCleared()
    assert AllBlocksCleared() != BlockRemoved([], None)
    assert BlockRemoved([1], "GPU") != SchemaBlockRemoved([1], "GPU")
    assert KVEventBatch(1.0, [AllBlocksCleared()]) != KVEventBatch(1.0, [AllBlocksCleared()], 0)
    assert KVEventBatch(1.0, []) != KVEventBatch(1.5, [])


def test_hashing_counts_events_across_workers():
    # As vLLM's aggregator does: events every worker reported, counted by value.
    worker_a = [BlockStored(**STORED_FULL), BlockRemoved([5], "GPU", 0)]
    worker_b = [BlockRemoved([5], "GPU", 0), BlockStored(**STORED_FULL), BlockRemoved([6], "GPU", 0)]
    counts = collections.Counter(worker_a + worker_b)
    assert counts[BlockRemoved([5], "GPU", 0)] == 2
    assert counts[BlockStored(**STORED_FULL)] == 2
    assert counts[BlockRemoved([6], "GPU", 0)] == 1
    assert hash(BlockStored(**STORED_MIN)) == hash(BlockStored(**dict(STORED_MIN)))
    assert hash(BlockStored(**dict(STORED_MIN, extra_keys=[None, None]))) != hash(
        BlockStored(**STORED_MIN))


@pytest.mark.parametrize("value", [AllBlocksCleared(), KVEventBatch(1.0, [])])
def test_cleared_and_batches_are_unhashable_as_in_vllm(value):
    with pytest.raises(TypeError, match="unhashable"):
        hash(value)


def test_trusted_constructors_build_equal_objects():
    assert events._block_stored(**STORED_FULL) == BlockStored(**STORED_FULL)
    assert events._block_stored(**STORED_MIN) == BlockStored(**STORED_MIN)
    assert events._block_removed([1], "GPU", 0) == BlockRemoved([1], "GPU", 0)
    batch = events._event_batch(2.0, [events._block_removed([1], "GPU")], 1)
    assert batch == KVEventBatch(2.0, [BlockRemoved([1], "GPU")], 1)
    assert encode_batch(batch) == encode_batch(KVEventBatch(2.0, [BlockRemoved([1], "GPU")], 1))


def test_numpy_integer_scalars_are_stored_as_ints():
    event = BlockStored([1], 2, [3], np.int64(16), np.int32(4), "GPU", None,
                        group_idx=np.int16(0), kv_cache_spec_sliding_window=np.int64(8))
    assert (event.block_size, event.lora_id, event.group_idx, event.kv_cache_spec_sliding_window) \
        == (16, 4, 0, 8)
    assert all(type(v) is int for v in (event.block_size, event.lora_id, event.group_idx))
    assert KVEventBatch(1.0, [], np.int64(2)).data_parallel_rank == 2
    encode_batch(KVEventBatch(1.0, [event]))


def _stored_with(**changes):
    return lambda: BlockStored(**dict(STORED_MIN, **changes))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (_stored_with(block_hashes=(1, 2)), TypeError, "block_hashes must be a list"),
        (_stored_with(block_hashes=[1, "2"]), TypeError, r"block_hashes\[1\] must be bytes or int"),
        (_stored_with(block_hashes=[1, True]), TypeError, r"block_hashes\[1\]"),
        (_stored_with(block_hashes=[np.uint64(1), 2]), TypeError, r"block_hashes\[0\]"),
        (_stored_with(block_hashes=[bytearray(b"x"), 2]), TypeError, r"block_hashes\[0\]"),
        (_stored_with(block_hashes=[2**64, 2]), OverflowError, r"block_hashes\[0\]"),
        (_stored_with(parent_block_hash=1.5), TypeError, "parent_block_hash"),
        (_stored_with(parent_block_hash=-(2**63) - 1), OverflowError, "parent_block_hash"),
        (_stored_with(token_ids=np.arange(4)), TypeError, "token_ids must be a list"),
        (_stored_with(token_ids=[1, 2, np.int64(3)]), TypeError, r"token_ids\[2\].*tolist"),
        (_stored_with(token_ids=[1, 2.0]), TypeError, r"token_ids\[1\]"),
        (_stored_with(block_size=0), ValueError, "block_size"),
        (_stored_with(block_size=2.0), TypeError, "block_size"),
        (_stored_with(block_size=True), TypeError, "block_size"),
        (_stored_with(block_size=2**64), OverflowError, "block_size"),
        (_stored_with(lora_id="7"), TypeError, "lora_id"),
        (_stored_with(medium=b"GPU"), TypeError, "medium"),
        (_stored_with(lora_name=3), TypeError, "lora_name"),
        (_stored_with(extra_keys=(None, None)), TypeError, "extra_keys must be a list"),
        (_stored_with(extra_keys=[None]), ValueError, r"extra_keys must hold one entry per block hash \(2\), got 1"),
        (_stored_with(extra_keys=[None, ["salt"]]), TypeError, r"extra_keys\[1\] must be a tuple"),
        (_stored_with(extra_keys=[None, ("a", ["b"])]), TypeError, r"extra_keys\[1\]\[1\]"),
        (_stored_with(extra_keys=[("a", ("b", object())), None]), TypeError, r"extra_keys\[0\]\[1\]\[1\]"),
        (_stored_with(extra_keys=[("a", 2**64), None]), OverflowError, r"extra_keys\[0\]\[1\]"),
        (_stored_with(group_idx=-1), ValueError, "group_idx"),
        (_stored_with(kv_cache_spec_kind=1), TypeError, "kv_cache_spec_kind"),
        (_stored_with(kv_cache_spec_sliding_window="4"), TypeError, "kv_cache_spec_sliding_window"),
        (_stored_with(locality=1), TypeError, "locality"),
        (_stored_with(ownership=1), TypeError, "ownership"),
        (_stored_with(session_id=1), TypeError, "session_id"),
        (_stored_with(lookahead_token_ids=[[1]]), ValueError, "lookahead_token_ids must hold one entry"),
        (_stored_with(lookahead_token_ids=[[1], (2,)]), TypeError, r"lookahead_token_ids\[1\] must be a list"),
        (_stored_with(lookahead_token_ids=[[1], [2, "3"]]), TypeError, r"lookahead_token_ids\[1\]\[1\]"),
        (lambda: BlockRemoved(5, "GPU"), TypeError, "block_hashes must be a list"),
        (lambda: BlockRemoved([5], 5), TypeError, "medium"),
        (lambda: BlockRemoved([5], "GPU", group_idx=-2), ValueError, "group_idx"),
        (lambda: BlockRemoved([5], "GPU", locality=0), TypeError, "locality"),
        (lambda: BlockRemoved([5], "GPU", ownership=0), TypeError, "ownership"),
        (lambda: KVEventBatch("1.0", []), TypeError, "ts"),
        (lambda: KVEventBatch(True, []), TypeError, "ts"),
        (lambda: KVEventBatch(float("nan"), []), ValueError, "ts must be finite"),
        (lambda: KVEventBatch(1.0, (AllBlocksCleared(),)), TypeError, "events must be a list"),
        (lambda: KVEventBatch(1.0, [AllBlocksCleared(), SchemaAllBlocksCleared()]), TypeError,
         r"events\[1\]"),
        (lambda: KVEventBatch(1.0, [], -1), ValueError, "data_parallel_rank"),
        (lambda: KVEventBatch(1.0, [], "0"), TypeError, "data_parallel_rank"),
        (lambda: BlockStored([1]), TypeError, "parent_block_hash"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_importing_needs_neither_msgspec_nor_zmq(tmp_path):
    code = (
        "import sys\n"
        "import pagetable.events, pagetable.publisher\n"
        "b = pagetable.events.KVEventBatch(1.0, [pagetable.events.AllBlocksCleared()])\n"
        "with pagetable.publisher.NullEventPublisher() as p:\n"
        "    p.publish(b)\n"
        "assert 'msgspec' not in sys.modules and 'zmq' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=child_env())
    assert result.returncode == 0, result.stderr


def test_missing_msgspec_names_the_extra(monkeypatch):
    monkeypatch.setattr(events, "_WIRE", None)
    monkeypatch.setitem(sys.modules, "msgspec", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'pagetable\[events\]'"):
        encode_batch(KVEventBatch(1.0, []))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'pagetable\[events\]'"):
        decode_batch(b"\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x90\xc0")
    with pytest.raises(ModuleNotFoundError, match="msgspec"):
        ZmqEventPublisher("tcp://127.0.0.1:0")


def test_missing_zmq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "zmq", None)
    with pytest.raises(ModuleNotFoundError, match=r"pyzmq: pip install 'pagetable\[events\]'"):
        ZmqEventPublisher("tcp://127.0.0.1:0")


# ----------------------------------------------------------------- publisher helpers

TIMEOUT_MS = 5000


def recv(socket, timeout_ms=TIMEOUT_MS):
    if not socket.poll(timeout_ms):
        pytest.fail(f"nothing arrived within {timeout_ms} ms")
    return socket.recv_multipart()


def subscriber(endpoint, topic):
    """A SUB socket connected to ``endpoint`` whose subscription has reached the publisher.

    A PUB socket drops what it sends before a subscription arrives, so wait for the
    TCP handshake and then give the subscription a moment to follow it.
    """
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if endpoint.startswith("tcp://"):
        after_handshake(sub, lambda: sub.connect(endpoint))
    else:
        sub.connect(endpoint)
        time.sleep(0.1)
    return sub


def after_handshake(sock, start):
    """Run ``start`` (a connect or a bind) and wait for ``sock``'s first TCP handshake."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        start()
        assert monitor.poll(TIMEOUT_MS), "no ZeroMQ handshake"
        monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    # A bound socket attaches the new connection (and a SUB sends its subscription
    # on it) only when its owner next touches it; reading its events does that.
    sock.getsockopt(zmq.EVENTS)
    time.sleep(0.1)


def dealer(endpoint):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def replay(sock, start_seq):
    """Ask for every batch from ``start_seq``; the replies up to the end marker."""
    sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
    replies = []
    while True:
        frames = recv(sock)
        assert frames[0] == b""
        replies.append(frames[1:])
        if frames[2] == ZmqEventPublisher.END_SEQ:
            return replies


def batches(n, rank=None):
    """``n`` distinct pairs (ours, schema's)."""
    return [both(1000.0 + i, [("BlockRemoved", dict(block_hashes=[i], medium="GPU", group_idx=0)),
                              ("BlockStored", dict(STORED_MIN, block_hashes=[100 + i, 200 + i]))],
                 rank) for i in range(n)]


# ----------------------------------------------------------------- publisher, live


def test_subscriber_receives_batches_in_sequence_over_tcp():
    with ZmqEventPublisher("tcp://127.0.0.1:0", topic="kv", data_parallel_rank=3) as publisher:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        assert not publisher.endpoint.endswith(":0")
        sub = subscriber(publisher.endpoint, "kv")
        try:
            pairs = batches(4)
            pairs[2][0].data_parallel_rank = 1   # set explicitly: left as it is
            pairs[2][1].data_parallel_rank = 1
            for ours, _ in pairs:
                publisher.publish(ours)
            for seq, (ours, theirs) in enumerate(pairs):
                topic, seq_bytes, payload = recv(sub)
                assert topic == b"kv"
                assert seq_bytes == seq.to_bytes(8, "big") and len(seq_bytes) == 8
                if theirs.data_parallel_rank is None:
                    theirs.data_parallel_rank = 3
                assert SCHEMA_DECODER.decode(payload) == theirs
                assert payload == ENCODER.encode(theirs)
                assert decode_batch(payload) == ours
            assert [ours.data_parallel_rank for ours, _ in pairs] == [3, 3, 1, 3]
            assert not sub.poll(50)
        finally:
            sub.close(linger=0)


def test_subscriber_of_another_topic_gets_nothing():
    with ZmqEventPublisher("tcp://127.0.0.1:0", topic="kv@engine-1") as publisher:
        wanted = subscriber(publisher.endpoint, "kv@engine-1")
        other = subscriber(publisher.endpoint, "kv@engine-2")
        try:
            publisher.publish(batches(1)[0][0])
            assert recv(wanted)[0] == b"kv@engine-1"
            assert not other.poll(200)
        finally:
            wanted.close(linger=0)
            other.close(linger=0)


def test_inproc_endpoint_takes_the_rank_suffix():
    with ZmqEventPublisher("inproc://pagetable-test-kv", topic="", data_parallel_rank=2) as publisher:
        assert publisher.endpoint == "inproc://pagetable-test-kv_dp2"
        sub = subscriber(publisher.endpoint, "")
        try:
            (ours, theirs), = batches(1)
            publisher.publish(ours)
            topic, seq_bytes, payload = recv(sub)
            theirs.data_parallel_rank = 2
            assert (topic, seq_bytes) == (b"", (0).to_bytes(8, "big"))
            assert SCHEMA_DECODER.decode(payload) == theirs
        finally:
            sub.close(linger=0)


def test_batch_that_cannot_be_encoded_takes_no_sequence_number(caplog):
    with ZmqEventPublisher("tcp://127.0.0.1:0", topic="kv") as publisher:
        sub = subscriber(publisher.endpoint, "kv")
        try:
            bad = KVEventBatch(1.0, [BlockRemoved([1], "GPU")])
            bad.events[0].medium = object()
            (good, theirs), = batches(1, rank=0)
            publisher.publish(bad)
            publisher.publish(good)
            topic, seq_bytes, payload = recv(sub)
            assert seq_bytes == (0).to_bytes(8, "big")
            assert SCHEMA_DECODER.decode(payload) == theirs
        finally:
            sub.close(linger=0)
    assert "cannot encode" in caplog.text


def test_shutdown_sends_what_was_queued_and_refuses_more():
    publisher = ZmqEventPublisher("tcp://127.0.0.1:0", topic="kv")
    sub = subscriber(publisher.endpoint, "kv")
    try:
        pairs = batches(50)
        for ours, _ in pairs:
            publisher.publish(ours)
        publisher.shutdown()
        assert publisher.closed and not publisher._thread.is_alive()
        seqs = [int.from_bytes(recv(sub)[1], "big") for _ in pairs]
        assert seqs == list(range(50))
        with pytest.raises(RuntimeError, match="shut down"):
            publisher.publish(pairs[0][0])
        publisher.shutdown()   # again: nothing happens
    finally:
        sub.close(linger=0)
        publisher.shutdown()


def port_of(endpoint):
    return int(endpoint.rpartition(":")[2])


def test_a_terminated_context_stops_the_thread_and_publish_says_so(caplog):
    class Terminated:
        """Stands in for the PUB socket of a context someone has terminated."""

        closed = False

        def send_multipart(self, frames):
            raise zmq.ContextTerminated()

        def close(self, linger=None):
            self.closed = True

    publisher = ZmqEventPublisher("tcp://127.0.0.1:0")
    try:
        publisher._pub.close(linger=0)    # the thread is idle, waiting on its queue
        publisher._pub = Terminated()
        publisher.publish(KVEventBatch(1.0, []))
        publisher._thread.join(5.0)
        assert not publisher._thread.is_alive() and publisher._pub.closed
        with pytest.raises(RuntimeError, match="thread has stopped"):
            publisher.publish(KVEventBatch(1.0, []))
        assert "context was terminated" in caplog.text
    finally:
        publisher.shutdown()


def test_context_manager_shuts_down_and_frees_the_port():
    # A wildcard host binds (as in vLLM); a named host with a port connects.
    with ZmqEventPublisher("tcp://*:0") as publisher:
        assert publisher.endpoint.startswith("tcp://0.0.0.0:")
        port = port_of(publisher.endpoint)
    assert publisher.closed and not publisher._thread.is_alive()
    # ZeroMQ closes a socket on its I/O thread, soon after the publisher's thread ends.
    deadline = time.monotonic() + 3.0
    while True:
        try:
            again = ZmqEventPublisher(f"tcp://*:{port}")
            break
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still bound"
            time.sleep(0.02)
    with again:
        assert port_of(again.endpoint) == port


def test_a_named_host_with_a_port_is_connected_to():
    context = zmq.Context.instance()
    sink = context.socket(zmq.SUB)   # what a proxy would bind
    sink.setsockopt(zmq.LINGER, 0)
    sink.setsockopt(zmq.SUBSCRIBE, b"")
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    publishers = []
    try:
        after_handshake(sink, lambda: publishers.append(
            ZmqEventPublisher(f"tcp://127.0.0.1:{port}", topic="kv")))
        with publishers[0] as publisher:
            assert publisher.endpoint == f"tcp://127.0.0.1:{port}"
            (ours, theirs), = batches(1, rank=0)
            publisher.publish(ours)
            topic, seq_bytes, payload = recv(sink)
            assert (topic, seq_bytes) == (b"kv", bytes(8))
            assert SCHEMA_DECODER.decode(payload) == theirs
    finally:
        sink.close(linger=0)
        for publisher in publishers:
            publisher.shutdown()


def test_binding_a_port_in_use_raises_os_error_naming_the_endpoint():
    with ZmqEventPublisher("tcp://*:0") as publisher:
        port = port_of(publisher.endpoint)
        with pytest.raises(OSError, match=rf"endpoint 'tcp://\*:{port}'.*in use"):
            ZmqEventPublisher(f"tcp://*:{port}")
        with pytest.raises(OSError, match="replay_endpoint"):
            ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint=f"tcp://*:{port}")


# ----------------------------------------------------------------- publisher, replay


def test_replay_sends_the_rest_then_the_end_marker():
    with ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0",
                           topic="kv") as publisher:
        assert publisher.replay_endpoint.startswith("tcp://127.0.0.1:")
        sub = subscriber(publisher.endpoint, "kv")
        client = dealer(publisher.replay_endpoint)
        try:
            pairs = batches(5, rank=0)
            for ours, _ in pairs:
                publisher.publish(ours)
            live = [recv(sub) for _ in pairs]    # all five sent, so all five buffered
            replies = replay(client, 2)
            assert replies[:-1] == live[2:]
            assert replies[-1] == [b"", (-1).to_bytes(8, "big", signed=True), b""]
            for (topic, seq_bytes, payload), (_, theirs) in zip(replies[:-1], pairs[2:]):
                assert topic == b"kv"
                assert SCHEMA_DECODER.decode(payload) == theirs
            assert [int.from_bytes(r[1], "big") for r in replay(client, 0)[:-1]] == [0, 1, 2, 3, 4]
            assert replay(client, 5) == [[b"", ZmqEventPublisher.END_SEQ, b""]]
        finally:
            sub.close(linger=0)
            client.close(linger=0)


def test_replay_keeps_only_the_last_buffer_steps_and_ignores_bad_requests():
    with ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0",
                           buffer_steps=2, topic="kv") as publisher:
        sub = subscriber(publisher.endpoint, "kv")
        client = dealer(publisher.replay_endpoint)
        try:
            for ours, _ in batches(5):
                publisher.publish(ours)
            for _ in range(5):
                recv(sub)
            client.send_multipart((b"", b"\x00" * 8, b"extra frame"))   # four frames: ignored
            assert [int.from_bytes(r[1], "big") for r in replay(client, 0)[:-1]] == [3, 4]
        finally:
            sub.close(linger=0)
            client.close(linger=0)


# ----------------------------------------------------------------- publisher, arguments


@pytest.mark.parametrize(
    "endpoint, rank, expected",
    [
        ("tcp://*:5557", 0, "tcp://*:5557"),
        ("tcp://*:5557", 2, "tcp://*:5559"),
        ("tcp://10.0.0.1:6000", 1, "tcp://10.0.0.1:6001"),
        ("tcp://[::1]:6000", 1, "tcp://[::1]:6001"),
        ("tcp://127.0.0.1:0", 4, "tcp://127.0.0.1:0"),
        ("inproc://kv", 1, "inproc://kv_dp1"),
        ("ipc:///tmp/kv", 0, "ipc:///tmp/kv"),
        (None, 3, None),
    ],
)
def test_offset_endpoint_port(endpoint, rank, expected):
    assert offset_endpoint_port(endpoint, rank) == expected


@pytest.mark.parametrize(
    "endpoint, rank, match",
    [
        ("ipc:///tmp/kv", 1, "tcp:// or inproc://"),
        ("tcp://*:65535", 1, "past port 65535"),
        ("tcp://*", 1, "port"),
        ("localhost:5557", 0, "ZeroMQ address"),
    ],
)
def test_offset_endpoint_port_refuses(endpoint, rank, match):
    with pytest.raises(ValueError, match=match):
        offset_endpoint_port(endpoint, rank)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(endpoint=5557), TypeError, "endpoint must be a str"),
        (dict(endpoint="*:5557"), ValueError, "endpoint must be a ZeroMQ address"),
        (dict(endpoint="tcp://*"), ValueError, "endpoint must end in a port"),
        (dict(endpoint="tcp://*:99999"), ValueError, "endpoint must end in a port"),
        (dict(endpoint="bogus://x"), ValueError, "endpoint 'bogus://x' is not an address"),
        (dict(replay_endpoint=b"tcp://*:1"), TypeError, "replay_endpoint must be a str"),
        (dict(replay_endpoint="tcp://*:0", data_parallel_rank=1, endpoint="ipc:///tmp/x"),
         ValueError, "endpoint must be tcp:// or inproc://"),
        (dict(buffer_steps=-1), ValueError, "buffer_steps"),
        (dict(buffer_steps=1.5), TypeError, "buffer_steps"),
        (dict(hwm=-1), ValueError, "hwm"),
        (dict(hwm="1"), TypeError, "hwm"),
        (dict(max_queue_size=-1), ValueError, "max_queue_size"),
        (dict(topic=b"kv"), TypeError, "topic"),
        (dict(data_parallel_rank=-1), ValueError, "data_parallel_rank"),
        (dict(data_parallel_rank=True), TypeError, "data_parallel_rank"),
    ],
)
def test_bad_publisher_arguments_raise_naming_them(kwargs, exc, match):
    kwargs = dict(dict(endpoint="tcp://127.0.0.1:0"), **kwargs)
    with pytest.raises(exc, match=match):
        ZmqEventPublisher(**kwargs)


def test_publish_refuses_what_is_not_a_batch():
    with ZmqEventPublisher("tcp://127.0.0.1:0") as publisher:
        with pytest.raises(TypeError, match="batch must be a KVEventBatch"):
            publisher.publish(SchemaKVEventBatch(1.0, []))
        assert publisher.topic == "" and publisher.replay_endpoint is None
        assert publisher.data_parallel_rank == 0


def test_null_publisher_checks_like_the_real_one():
    with NullEventPublisher(data_parallel_rank=5) as publisher:
        batch = KVEventBatch(1.0, [AllBlocksCleared()])
        publisher.publish(batch)
        assert batch.data_parallel_rank == 5
        with pytest.raises(TypeError, match="batch"):
            publisher.publish([AllBlocksCleared()])
    with pytest.raises(RuntimeError, match="shut down"):
        publisher.publish(batch)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        NullEventPublisher(-1)


def test_a_caching_managers_events_reach_a_subscriber_decoded_by_the_schema():
    """End to end: the events a prefix-caching KVCacheManager records (stores with
    LoRA and salt keys, an eviction, a reset), published and received over loopback
    TCP, decode with the schema's own structs into exactly what the manager said."""
    from pagetable import KVCacheManager
    from pagetable.prefix import ExtraKeys, hash_prompt

    kv = KVCacheManager(6, 4, enable_prefix_caching=True, hash_seed="0",
                        enable_kv_cache_events=True, data_parallel_rank=2)
    keys = ExtraKeys(lora_name="sql", lora_path="/a/sql", lora_id=7, cache_salt="t")
    kv.add_sequence(0, token_ids=list(range(9)), extra_keys=keys)
    kv.free_sequence(0)
    kv.add_sequence(1, token_ids=list(range(100, 121)))     # evicts the freed tail first
    kv.reset_prefix_cache()
    batch = kv.take_events()
    assert [type(e).__name__ for e in batch.events] == [
        "BlockStored", "BlockRemoved", "BlockRemoved", "BlockStored", "AllBlocksCleared"]
    first = batch.events[0]
    digests = hash_prompt(list(range(9)), 4, keys, seed="0")
    assert first.block_hashes == [int.from_bytes(d, "big") & (2**64 - 1) for d in digests]
    assert first.extra_keys == [("sql", "t"), ("sql",)] and first.lora_id == 7
    assert batch.events[1].block_hashes == [first.block_hashes[1]]        # the tail first
    with ZmqEventPublisher("tcp://127.0.0.1:0", topic="kv") as publisher:
        sub = subscriber(publisher.endpoint, "kv")
        try:
            publisher.publish(batch)
            topic, seq_bytes, payload = recv(sub)
        finally:
            sub.close(linger=0)
    assert (topic, seq_bytes) == (b"kv", (0).to_bytes(8, "big"))
    theirs = SCHEMA_DECODER.decode(payload)
    assert theirs.data_parallel_rank == 2 and theirs.ts == batch.ts
    assert [type(e).__name__ for e in theirs.events] == [
        "SchemaBlockStored", "SchemaBlockRemoved", "SchemaBlockRemoved", "SchemaBlockStored",
        "SchemaAllBlocksCleared"]
    assert theirs.events[0].block_hashes == first.block_hashes
    assert theirs.events[0].token_ids == list(range(8))
    assert theirs.events[3].parent_block_hash is None and theirs.events[3].block_size == 4
    assert decode_batch(payload) == batch
