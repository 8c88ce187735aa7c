"""Saving and loading: round trips, and every kind of damaged file is refused."""

import copy
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import pagetable
from pagetable import BlockAllocator, CorruptStateError, KVCacheManager, PageTable
from pagetable import _state


# ------------------------------------------------------------------ objects to save

def make_table(seed=0, block_size=16, n=40):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=n, replace=False)
    lengths = rng.integers(1, 30, size=n)
    pt = PageTable(block_size)
    pt.append_blocks(np.repeat(ids, lengths), rng.integers(0, 2**31 - 1, size=int(lengths.sum())))
    pt.fork_sequence(int(ids[0]), 7)
    pt.remove_sequence(int(ids[1]))            # a hole in the rows, and in the order
    pt.append_block(int(ids[1]), 5)
    return pt


def make_manager(seed=0, block_size=4):
    rng = np.random.default_rng(seed)
    kv = KVCacheManager(256, block_size)
    for s in range(12):
        kv.add_sequence(s, int(rng.integers(0, 20)))
    kv.fork(3, 100)
    kv.append_tokens([3, 100, 5], [2, 3, 1])
    kv.free_sequence([1, 7])
    kv.add_sequence(200, 0)
    return kv


def make_allocator():
    pool = BlockAllocator(64)
    blocks = pool.allocate(20)
    pool.incref(blocks[:5])
    pool.free(blocks[10:15])
    return pool


def same_table(a, b):
    assert a == b
    assert list(a) == list(b)            # insertion order too
    assert repr(a) == repr(b)


def same_manager(a, b):
    seqs = a.page_table.sequence_ids()
    assert np.array_equal(seqs, b.page_table.sequence_ids())
    assert np.array_equal(a.seq_lens(seqs), b.seq_lens(seqs))
    assert np.array_equal(a.block_table(seqs), b.block_table(seqs))
    assert a.allocator == b.allocator
    assert a == b
    b.check()
    # And they go on making the same decisions.
    live = [int(s) for s in seqs[:4]]
    ra, rb = a.append_tokens(live, 5), b.append_tokens(live, 5)
    assert ra == rb
    assert a.add_sequence(999, 9) == b.add_sequence(999, 9)


# ----------------------------------------------------------------------- round trips

@pytest.mark.parametrize("block_size", [1, 16, 17])
def test_table_round_trips(tmp_path, block_size):
    pt = make_table(block_size=block_size)
    path = tmp_path / "table.npz"
    pt.save(path)
    loaded = PageTable.load(path)
    same_table(pt, loaded)
    same_table(pt, pagetable.load(str(path)))
    same_table(pt, pickle.loads(pickle.dumps(pt)))
    same_table(pt, copy.deepcopy(pt))
    same_table(pt, pt.copy())
    loaded.append_block(12345, 1)
    assert 12345 not in pt
    loaded._check_invariants()


def test_empty_objects_round_trip(tmp_path):
    for obj in (PageTable(), BlockAllocator(1), KVCacheManager(1, 1)):
        path = tmp_path / f"{type(obj).__name__}.npz"
        obj.save(path)
        again = type(obj).load(path)
        assert type(again) is type(obj)
        assert pickle.loads(pickle.dumps(obj)) == obj == again


def test_manager_round_trips(tmp_path):
    for make in (lambda: make_manager(), lambda: make_manager(1, block_size=3)):
        kv = make()
        path = tmp_path / "kv.npz"
        kv.save(path)
        same_manager(make(), KVCacheManager.load(path))
        same_manager(make(), pagetable.load(path))
        same_manager(make(), pickle.loads(pickle.dumps(make())))
        same_manager(make(), copy.copy(make()))
        same_manager(make(), make().copy())


def test_loaded_manager_owns_its_table_and_pool(tmp_path):
    kv = make_manager()
    kv.save(tmp_path / "kv.npz")
    loaded = KVCacheManager.load(tmp_path / "kv.npz")
    with pytest.raises(RuntimeError, match="belongs to a KVCacheManager"):
        loaded.page_table.append_block(5000, 1)
    with pytest.raises(RuntimeError, match="belongs to a KVCacheManager"):
        loaded.allocator.allocate(1)


def test_allocator_round_trips(tmp_path):
    pool = make_allocator()
    pool.save(tmp_path / "pool.npz")
    for again in (BlockAllocator.load(tmp_path / "pool.npz"), pickle.loads(pickle.dumps(pool)),
                  copy.copy(pool), pool.copy()):
        assert again == pool
        assert np.array_equal(again.allocate(30), pool.copy().allocate(30))


def test_file_objects_work_too():
    buffer = io.BytesIO()
    make_table().save(buffer)
    buffer.seek(0)
    same_table(make_table(), PageTable.load(buffer))


def test_save_replaces_a_file_whole(tmp_path):
    path = tmp_path / "table.npz"
    path.write_bytes(b"old contents")
    make_table().save(path)
    same_table(make_table(), PageTable.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["table.npz"]   # no temporary left


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        PageTable.load(tmp_path / "absent.npz")


def test_a_file_of_another_kind_is_refused(tmp_path):
    make_allocator().save(tmp_path / "pool.npz")
    with pytest.raises(CorruptStateError, match="holds a BlockAllocator, not a PageTable"):
        PageTable.load(tmp_path / "pool.npz")
    with pytest.raises(CorruptStateError, match="not a KVCacheManager"):
        KVCacheManager.load(tmp_path / "pool.npz")


# ----------------------------------------------------------------- damaged files

def saved_bytes(obj):
    buffer = io.BytesIO()
    obj.save(buffer)
    return buffer.getvalue()


def load_bytes(cls, data):
    return cls.load(io.BytesIO(data))


OBJECTS = {
    "PageTable": (PageTable, make_table),
    "BlockAllocator": (BlockAllocator, make_allocator),
    "KVCacheManager": (KVCacheManager, make_manager),
}


def accept_or_refuse(cls, data, original):
    """A damaged file must be refused with CorruptStateError, or load as the original
    (a flipped byte the format does not use, e.g. a ZIP timestamp)."""
    try:
        loaded = load_bytes(cls, data)
    except CorruptStateError:
        return "refused"
    assert loaded == original, "damaged file loaded as a different object"
    if isinstance(loaded, KVCacheManager):
        loaded.check()
    return "same"


def member_offsets(data):
    """Byte offsets where each ZIP member, each member's .npy data, and the central
    directory begin: the section boundaries of a file."""
    offsets = {0, len(data)}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            offsets.add(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            body = info.header_offset + 30 + name_len + extra_len
            offsets.update({body, body + 10, body + 128, body + info.compress_size})
    offsets.add(data.rfind(b"PK\x01\x02"))
    offsets.add(data.rfind(b"PK\x05\x06"))
    return sorted(o for o in offsets if 0 <= o <= len(data))


@pytest.mark.parametrize("kind", list(OBJECTS))
def test_truncated_files_are_refused_at_every_section_and_length(kind):
    cls, make = OBJECTS[kind]
    data = saved_bytes(make())
    cuts = set(member_offsets(data))
    cuts.update(range(0, len(data), max(1, len(data) // 300)))
    cuts.update(o + d for o in member_offsets(data) for d in (-1, 1))
    cuts = sorted(c for c in cuts if 0 <= c < len(data))
    assert len(cuts) > 100
    for cut in cuts:
        with pytest.raises(CorruptStateError):
            load_bytes(cls, data[:cut])


def member_bodies(data):
    """The byte ranges of each member's .npy bytes (header and array) inside a file."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            body = info.header_offset + 30 + name_len + extra_len
            ranges.append(range(body, body + info.compress_size))
    return ranges


@pytest.mark.parametrize("kind", list(OBJECTS))
def test_flipped_bytes_are_refused_or_harmless(kind):
    """Every flip inside a member's bytes is refused (the ZIP's CRC-32 covers them);
    a flip elsewhere is refused, or falls in a field nothing reads (a timestamp, a
    "made by" version) and loads the very same object; never anything else."""
    cls, make = OBJECTS[kind]
    original = make()
    data = saved_bytes(original)
    bodies = member_bodies(data)
    rng = np.random.default_rng(1)
    positions = set(rng.integers(0, len(data), size=400).tolist())
    for o in member_offsets(data):           # every header byte near each boundary
        positions.update(range(max(0, o - 4), min(len(data), o + 140)))
    outcomes = {"refused": 0, "same": 0}
    for position in sorted(positions):
        inside = any(position in body for body in bodies)
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            outcome = accept_or_refuse(cls, bytes(damaged), original)
            assert outcome == "refused" or not inside, f"flip at {position} inside a member loaded"
            outcomes[outcome] += 1
    assert outcomes["refused"] > outcomes["same"] > 0, outcomes


def rewrite(data, change):
    """Re-save a file's arrays after ``change(arrays)`` edits them (CRCs stay valid)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def edit(key, function):
    def change(arrays):
        arrays[key] = function(arrays[key].copy())
    return change


def put(index, value):
    def function(array):
        array[index] = value
        return array
    return function


MANAGER_EDITS = [
    ("version", edit("version", lambda a: np.array(2)), "version 2"),
    ("format", edit("format", lambda a: np.array("pagetables")), "format"),
    ("kind", edit("kind", lambda a: np.array("Nonsense")), "kind"),
    ("no tokens", lambda arrays: arrays.pop("tokens"), "tokens"),
    ("refcount up", edit("refcount", put(0, 5)), "reference count"),
    ("refcount negative", edit("refcount", put(3, -1)), "refcount"),
    ("free stack duplicate", edit("free_stack", lambda a: np.append(a, a[0])), "free stack"),
    ("free stack lost a block", edit("free_stack", lambda a: a[1:]), "not on the free stack"),
    ("free stack holds a used block", edit("free_stack", put(0, 0)), "free stack"),
    ("token count", edit("tokens", put(0, 10**6)), "tokens"),
    ("tokens disagree with blocks", edit("tokens", lambda a: a + 4), "blocks"),
    ("lengths", edit("lengths", lambda a: put(0, 2**40)(a.astype(np.int64))), "lengths"),
    ("lengths overflow", edit("lengths", lambda a: np.full(a.shape, 2**62)), "lengths"),
    ("duplicate id", edit("seq_ids", put(1, 0)), "more than once"),
    ("negative id", edit("seq_ids", put(0, -1)), "seq_ids"),
    ("block outside the pool", edit("blocks", put(0, 10**6)), "outside the pool"),
    ("blocks short", edit("blocks", lambda a: a[:-1]), "add up"),
    ("2-D blocks", edit("blocks", lambda a: a.reshape(1, -1)), "1-D"),
    ("float blocks", edit("blocks", lambda a: a.astype(np.float64)), "dtype"),
    ("swapped arrays", lambda arrays: arrays.update(seq_ids=arrays["lengths"], lengths=arrays["seq_ids"]),
     "lengths|seq_ids|more than once"),
    ("swapped counts", lambda arrays: arrays.update(refcount=arrays["free_stack"], free_stack=arrays["refcount"]),
     "reference counts|free_stack|free stack"),
    ("block size 0", edit("block_size", lambda a: np.array(0)), "block_size"),
    ("pool too large", edit("num_blocks", lambda a: np.array(2**31)), "num_blocks"),
    ("block size vector", edit("block_size", lambda a: np.array([4])), "scalar"),
]


@pytest.mark.parametrize("name, change, match", MANAGER_EDITS, ids=[e[0] for e in MANAGER_EDITS])
def test_edited_manager_files_are_refused_naming_the_problem(name, change, match):
    data = rewrite(saved_bytes(make_manager()), change)
    with pytest.raises(CorruptStateError, match=match):
        load_bytes(KVCacheManager, data)


@pytest.mark.parametrize("name, change, match", MANAGER_EDITS, ids=[e[0] for e in MANAGER_EDITS])
def test_edited_states_in_pickles_are_refused(name, change, match):
    state = make_manager()._state()
    change(state)
    with pytest.raises(CorruptStateError, match=match):
        pickle.loads(pickle.dumps(_Restore(pagetable._state.rebuild, state)))


class _Restore:
    def __init__(self, function, state):
        self.function, self.state = function, state

    def __reduce__(self):
        return (self.function, (self.state,))


def test_states_that_are_not_dicts_of_arrays_are_refused():
    from pagetable._state import rebuild as _restore

    for state in (None, [], {"format": "pagetable"}, {"format": np.array("pagetable"), "version": 1},
                  {k: v.tolist() for k, v in make_table()._state().items()}):
        with pytest.raises(CorruptStateError):
            _restore(state)


def test_pickled_objects_inside_a_file_are_never_unpickled(tmp_path):
    class Bomb:
        def __reduce__(self):
            return (os.system, ("echo exploded > /dev/null",))

    arrays = make_table()._state()
    arrays["blocks"] = np.array([Bomb()], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with pytest.raises(CorruptStateError, match="blocks"):
        load_bytes(PageTable, buffer.getvalue())


def test_compressed_or_foreign_members_are_refused():
    arrays = make_table()._state()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with pytest.raises(CorruptStateError, match="compressed"):
        load_bytes(PageTable, buffer.getvalue())
    data = saved_bytes(make_table())
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CorruptStateError, match="unexpected member"):
        load_bytes(PageTable, buffer.getvalue())
    with pytest.raises(CorruptStateError):
        load_bytes(PageTable, b"not a zip file at all")
    with pytest.raises(CorruptStateError):
        load_bytes(PageTable, b"")


def npz_with(members):
    """An uncompressed .npz (valid CRCs) with the given raw member bodies."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def raw_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def npy_header(shape, descr="<i4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_a_header_that_lies_about_its_size_allocates_nothing():
    """A .npy header claiming 2**40 entries is refused before anything is allocated."""
    members = raw_members(saved_bytes(make_table()))
    body = members["blocks.npy"]
    header_end = body.index(b"\n") + 1
    members["blocks.npy"] = npy_header((2**40,)) + body[header_end:]
    with pytest.raises(CorruptStateError, match="declares"):
        load_bytes(PageTable, npz_with(members))


def test_a_member_given_twice_is_refused():
    import warnings

    members = raw_members(saved_bytes(make_table()))
    data = npz_with(members)
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")         # zipfile warns of the duplicate name
        archive.writestr("blocks.npy", members["blocks.npy"])
    with pytest.raises(CorruptStateError, match="twice"):
        load_bytes(PageTable, buffer.getvalue())


def test_empty_sequences_and_insertion_order_survive():
    state = _state.header("PageTable")
    state.update(block_size=np.array(4), seq_ids=np.array([9, 3, 5], dtype=np.int64),
                 lengths=np.array([0, 2, 0]), blocks=np.array([7, 8], dtype=np.int32))
    pt = PageTable._from_state(state)
    assert list(pt) == [9, 3, 5]
    assert pt.get_sequence_blocks(9).tolist() == []
    assert pt.get_sequence_blocks(3).tolist() == [7, 8]
    same_table(pt, pickle.loads(pickle.dumps(pt)))
    pt._check_invariants()


# ------------------------------------------------ windowed managers (docs/HYBRID.md)

def _windowed(caching, **kind):
    kv = KVCacheManager(40, 2, enable_prefix_caching=caching, group_idx=2, **kind)
    tokens = list(range(11))
    kv.add_sequence(0, token_ids=tokens if caching else None, num_tokens=None if caching else 11)
    for t in range(7):
        kv.append_tokens([0], token_ids=[100 + t] if caching else None)
    kv.fork(0, 1)
    kv.append_tokens([1], 1, token_ids=[7] if caching else None, num_lookahead=3)
    kv.check()
    return kv


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("kind", [{"sliding_window": 5}, {"attention_chunk": 4}])
def test_windowed_manager_round_trips(tmp_path, caching, kind):
    kv = _windowed(caching, **kind)
    assert (kv.block_table([0])[0] == pagetable.PAD_SLOT_ID).any()    # something was released
    def load(kv):
        kv.save(tmp_path / "kv.npz")
        return pagetable.load(tmp_path / "kv.npz")

    for rebuild in (load, lambda kv: pickle.loads(pickle.dumps(kv)), copy.deepcopy):
        other = rebuild(kv)
        other.check()
        assert other == kv
        np.testing.assert_array_equal(other.block_table([0, 1]), kv.block_table([0, 1]))
        # The window, the live entries and the chain tails came back: the next steps agree.
        ids = [50, 51] if caching else None
        assert other.append_tokens([0, 1], token_ids=ids) == kv.append_tokens([0, 1], token_ids=ids)
        assert other == kv
        kv = other


def test_windowed_state_with_a_pad_in_the_middle_is_refused():
    state = _windowed(False, sliding_window=5)._state()
    blocks = state["blocks"].copy()
    held = np.flatnonzero(blocks >= 0)
    blocks[held[-1]] = -1
    state["blocks"] = blocks
    state["refcount"] = state["refcount"].copy()
    with pytest.raises(CorruptStateError):
        KVCacheManager._from_state(state)


def test_a_full_attention_state_may_not_hold_pad_entries():
    kv = KVCacheManager(8, 2)
    kv.add_sequence(0, 4)
    state = kv._state()
    state["blocks"] = np.array([-1, 1], dtype=np.int32)
    with pytest.raises(CorruptStateError, match="outside"):
        KVCacheManager._from_state(state)
