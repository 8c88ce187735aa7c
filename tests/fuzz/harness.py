#!/usr/bin/env python3
"""Differential fuzz harness for pagetable's public API.

``run_one(data)`` decodes ``data`` (any bytes) into a sequence of calls and drives,
side by side:

* :class:`pagetable.PageTable` against :class:`pagetable.reference.ReferencePageTable`.
  The reference trusts its arguments, so a small validating oracle here decides from
  the raw arguments, in plain Python, whether each call must succeed (and with which
  normalized integers) or which documented exception it must raise;
* :class:`pagetable.KVCacheManager` against
  :class:`pagetable.reference.ReferenceKVCacheManager`;
* :class:`pagetable.BlockAllocator` against
  :class:`pagetable.reference.ReferenceBlockAllocator`.

The references receive *normalized* arguments (clean int64 arrays and Python ints,
produced by the oracle), never the raw ones: the library and its reference share
``pagetable._convert``, and feeding both the same raw value would hide a conversion
bug they share.

After every call the harness checks: the same outcome (both succeed with equal
results, or both raise the same documented exception), that a call that raised
changed nothing, and that the whole observable state agrees.  Now and then it
round-trips objects through copy / pickle / save / load and feeds the loaders mutated
bytes of saved files.  Any divergence raises ``AssertionError`` with the call log.

The decoder is self-contained (no atheris needed): ``tests/test_fuzz.py`` runs it over
deterministic pseudo-random inputs, ``tests/fuzz/fuzz_atheris.py`` under libFuzzer.

Environment:
``PAGETABLE_FUZZ_VERBOSE=1``   print each call as it is made (reproducing a crash file);
``PAGETABLE_FUZZ_IGNORE=a,b``  tolerate the known divergences named (see ``KNOWN``), to
                               keep a long fuzzing run going past a bug already reported.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import pickle
import shutil
import sys
import tempfile
from decimal import Decimal
from fractions import Fraction

import numpy as np

if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("pagetable") is None:   # replaying from a built checkout
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent.parent))

import pagetable
from pagetable import PAD_SLOT_ID, BlockAllocator, KVCacheManager, OutOfBlocksError, PageTable
from pagetable.reference import ReferencePageTable
from pagetable.reference import ReferenceBlockAllocator, ReferenceKVCacheManager

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

CorruptStateError = getattr(pagetable, "CorruptStateError", None)

VERBOSE = os.environ.get("PAGETABLE_FUZZ_VERBOSE", "") not in ("", "0")
IGNORE = {name.strip() for name in os.environ.get("PAGETABLE_FUZZ_IGNORE", "").split(",") if name.strip()}

# Known library bugs that PAGETABLE_FUZZ_IGNORE may name: the generator then stops
# producing the inputs that trigger them (or, for ref-counts, that one check is
# skipped), so that a long run can find other bugs.  Each is still a bug: the default
# (nothing ignored) exercises all of them.
KNOWN = {
    # open at f7d638a:
    "ref-counts": "ReferenceKVCacheManager accepts a negative or >= 2**63 scalar num_new_tokens "
                  "(for an empty batch; OutOfBlocksError otherwise); the manager raises "
                  "ValueError / OverflowError",
    # fixed on main in f7d638a:
    "bool-in-list": "a list mixing bools with ints is read as integers",
    "minus-one-id": "PageTable batch queries (rows, num_blocks, block_table, to_csr) accept "
                    "sequence id -1 at the start of a batch",
    "error-priority": "KVCacheManager reports the first bad entry (a repeat before an unknown id: "
                      "ValueError), the reference checks every id is known first (KeyError)",
    # fixed on main in 5a6a46b:
    "mixed-scalars": "a list mixing np.uint64 with signed integers raises StopIteration",
    "byte-order": "non-native byte order arrays (and out=) are read / written unswapped",
    "unaligned-out": "slot_mapping accepts an unaligned out=",
    "overlap-out": "slot_mapping with out= overlapping seq_ids / positions: wrong answer or an "
                   "error that does not name out",
}

# The exceptions the contract allows, most specific first (classification order).
_DOCUMENTED = [OutOfBlocksError]
if CorruptStateError is not None:
    _DOCUMENTED.append(CorruptStateError)
_DOCUMENTED += [OverflowError, KeyError, IndexError, TypeError, ValueError, RuntimeError]


def category(exc: BaseException) -> type | None:
    """The documented exception class ``exc`` counts as, or None (undocumented)."""
    for cls in _DOCUMENTED:
        if isinstance(exc, cls):
            # RuntimeError is documented only as OutOfBlocksError, for read-only views
            # and for racing threads; the harness says where it expects it.
            return cls
    return None


def _has_persistence(cls) -> bool:
    return callable(getattr(cls, "save", None)) and callable(getattr(cls, "load", None))


HAVE_TABLE_SAVE = _has_persistence(PageTable)
HAVE_ALLOC_SAVE = _has_persistence(BlockAllocator)
HAVE_KV_SAVE = _has_persistence(KVCacheManager)
HAVE_LOAD_ANY = callable(getattr(pagetable, "load", None))
HAVE_ALLOC_COPY = callable(getattr(BlockAllocator, "copy", None))
HAVE_KV_COPY = callable(getattr(KVCacheManager, "copy", None))


def _probe_read_only_views() -> tuple[bool, bool]:
    """Whether a manager's page_table / allocator refuse changes (landing on main)."""
    table_ro = alloc_ro = False
    kv = KVCacheManager(4, 4)
    kv.add_sequence(0, 1)
    try:
        kv.page_table.append_block(5, 0)
    except RuntimeError:
        table_ro = True
    except Exception:
        pass
    try:
        kv.allocator.allocate(1)
    except RuntimeError:
        alloc_ro = True
    except Exception:
        pass
    return table_ro, alloc_ro


READ_ONLY_TABLE_VIEW, READ_ONLY_ALLOCATOR_VIEW = _probe_read_only_views()

_TMPDIR = None


def _tmpdir() -> pathlib.Path:
    global _TMPDIR
    if _TMPDIR is None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _TMPDIR = pathlib.Path(tempfile.mkdtemp(prefix="pagetable-fuzz-", dir=shm))
        import atexit

        atexit.register(shutil.rmtree, str(_TMPDIR), True)
    return _TMPDIR


# --------------------------------------------------------------------------- decoder

class Input:
    """Reads choices from the fuzzer's bytes; past the end every choice is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        """An integer in ``0 .. n - 1``."""
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        value = 0
        for _ in range((n.bit_length() + 7) // 8):
            value = (value << 8) | self.byte()
        return value % n

    def one_in(self, k: int) -> bool:
        return self.below(k) == 0

    def pick(self, seq):
        return seq[self.below(len(seq))]


# --------------------------------------------------------------------------- values

class Idx:
    """An object that is an integer through ``__index__`` (operator.index accepts it)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Idx({self.value})"


class SubArray(np.ndarray):
    """A trivial ndarray subclass."""


# Array builders; reproducers in failure messages call them by these names.
def arr(vals, dtype):
    return np.array(vals, dtype=dtype)


def strided(vals, dtype):
    """A non-contiguous view: every other element of a buffer twice as long."""
    base = np.zeros(2 * len(vals), dtype=dtype)
    base[::2] = vals
    return base[::2]


def reversed_view(vals, dtype):
    """A view with a negative stride."""
    a = np.array(list(vals)[::-1], dtype=dtype)
    return a[::-1]


def unaligned(vals, dtype):
    """A writeable array whose data pointer is off by one byte."""
    d = np.dtype(dtype)
    buf = bytearray(len(vals) * d.itemsize + 1)
    a = np.frombuffer(buf, dtype=d, count=len(vals), offset=1)
    a[...] = vals
    return a


def readonly(vals, dtype):
    a = np.array(vals, dtype=dtype)
    a.setflags(write=False)
    return a


def subclass(vals, dtype):
    return np.array(vals, dtype=dtype).view(SubArray)


def fortran2d(vals, dtype):
    return np.asfortranarray(np.array([vals, vals], dtype=dtype).T)


LAYOUTS = {
    "arr": arr, "strided": strided, "reversed_view": reversed_view, "unaligned": unaligned,
    "readonly": readonly, "subclass": subclass,
}

INT_DTYPES = ["int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
              ">i8", ">i4", ">u8", ">i2", "<i8", "intp", "uint"]

EDGE_INTS = [0, 1, 2, 3, 7, 15, 16, 17, 31, 255, 2**15, 2**31 - 2, 2**31 - 1, 2**31, 2**32 - 1,
             2**32, 2**53 + 1, 2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70,
             -1, -2, -16, -(2**31), -(2**31) - 1, -(2**63), -(2**63) - 1, -(2**64), -(2**70)]


def _colliding_ids(seed: int, count: int) -> list[int]:
    """Sequence ids whose Fibonacci hashes share their top 40 bits: they fall in one
    slot of the table's index at every index size up to 2**40 (long probe chains,
    removals that must shift entries back).  Just more ids if the hash changes."""
    fib = 0x9E3779B97F4A7C15
    inverse = pow(fib, -1, 2**64)
    out, j = [], 0
    while len(out) < count:
        key = (((seed << 24) | j) * inverse) % 2**64
        if key <= INT64_MAX:
            out.append(key)
        j += 1
    return out


COLLIDE = _colliding_ids(0x5EED5, 128)


def _non_ints():
    return [1.0, 0.0, -1.0, 0.5, float("nan"), float("inf"), True, False, np.True_, np.False_,
            None, "1", "", b"1", object(), [1], (1,), [], np.float64(1.0), np.float32(2.0),
            np.float16(0), 1 + 0j, np.complex128(1), Fraction(1, 1), Decimal(1),
            np.array(1.0), np.array([1]), np.array(True), np.str_("1"), {1}, {1: 2},
            np.datetime64(1, "D"), np.timedelta64(1), np.array(1.5, dtype=">f8")]


_REG: dict[int, tuple[object, str]] = {}


def reg(obj, code: str):
    """Remember how to spell ``obj`` in a reproducer (kept alive for the run)."""
    _REG[id(obj)] = (obj, code)
    return obj


def show_int(v: int) -> str:
    """``v`` in Python, near powers of two spelled as such (2**63, -(2**31)-1)."""
    a = abs(v)
    if a >= 2**15:
        for k in (a.bit_length() - 1, a.bit_length()):
            d = v - 2**k if v > 0 else v + 2**k
            if -2 <= d <= 2:
                base = f"2**{k}" if v > 0 else f"-(2**{k})"
                return base + (f"{d:+d}" if d else "")
    return repr(v)


def show(obj) -> str:
    entry = _REG.get(id(obj))
    if entry is not None and entry[0] is obj:
        return entry[1]
    if type(obj) is int:
        return show_int(obj)
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            return f"float({str(obj)!r})"
        return repr(obj)
    if isinstance(obj, np.ndarray):
        return f"np.array({obj.tolist()!r}, dtype={str(obj.dtype)!r})"
    if isinstance(obj, list):
        return "[" + ", ".join(show(x) for x in obj) + "]"
    if isinstance(obj, tuple):
        return "(" + ", ".join(show(x) for x in obj) + ("," if len(obj) == 1 else "") + ")"
    if type(obj) is object:
        return "object()"
    return repr(obj)


def fits(v: int, dtype) -> bool:
    info = np.iinfo(np.dtype(dtype))
    return info.min <= v <= info.max


def int_spelling(inp: Input, v: int):
    """One of the spellings of the integer ``v`` as a scalar argument."""
    r = inp.below(10)
    if r < 5:
        return v
    if r < 8:
        dtype = inp.pick(["int64", "int32", "int8", "uint64", "uint32", "uint8", "int16", "intp"])
        if fits(v, dtype):
            return np.dtype(dtype).type(v)
        return v
    if r == 8:
        return Idx(v)
    if fits(v, "int64") or fits(v, "uint64"):
        a = np.array(v, dtype="int64" if fits(v, "int64") else "uint64")
        return reg(a, f"np.array({show_int(v)}, dtype={str(a.dtype)!r})")
    return v


def non_int(inp: Input):
    value = inp.pick(_non_ints())
    if isinstance(value, np.ndarray):
        reg(value, f"np.array({value.tolist()!r}, dtype={str(value.dtype)!r})")
    elif type(value) is object:
        reg(value, "object()")
    return value


def gen_int(inp: Input, known: list[int], small: int = 8) -> int:
    r = inp.below(10)
    if r < 4 and known:
        return inp.pick(known)
    if r < 7:
        return inp.below(small)
    return inp.pick(EDGE_INTS)


def gen_scalar(inp: Input, known: list[int], small: int = 8):
    """A scalar argument: usually an integer in one of its spellings, sometimes not."""
    if inp.one_in(7):
        return non_int(inp)
    return int_spelling(inp, gen_int(inp, known, small))


def gen_length(inp: Input) -> int:
    return inp.pick([0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 8, 12, 17, 33])


def spell_array(inp: Input, vals: list[int]):
    """One of the spellings of the integer list ``vals`` as an array-like argument
    (sometimes a bad one: floats, bools, objects, wrong rank, a stray non-integer)."""
    r = inp.below(32)
    if r < 8:
        return list(vals)
    if r < 10:
        return tuple(vals)
    if r < 12:
        # numpy scalars of assorted types in a list (np.uint64 next to np.int64...)
        out = []
        for v in vals:
            dtype = inp.pick(["int64", "uint64", "int32", "uint8", "py", "py"])
            if dtype == "uint64" and "mixed-scalars" in IGNORE:
                dtype = "py"
            out.append(v if dtype == "py" or not fits(v, dtype) else np.dtype(dtype).type(v))
        return out
    if r < 25:
        dtype = inp.pick(INT_DTYPES)
        if dtype.startswith(">") and "byte-order" in IGNORE:
            dtype = dtype.replace(">", "<")
        if not all(fits(v, dtype) for v in vals):
            dtype = "int64" if all(fits(v, "int64") for v in vals) else None
        if dtype is None:
            return list(vals)
        layout = inp.pick(["arr", "arr", "arr", "strided", "reversed_view", "unaligned",
                           "readonly", "subclass"])
        a = LAYOUTS[layout](vals, dtype)
        return reg(a, f"{layout}({show(list(vals))}, {dtype!r})")
    if r == 25 and vals:
        if len(vals) < 5 and all(0 <= v < 2**40 for v in vals) and vals == list(range(vals[0], vals[0] + len(vals))):
            return range(vals[0], vals[0] + len(vals))
        return list(vals)
    if r == 26:   # a floating or complex array
        dtype = inp.pick(["float64", "float32", ">f8", "complex128", "float16"])
        with np.errstate(over="ignore"):   # float16 of 2**70 is inf, and that is fine
            a = np.array([float(v) for v in vals], dtype=dtype) if vals or inp.one_in(2) else np.array([], dtype=dtype)
        return reg(a, f"np.array({[float(v) for v in vals]!r}, dtype={dtype!r})")
    if r == 27:   # booleans
        a = np.array([bool(v & 1) for v in vals], dtype=bool)
        return reg(a, f"np.array({a.tolist()!r}, dtype=bool)") if inp.one_in(2) else [bool(v & 1) for v in vals]
    if r == 28:   # object array of ints
        a = np.empty(len(vals), dtype=object)
        a[:] = vals
        return reg(a, f"np.array({show(list(vals))}, dtype=object)")
    if r == 29:   # wrong rank
        kind = inp.below(4)
        if kind == 0:
            return [list(vals)]
        if kind == 1:
            if vals and all(fits(v, "int64") for v in vals):
                a = np.array([vals], dtype=np.int64)
                return reg(a, f"np.array([{show(list(vals))}])")
            return [[v] for v in vals]
        if kind == 2:
            v = vals[0] if vals else 0
            return v
        if all(fits(v, "int64") for v in vals):
            a = fortran2d(vals, "int64")
            return reg(a, f"fortran2d({show(list(vals))}, 'int64')")
        return [list(vals)]
    if r == 30:   # a stray non-integer element
        out = list(vals) or [0]
        stray = inp.pick([1.5, None, "x", True, np.float64(2.0), [1], Idx(1), 2.0, np.False_])
        if isinstance(stray, (bool, np.bool_)) and "bool-in-list" in IGNORE:
            stray = 1.5
        out[inp.below(len(out))] = stray
        return out
    # a non-array scalar where an array is expected
    return inp.pick([None, "12", 3.0, object(), {1, 2}, b"\x01"])


def gen_array(inp: Input, elem, length: int | None = None):
    n = gen_length(inp) if length is None else length
    return spell_array(inp, [elem(inp) for _ in range(n)])


# --------------------------------------------------------------------------- oracle

class Expect:
    """What a call may do: raise one of ``errors`` (must, if ``must_fail``) or succeed."""

    def __init__(self) -> None:
        self.errors: set[type] = set()
        self.must_fail = False
        self.why: list[str] = []

    def fail(self, why: str, *types: type) -> None:
        self.errors.update(types)
        self.must_fail = True
        self.why.append(why)

    def maybe(self, why: str, *types: type) -> None:
        self.errors.update(types)
        self.why.append("maybe: " + why)

    def describe(self) -> str:
        names = sorted(t.__name__ for t in self.errors)
        head = "must raise" if self.must_fail else ("may raise" if names else "must succeed")
        return f"{head} {names} ({'; '.join(self.why)})" if names else head


def scalar_int(x):
    """``x`` as a Python int if it is an integer (not a bool), else None."""
    if isinstance(x, (bool, np.bool_, np.timedelta64, np.datetime64)):
        return None
    if isinstance(x, int):
        return int(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Idx):
        return x.value
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iu":
        return int(x)
    return None


def o_scalar(ex: Expect, x, name: str, low: int, high: int | None):
    """An integer argument in ``low .. high``; returns the int or None."""
    v = scalar_int(x)
    if v is None:
        ex.fail(f"{name} is not an integer", TypeError)
        return None
    if v < low:
        if v < INT64_MIN:
            ex.fail(f"{name} negative beyond int64", ValueError, OverflowError)
        else:
            ex.fail(f"{name} = {v} below {low}", ValueError)
        return None
    if high is not None and v > high:
        ex.fail(f"{name} = {v} above {high}", OverflowError)
        return None
    return v


def o_seq(ex, x, name="sequence_id"):
    return o_scalar(ex, x, name, 0, INT64_MAX)


def o_block(ex, x, name="block_id"):
    return o_scalar(ex, x, name, 0, INT32_MAX)


def _is_element_int(x) -> bool:
    return (isinstance(x, (int, np.integer))
            and not isinstance(x, (bool, np.bool_, np.timedelta64, np.datetime64)))


def o_array(ex: Expect, x, name: str):
    """The integers of a 1-D integer array-like, or None (with the error recorded)."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            ex.fail(f"{name} has rank {x.ndim}", ValueError)
            return None
        kind = x.dtype.kind
        if kind in "iu":
            return [int(v) for v in x.tolist()]
        if x.size == 0 and kind not in "bO":
            ex.maybe(f"{name} is an empty {x.dtype} array", TypeError)
            return []
        ex.fail(f"{name} has dtype {x.dtype}", TypeError)
        return None
    if isinstance(x, (list, tuple, range)):
        items = list(x)
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in items):
            ex.fail(f"{name} is nested", TypeError, ValueError)
            return None
        if not all(_is_element_int(v) for v in items):
            ex.fail(f"{name} holds a non-integer", TypeError)
            return None
        return [int(v) for v in items]
    if _is_element_int(x):
        ex.fail(f"{name} is a scalar", ValueError)
        return None
    ex.fail(f"{name} is not array-like", TypeError, ValueError)
    return None


def o_range(ex: Expect, vals, name: str, kind: str) -> bool:
    """Range-check the elements; kind is seq, block, pos (any int64) or row (int32)."""
    ok = True
    for v in vals:
        if kind == "seq":
            if v < INT64_MIN:
                ex.fail(f"{name} holds {v}", ValueError, OverflowError); ok = False
            elif v < 0:
                ex.fail(f"{name} holds negative {v}", ValueError); ok = False
            elif v > INT64_MAX:
                ex.fail(f"{name} holds {v}", OverflowError); ok = False
        elif kind == "block":
            if v < INT64_MIN:
                ex.fail(f"{name} holds {v}", ValueError, OverflowError); ok = False
            elif v < 0:
                ex.fail(f"{name} holds negative {v}", ValueError); ok = False
            elif v > INT32_MAX:
                ex.fail(f"{name} holds {v}", OverflowError); ok = False
        elif kind == "pos":
            if not INT64_MIN <= v <= INT64_MAX:
                ex.fail(f"{name} holds {v}", OverflowError); ok = False
        elif kind == "row":
            if not -(2**31) <= v <= INT32_MAX:
                ex.fail(f"{name} holds {v}", OverflowError); ok = False
    return ok


def o_ids(ex, x, name, kind):
    vals = o_array(ex, x, name)
    if vals is None:
        return None
    return vals if o_range(ex, vals, name, kind) else None


def o_out(ex: Expect, out, shape: tuple, dtype: str, name: str = "out") -> None:
    """A caller's output buffer: ndarray, native ``dtype``, ``shape`` (-1: at least
    the known width, checked by the caller), C-contiguous, writeable, aligned."""
    if not isinstance(out, np.ndarray):
        ex.fail(f"{name} is not an ndarray", TypeError, ValueError)
        return
    if type(out) is not np.ndarray:
        ex.maybe(f"{name} is an ndarray subclass", TypeError, ValueError)
    if out.dtype != np.dtype(dtype) or not out.dtype.isnative:
        ex.fail(f"{name} has dtype {out.dtype}", TypeError, ValueError)
    if out.ndim != len(shape):
        ex.fail(f"{name} has rank {out.ndim}", ValueError)
        return
    for axis, want in enumerate(shape):
        if want >= 0 and out.shape[axis] != want:
            ex.fail(f"{name} has shape {out.shape}", ValueError)
    if not out.flags.c_contiguous:
        ex.fail(f"{name} is not C-contiguous", ValueError)
    if not out.flags.writeable:
        ex.fail(f"{name} is read-only", ValueError)
    if not out.flags.aligned:
        ex.fail(f"{name} is unaligned", ValueError)


# --------------------------------------------------------------------------- checking

class Divergence(AssertionError):
    pass


def _arrays_equal(a, b) -> bool:
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
            and a.dtype == b.dtype and a.dtype.isnative and np.array_equal(a, b))


def _desc_array(a) -> str:
    if not isinstance(a, np.ndarray):
        return repr(a)
    return f"{a.dtype}{list(a.shape)} {a.tolist()!r}"


def _snapshot_inputs(args):
    snap = []
    for a in args:
        if isinstance(a, np.ndarray):
            snap.append((a, a.copy()))
        elif isinstance(a, list):
            snap.append((a, list(a)))
    return snap


class Harness:
    def __init__(self, inp: Input) -> None:
        self.inp = inp
        self.log: list[str] = []
        self.ghosts: list[tuple[str, object, object]] = []
        self.hints: dict[int, int] = {}
        self._last_exception = None
        self.file_counter = 0
        self.new_table(16)
        self.kv = None
        self.kref = None
        self.alloc = None
        self.aref = None

    # -- reporting ------------------------------------------------------------------
    def note(self, line: str) -> None:
        self.log.append(line)
        if VERBOSE:
            print(line, file=sys.stderr)

    def diverge(self, what: str, exc: BaseException | None = None) -> None:
        tail = self.log[-80:]
        text = (f"{what}\n--- calls so far (pt: PageTable, kv: KVCacheManager, alloc: "
                f"BlockAllocator; builders in tests/fuzz/harness.py) ---\n" + "\n".join(tail))
        err = Divergence(text)
        if exc is not None:
            raise err from exc
        raise err

    def outcome(self, call_text: str, fn, ex: Expect, may_touch=()):
        """Run ``fn``; check its exception against ``ex``; return (ok, value)."""
        snap = _snapshot_inputs(may_touch)
        try:
            value = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._last_exception = exc
            self.note(f"{call_text}  # -> {type(exc).__name__}: {str(exc)[:160]}")
            cat = category(exc)
            if cat is None or cat is RuntimeError:
                self.diverge(f"{call_text} raised an undocumented {type(exc).__name__}: {exc!r}; "
                             f"expected: {ex.describe()}", exc)
            if not str(exc).strip("'\" "):
                self.diverge(f"{call_text} raised {type(exc).__name__} with no message", exc)
            if not any(isinstance(exc, t) for t in ex.errors):
                self.diverge(f"{call_text} raised {type(exc).__name__}: {exc}; expected: {ex.describe()}", exc)
            self._inputs_unchanged(call_text, snap)
            return False, exc
        self._last_exception = None
        self.note(f"{call_text}  # -> ok")
        if ex.must_fail:
            self.diverge(f"{call_text} succeeded (returned {_short(value)}); expected: {ex.describe()}")
        self._inputs_unchanged(call_text, snap)
        return True, value

    def _inputs_unchanged(self, call_text, snap) -> None:
        for obj, before in snap:
            now = obj.copy() if isinstance(obj, np.ndarray) else list(obj)
            same = (np.array_equal(now, before) if isinstance(obj, np.ndarray) else now == before)
            if not same:
                self.diverge(f"{call_text} changed its input argument: {before!r} became {now!r}")

    def same(self, call_text: str, got, want, what: str = "result") -> None:
        if isinstance(want, np.ndarray):
            if not _arrays_equal(got, want):
                self.diverge(f"{call_text}: {what} is {_desc_array(got)}, the reference says {_desc_array(want)}")
        elif got != want or type(got) is not type(want):
            self.diverge(f"{call_text}: {what} is {got!r} ({type(got).__name__}), the reference says "
                         f"{want!r} ({type(want).__name__})")

    # -- page table -------------------------------------------------------------------
    def new_table(self, block_size: int) -> None:
        self.pt = PageTable(block_size)
        self.ref = ReferencePageTable(block_size)
        self.hints = {}
        self.note(f"pt = PageTable({block_size})")

    def known(self) -> list[int]:
        return list(self.ref.sequences)

    def seq_pool(self) -> list[int]:
        return self.known() + COLLIDE[:6]

    def seq_elem(self, inp: Input) -> int:
        v = gen_int(inp, self.seq_pool())
        if v == -1 and "minus-one-id" in IGNORE:
            v = -2
        return v

    def check_table(self, pt=None, ref=None, label="pt") -> None:
        pt = self.pt if pt is None else pt
        ref = self.ref if ref is None else ref
        try:
            pt._check_invariants()
        except AssertionError as exc:
            self.diverge(f"{label}._check_invariants() failed: {exc}", exc)
        ids = list(pt)
        if ids != list(ref.sequences):
            self.diverge(f"list({label}) is {ids}, the reference holds {list(ref.sequences)}")
        if pt.sequence_ids().tolist() != ids:
            self.diverge(f"{label}.sequence_ids() {pt.sequence_ids().tolist()} != list({label}) {ids}")
        if len(pt) != len(ref.sequences) or pt.num_sequences() != len(ref.sequences):
            self.diverge(f"len({label}) = {len(pt)}, num_sequences() = {pt.num_sequences()}, "
                         f"the reference holds {len(ref.sequences)}")
        if pt.total_blocks != ref.total_blocks:
            self.diverge(f"{label}.total_blocks = {pt.total_blocks}, the reference says {ref.total_blocks}")
        if pt.block_size != ref.block_size:
            self.diverge(f"{label}.block_size = {pt.block_size}, the reference says {ref.block_size}")
        for seq, blocks in ref.sequences.items():
            got = pt.get_sequence_blocks(seq)
            if got is None or got.dtype != np.int32 or got.tolist() != blocks:
                self.diverge(f"{label}.get_sequence_blocks({seq}) is {_desc_array(got)}, the reference says {blocks}")

    def table_op(self) -> None:
        inp = self.inp
        op = inp.below(26)
        known = self.seq_pool()
        if op == 0 and inp.one_in(4):
            self.op_new_table()
        elif op == 0:
            self.op_slot_mapping()
        elif op in (1, 2):
            s, b = gen_scalar(inp, known), gen_scalar(inp, [], 64) if not inp.one_in(3) else int_spelling(inp, inp.pick(EDGE_INTS))
            ex = Expect()
            sv, bv = o_seq(ex, s), o_block(ex, b)
            ok, _ = self.outcome(f"pt.append_block({show(s)}, {show(b)})", lambda: self.pt.append_block(s, b), ex)
            if ok:
                self.ref.append_block(sv, bv)
        elif op in (3, 4):
            self.op_append_blocks()
        elif op == 5:
            s = gen_scalar(inp, known)
            p = gen_scalar(inp, [], 40) if not inp.one_in(4) else int_spelling(inp, inp.pick(EDGE_INTS))
            ex = Expect()
            sv = o_seq(ex, s)
            pv = scalar_int(p)
            if pv is None:
                ex.fail("token_pos is not an integer", TypeError)
            elif pv < 0:
                ex.fail("token_pos is negative", ValueError, *( (OverflowError,) if pv < INT64_MIN else ()))
            elif pv > INT64_MAX:
                ex.maybe("token_pos beyond int64", OverflowError)
            text = f"pt.get_block_for_position({show(s)}, {show(p)})"
            ok, got = self.outcome(text, lambda: self.pt.get_block_for_position(s, p), ex)
            if ok:
                want = self.ref.get_block_for_position(sv, pv) if pv <= INT64_MAX else None
                if got != want or (got is not None and (type(got) is not tuple or not all(type(v) is int for v in got))):
                    self.diverge(f"{text} returned {got!r}, the reference says {want!r}")
        elif op in (6, 7):
            s = gen_scalar(inp, known)
            ex = Expect()
            sv = o_seq(ex, s)
            remove = op == 7
            name = "remove_sequence" if remove else "get_sequence_blocks"
            text = f"pt.{name}({show(s)})"
            ok, got = self.outcome(text, lambda: getattr(self.pt, name)(s), ex)
            if ok:
                want = (self.ref.remove_sequence if remove else self.ref.get_sequence_blocks)(sv)
                if want is None:
                    if got is not None:
                        self.diverge(f"{text} returned {got!r}, the reference says None")
                else:
                    self.same(text, got, want)
                    if not remove and got.flags.writeable and got.size:
                        got[...] = 12345   # a fresh copy: scribbling on it changes nothing
        elif op == 8:
            x = gen_scalar(inp, known) if not inp.one_in(4) else non_int(inp)
            v = scalar_int(x)
            text = f"{show(x)} in pt"
            try:
                got = x in self.pt
            except (TypeError,) as exc:
                self.note(f"{text}  # -> TypeError")
                if v is not None:
                    self.diverge(f"{text} raised {exc!r}", exc)
                got = None
            else:
                self.note(f"{text}  # -> {got}")
            if v is not None and got != (v in self.ref.sequences):
                self.diverge(f"{text} is {got}, the reference says {v in self.ref.sequences}")
            if v is None and got not in (False, None):
                self.diverge(f"{text} is {got!r} for a non-integer")
        elif op in (9, 10, 11):
            self.op_slot_mapping()
        elif op == 12:
            self.op_lookup()
        elif op == 13:
            self.op_batch_query(inp.pick(["num_blocks", "rows", "to_csr"]))
        elif op == 14:
            self.op_block_table()
        elif op == 15:
            p, c = gen_scalar(inp, known), gen_scalar(inp, known, 12)
            ex = Expect()
            pv, cv = o_seq(ex, p, "parent_id"), o_seq(ex, c, "child_id")
            if pv is not None and pv not in self.ref.sequences:
                ex.fail("unknown parent", KeyError)
            if cv is not None and cv in self.ref.sequences:
                ex.fail("child exists", ValueError)
            ok, _ = self.outcome(f"pt.fork_sequence({show(p)}, {show(c)})", lambda: self.pt.fork_sequence(p, c), ex)
            if ok:
                self.ref.fork_sequence(pv, cv)
        elif op == 16:
            self.op_set_block()
        elif op == 17:
            self.op_versions()
        elif op == 18:
            self.op_copy_table()
        elif op == 19:
            self.op_tampered_state(self.pt, "pt")
        elif op == 20:
            self.op_save_table()
        elif op == 21:
            text = "repr(pt); pt == pt.copy(); pt != 5"
            try:
                repr(self.pt)
                eq = self.pt == self.pt.copy()
                ne = self.pt != 5
                eq5 = self.pt == 5
            except Exception as exc:
                self.diverge(f"{text} raised {exc!r}", exc)
            self.note(text)
            if eq is not True or ne is not True or eq5 is not False:
                self.diverge(f"{text}: got {eq!r}, {ne!r}, pt == 5 is {eq5!r}")
        elif op in (22, 23):
            self.op_bulk_table()
        else:
            self.op_append_blocks()

    def _bulk_ids(self, rng, n: int) -> list[int]:
        mode = rng.randrange(4)
        if mode == 0:
            start = rng.randrange(len(COLLIDE))
            ids = (COLLIDE[start:] + COLLIDE[:start])[:n]
        elif mode == 1:
            base = rng.randrange(2**20)
            stride = rng.choice([1, 2, 7, 2**16, 2**20, 2**32, 2**40, 2**58])
            ids = [base + i * stride for i in range(n) if base + i * stride <= INT64_MAX]
        elif mode == 2:
            ids = list(dict.fromkeys(rng.randrange(2**63) for _ in range(n)))
        else:
            ids = list(range(n))
        return ids

    def op_bulk_table(self) -> None:
        """Many sequences at once (index growth, rehashing, long probe chains), then
        removals of a part of them (probe-chain repair, pool compaction)."""
        import random

        inp = self.inp
        rng = random.Random(inp.below(2**32))
        n = inp.pick([8, 20, 40, 100, 300])
        ids = self._bulk_ids(rng, n)
        lengths = [rng.choice([0, 1, 1, 2, 3, 5, 17]) for _ in ids]
        pairs = [(s, rng.randrange(2**31)) for s, k in zip(ids, lengths) for _ in range(k)]
        if rng.randrange(2):
            rng.shuffle(pairs)   # interleaved; each sequence's blocks keep their order below
        seqs = np.array([p[0] for p in pairs], dtype=np.int64)
        blocks = np.array([p[1] for p in pairs], dtype=rng.choice([np.int64, np.int32]))
        reg(seqs, f"<{len(pairs)} sequence ids from random.Random(...)>")
        reg(blocks, f"<{len(pairs)} block ids>")
        ok, _ = self.outcome(f"pt.append_blocks(<{len(pairs)} pairs over {len(set(p[0] for p in pairs))} sequences>)",
                             lambda: self.pt.append_blocks(seqs, blocks), Expect())
        if ok:
            self.ref.append_blocks(seqs.tolist(), blocks.tolist())
        if rng.randrange(3) == 0:
            for s in ids:
                if rng.randrange(2):
                    self.pt.append_block(s, 7)
                    self.ref.append_block(s, 7)
            self.note("pt.append_block(s, 7) for about half of them")
        if rng.randrange(2):
            known = self.known()
            doomed = [s for s in known if rng.randrange(4)]
            for s in doomed:
                got = self.pt.remove_sequence(s)
                want = self.ref.remove_sequence(s)
                if got is None or got.tolist() != want.tolist():
                    self.note(f"pt.remove_sequence({s})  # -> {got!r}")
                    self.diverge(f"pt.remove_sequence({s}) returned {got!r}, the reference says {want!r}")
            self.note(f"pt.remove_sequence(s) for {len(doomed)} of the {len(known)} sequences")
            self.check_table()
            if doomed and rng.randrange(2):
                # Ids that were removed must be unknown now, and re-creatable.
                s = rng.choice(doomed)
                if s in self.pt or self.pt.get_sequence_blocks(s) is not None:
                    self.diverge(f"sequence {s} is still in the table after remove_sequence")
                self.pt.append_block(s, 1)
                self.ref.append_block(s, 1)
                self.note(f"pt.append_block({s}, 1)")

    def op_new_table(self) -> None:
        inp = self.inp
        if inp.one_in(3):
            b = gen_scalar(inp, [], 4)
        else:
            b = int_spelling(inp, inp.pick([1, 2, 3, 4, 16, 17, 32, 64, 256, 2**31 - 1, 0, -1, 2**31]))
        ex = Expect()
        bv = o_scalar(ex, b, "block_size", 1, INT32_MAX)
        ctor = inp.pick(["PageTable", "PageTable.with_block_size"])
        fn = PageTable if ctor == "PageTable" else PageTable.with_block_size
        ok, pt = self.outcome(f"pt = {ctor}({show(b)})", lambda: fn(b), ex)
        if ok:
            self.pt = pt
            self.ref = ReferencePageTable(bv)
            self.hints = {}
            if pt.block_size != bv or type(pt) is not PageTable:
                self.diverge(f"{ctor}({show(b)}).block_size is {pt.block_size!r}")

    def op_append_blocks(self) -> None:
        inp = self.inp
        n = gen_length(inp)
        m = n if not inp.one_in(8) else gen_length(inp)
        seqs = gen_array(inp, self.seq_elem, n)
        blocks = gen_array(inp, lambda i: gen_int(i, [], 1000) if not i.one_in(12) else i.pick(EDGE_INTS), m)
        ex = Expect()
        sv = o_ids(ex, seqs, "seq_ids", "seq")
        bv = o_ids(ex, blocks, "block_ids", "block")
        sa, ba = o_array(Expect(), seqs, ""), o_array(Expect(), blocks, "")
        if sa is not None and ba is not None and len(sa) != len(ba):
            ex.fail("lengths differ", ValueError)
        text = f"pt.append_blocks({show(seqs)}, {show(blocks)})"
        ok, _ = self.outcome(text, lambda: self.pt.append_blocks(seqs, blocks), ex, (seqs, blocks))
        if ok:
            self.ref.append_blocks(sv, bv)

    def _hints_arg(self, n: int, seqs_vals):
        """rows= for lookup / slot_mapping: None, remembered, arbitrary, or bad."""
        inp = self.inp
        r = inp.below(8)
        if r < 4:
            return None
        if r < 6 and seqs_vals is not None:
            vals = [self.hints.get(s, -1) for s in seqs_vals]
            if inp.one_in(6):
                vals = vals + [0] if inp.one_in(2) else vals[:-1]
            return spell_array(inp, vals)
        k = n if not inp.one_in(6) else gen_length(inp)
        return gen_array(inp, lambda i: gen_int(i, [], 40) if not i.one_in(6) else i.pick(EDGE_INTS), k)

    def _pairs(self, ex: Expect):
        inp = self.inp
        n = gen_length(inp)
        m = n if not inp.one_in(10) else gen_length(inp)
        seqs = gen_array(inp, self.seq_elem, n)
        limit = 4 * self.ref.block_size if self.ref.block_size < 2**20 else 64
        positions = gen_array(inp, lambda i: gen_int(i, [], max(limit, 8)) if not i.one_in(10)
                              else i.pick(EDGE_INTS + [-3, limit, limit - 1]), m)
        sv = o_ids(ex, seqs, "seq_ids", "seq")
        pv = o_ids(ex, positions, "positions", "pos")
        sa = o_array(Expect(), seqs, "")
        pa = o_array(Expect(), positions, "")
        if sa is not None and pa is not None and len(sa) != len(pa):
            ex.fail("seq_ids and positions differ in length", ValueError)
        rows = self._hints_arg(len(sa) if sa is not None else n, sv)
        if rows is not None:
            rv = o_ids(ex, rows, "rows", "row")
            ra = o_array(Expect(), rows, "")
            if ra is not None and sa is not None and len(ra) != len(sa):
                ex.fail("rows has the wrong length", ValueError)
        return seqs, positions, rows, sv, pv

    def _strict_arg(self):
        return self.inp.pick([False, False, False, True, None, 0, 1, np.True_, np.False_])

    def _big(self, seqs, positions, sv, pv):
        """Sometimes tile a valid batch past the parallel threshold (OpenMP path)."""
        if sv is None or pv is None or not sv or not self.inp.one_in(48):
            return seqs, positions, 1
        reps = 131072 // len(sv) + 1
        big_s = np.tile(np.array(sv, dtype=np.int64), reps)
        big_p = np.tile(np.array(pv, dtype=np.int64), reps)
        reg(big_s, f"np.tile(np.array({sv}), {reps})")
        reg(big_p, f"np.tile(np.array({pv}), {reps})")
        return big_s, big_p, reps

    def op_slot_mapping(self) -> None:
        inp = self.inp
        ex = Expect()
        seqs, positions, rows, sv, pv = self._pairs(ex)
        reps = 1
        if rows is None:
            seqs, positions, reps = self._big(seqs, positions, sv, pv)
        strict = self._strict_arg()
        n = len(sv) * reps if sv is not None else (len(o_array(Expect(), seqs, "") or []))
        want = None
        if sv is not None and pv is not None and len(sv) == len(pv):
            want = np.tile(self.ref.slot_mapping(sv, pv), reps)
            if strict and (want == PAD_SLOT_ID).any():
                ex.fail("strict and an unmapped pair", IndexError)
        neg_seq = sv is None and any(v < 0 for v in (o_array(Expect(), seqs, "") or []))
        # out=
        out = None
        out_text = ""
        overlap = False
        r = inp.below(12)
        if r >= 6:
            kind = inp.pick(["good", "good", "good", "len", "int32", "float", ">i8", "2d", "strided",
                             "readonly", "unaligned", "list", "subclass", "same-seq", "same-pos",
                             "shift-seq", "shift-pos", "rows-in-out"])
            if kind == "good":
                out = np.full(n, -7, dtype=np.int64)
                out_text = f"np.full({n}, -7, dtype=np.int64)"
            elif kind == "len":
                k = max(0, n + inp.pick([-1, 1, 2]))
                out = np.full(k, -7, dtype=np.int64)
                out_text = f"np.full({k}, -7, dtype=np.int64)"
            elif kind in ("int32", "float", ">i8"):
                dt = {"int32": "int32", "float": "float64", ">i8": ">i8"}[kind]
                if dt == ">i8" and "byte-order" in IGNORE:
                    dt = "int32"
                out = np.full(n, -7, dtype=dt)
                out_text = f"np.full({n}, -7, dtype={dt!r})"
            elif kind == "2d":
                shape = inp.pick([(n, 1), (1, n)])
                out = np.full(shape, -7, dtype=np.int64)
                out_text = f"np.full({shape}, -7, dtype=np.int64)"
            elif kind in ("strided", "readonly", "unaligned", "subclass"):
                if kind == "unaligned" and "unaligned-out" in IGNORE:
                    kind = "strided"
                out = LAYOUTS[kind]([-7] * n, "int64")
                out_text = f"{kind}([-7] * {n}, 'int64')"
            elif kind == "list":
                out = [0] * n
                out_text = f"[0] * {n}"
            elif kind == "rows-in-out":
                # Row hints stored in out's own memory: the kernel overwrites them as it
                # goes; hints are checked before use, so the answer must not change.
                out = np.full(n, -7, dtype=np.int64)
                out_text = f"np.full({n}, -7, dtype=np.int64)"
                if n and rows is None and sv is not None and pv is not None and len(sv) == len(pv) \
                        and reps == 1 and "overlap-out" not in IGNORE:
                    hints = out.view(np.int32)[:n]
                    hints[:] = [self.hints.get(v, -1) for v in sv]
                    rows = reg(hints, "<rows: an int32 view of out's first bytes>")
                    overlap = True
                    ex.maybe("out overlaps rows", ValueError)
            elif (sv is not None and pv is not None and len(sv) == len(pv) and reps == 1
                  and "overlap-out" not in IGNORE):
                vals = sv if kind.endswith("seq") else pv
                base = np.zeros(len(vals) + 1, dtype=np.int64)
                if kind.startswith("same"):
                    array, out = base[:len(vals)], base[:len(vals)]
                    array[:] = vals
                    out_text = "<the same array>"
                else:
                    array, out = base[:len(vals)], base[1:]
                    array[:] = vals
                    out_text = "<the input array shifted by one>"
                reg(array, f"np.array({vals}, dtype=np.int64)")
                if kind.endswith("seq"):
                    seqs = array
                else:
                    positions = array
                overlap = len(vals) > 0
                if overlap:
                    ex.maybe("out overlaps an input", ValueError)
            if out is not None and not overlap:
                o_out(ex, out, (n,), "int64")
        if out is not None:
            reg(out, out_text)
        out_before = out.copy() if isinstance(out, np.ndarray) else None
        text = f"pt.slot_mapping({show(seqs)}, {show(positions)}"
        if out is not None:
            text += f", out={show(out)}"
        if strict is not False:
            text += f", strict={strict!r}"
        if rows is not None:
            text += f", rows={show(rows)}"
        text += ")"
        kwargs = {}
        if out is not None:
            kwargs["out"] = out
        if strict is not False:
            kwargs["strict"] = strict
        if rows is not None:
            kwargs["rows"] = rows
        touch = () if overlap else (seqs, positions, rows)
        ok, got = self.outcome(text, lambda: self.pt.slot_mapping(seqs, positions, **kwargs), ex, touch)
        if ok:
            self.same(text, got, want)
            if out is not None and not _arrays_equal(np.ascontiguousarray(out), want):
                self.diverge(f"{text}: out holds {_desc_array(out)} after the call, expected {_desc_array(want)}")
        else:
            if overlap and not ex.must_fail and isinstance(got, ValueError) and "out" not in str(got):
                self.diverge(f"{text}: the ValueError for an overlapping out does not name out: {got}")
            partial_ok = overlap or (isinstance(got, ValueError) and neg_seq)
            if out_before is not None and not partial_ok and not np.array_equal(out, out_before):
                self.diverge(f"{text} raised {type(got).__name__} but wrote into out: "
                             f"{out_before.tolist()} became {np.asarray(out).tolist()}")

    def op_lookup(self) -> None:
        ex = Expect()
        seqs, positions, rows, sv, pv = self._pairs(ex)
        reps = 1
        if rows is None:
            seqs, positions, reps = self._big(seqs, positions, sv, pv)
        strict = self._strict_arg()
        want = None
        if sv is not None and pv is not None and len(sv) == len(pv):
            wb, wo = self.ref.lookup(sv, pv)
            want = (np.tile(wb, reps), np.tile(wo, reps))
            if strict and (wb == PAD_SLOT_ID).any():
                ex.fail("strict and an unmapped pair", IndexError)
        kwargs = {}
        text = f"pt.lookup({show(seqs)}, {show(positions)}"
        if strict is not False:
            kwargs["strict"] = strict
            text += f", strict={strict!r}"
        if rows is not None:
            kwargs["rows"] = rows
            text += f", rows={show(rows)}"
        text += ")"
        ok, got = self.outcome(text, lambda: self.pt.lookup(seqs, positions, **kwargs), ex, (seqs, positions, rows))
        if ok:
            if not isinstance(got, tuple) or len(got) != 2:
                self.diverge(f"{text} returned {got!r}")
            self.same(text, got[0], want[0], "block ids")
            self.same(text, got[1], want[1], "offsets")

    def op_batch_query(self, name: str) -> None:
        inp = self.inp
        seqs = gen_array(inp, self.seq_elem)
        ex = Expect()
        sv = o_ids(ex, seqs, "seq_ids", "seq")
        self._unknown_ids(ex, seqs)
        text = f"pt.{name}({show(seqs)})"
        ok, got = self.outcome(text, lambda: getattr(self.pt, name)(seqs), ex, (seqs,))
        if not ok:
            return
        if name == "num_blocks":
            self.same(text, got, self.ref.num_blocks(sv))
        elif name == "to_csr":
            want = self.ref.to_csr(sv)
            self.same(text, got[0], want[0], "indptr")
            self.same(text, got[1], want[1], "indices")
        else:  # rows: int32, one per id, equal ids equal rows, distinct ids distinct rows
            if not isinstance(got, np.ndarray) or got.dtype != np.int32 or got.shape != (len(sv),):
                self.diverge(f"{text} returned {_desc_array(got)}")
            seen: dict[int, int] = {}
            for s, row in zip(sv, got.tolist()):
                if seen.setdefault(s, row) != row:
                    self.diverge(f"{text}: sequence {s} got rows {seen[s]} and {row}")
            if len(set(seen.values())) != len(seen):
                self.diverge(f"{text}: distinct sequences share a row: {seen}")
            self.hints.update(seen)

    def _unknown_ids(self, ex: Expect, seqs) -> None:
        """KeyError for an id not in the table (decided on the raw ints: an unknown id
        before a negative one may be the one reported)."""
        for s in o_array(Expect(), seqs, "") or []:
            if 0 <= s <= INT64_MAX and s not in self.ref.sequences:
                ex.fail(f"unknown sequence {s}", KeyError)

    def op_block_table(self) -> None:
        inp = self.inp
        seqs = gen_array(inp, self.seq_elem)
        ex = Expect()
        sv = o_ids(ex, seqs, "seq_ids", "seq")
        self._unknown_ids(ex, seqs)
        count = len(sv) if sv is not None else 0
        width = max((len(self.ref.sequences.get(s, [])) for s in (sv or [])), default=0)
        out = None
        if inp.one_in(3):
            kind = inp.pick(["good", "good", "wide", "narrow", "rows", "int64", "1d", "strided",
                             "readonly", "fortran"])
            w = width + (2 if kind == "wide" else 0) - (1 if kind == "narrow" else 0)
            w = max(w, 0)
            b = count + (1 if kind == "rows" else 0)
            if kind == "int64":
                out = np.full((b, w), -7, dtype=np.int64)
            elif kind == "1d":
                out = np.full(b * w, -7, dtype=np.int32)
            elif kind == "strided":
                out = np.full((b, 2 * w), -7, dtype=np.int32)[:, ::2]
            elif kind == "readonly":
                out = np.full((b, w), -7, dtype=np.int32)
                out.setflags(write=False)
            elif kind == "fortran":
                out = np.asfortranarray(np.full((b, w), -7, dtype=np.int32))
            else:
                out = np.full((b, w), -7, dtype=np.int32)
            reg(out, f"<out: {kind} {out.dtype}{list(out.shape)}>")
            o_out(ex, out, (count, -1), "int32")
            if isinstance(out, np.ndarray) and out.ndim == 2 and out.shape[1] < width:
                ex.fail("out is too narrow", ValueError)
        out_before = out.copy() if out is not None else None
        text = f"pt.block_table({show(seqs)}" + (f", out={show(out)})" if out is not None else ")")
        call = (lambda: self.pt.block_table(seqs, out=out)) if out is not None else (lambda: self.pt.block_table(seqs))
        ok, got = self.outcome(text, call, ex, (seqs,))
        if ok:
            table, num = self.ref.block_table(sv)
            if out is not None:
                wide = np.full(out.shape, PAD_SLOT_ID, dtype=np.int32)
                wide[:, :table.shape[1]] = table
                table = wide
            self.same(text, got[0], table, "table")
            self.same(text, got[1], num, "num_blocks")
            if out is not None and not np.array_equal(out, table):
                self.diverge(f"{text}: out holds {out.tolist()} after the call")
        elif out is not None and not np.array_equal(out, out_before):
            self.diverge(f"{text} raised but wrote into out")

    def op_set_block(self) -> None:
        inp = self.inp
        known = [s for s, b in self.ref.sequences.items() if b] or self.known()
        s = gen_scalar(inp, known)
        sv0 = scalar_int(s)
        length = len(self.ref.sequences.get(sv0, [])) if sv0 is not None else 0
        if inp.one_in(4):
            i = gen_scalar(inp, [], 4)
        else:
            i = int_spelling(inp, inp.below(length) if length and not inp.one_in(5) else inp.pick([length, -1, 2**63, -(2**70), 2**31]))
        b = gen_scalar(inp, [], 1000)
        ex = Expect()
        sv = o_seq(ex, s)
        iv = scalar_int(i)
        if iv is None:
            ex.fail("block_index is not an integer", TypeError)
        bv = o_block(ex, b)
        if sv is not None and sv not in self.ref.sequences:
            ex.fail("unknown sequence", KeyError)
        elif sv is not None and iv is not None and not 0 <= iv < length:
            extra = (ValueError,) if iv < 0 else ()
            if not INT64_MIN <= iv <= INT64_MAX:
                extra += (OverflowError,)
            ex.fail(f"block_index {iv} out of range", IndexError, *extra)
        text = f"pt.set_block({show(s)}, {show(i)}, {show(b)})"
        ok, got = self.outcome(text, lambda: self.pt.set_block(s, i, b), ex)
        if ok:
            want = self.ref.set_block(sv, iv, bv)
            self.same(text, got, want, "old block")

    def op_versions(self) -> None:
        seqs = gen_array(self.inp, self.seq_elem)
        ex = Expect()
        sv = o_ids(ex, seqs, "seq_ids", "seq")
        text = f"pt.versions({show(seqs)})"
        ok, got = self.outcome(text, lambda: self.pt.versions(seqs), ex, (seqs,))
        if ok:
            version, rewrite = got
            for a, label in ((version, "version"), (rewrite, "rewrite_version")):
                if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != (len(sv),):
                    self.diverge(f"{text}: {label} is {_desc_array(a)}")
            by_seq: dict[int, tuple[int, int]] = {}
            for s, v, r in zip(sv, version.tolist(), rewrite.tolist()):
                known = s in self.ref.sequences
                if (v == -1) == known or (r == -1) == known:
                    self.diverge(f"{text}: sequence {s} (known: {known}) has stamps {v}, {r}")
                if by_seq.setdefault(s, (v, r)) != (v, r):
                    self.diverge(f"{text}: sequence {s} has two different stamps")

    def op_copy_table(self) -> None:
        inp = self.inp
        how = inp.pick(["copy", "copy.copy", "copy.deepcopy", "pickle"])
        text = {"copy": "pt.copy()", "copy.copy": "copy.copy(pt)", "copy.deepcopy": "copy.deepcopy(pt)",
                "pickle": "pickle.loads(pickle.dumps(pt, protocol=P))"}[how]
        proto = inp.below(pickle.HIGHEST_PROTOCOL + 1)
        try:
            if how == "copy":
                clone = self.pt.copy()
            elif how == "copy.copy":
                clone = copy.copy(self.pt)
            elif how == "copy.deepcopy":
                clone = copy.deepcopy(self.pt)
            else:
                clone = pickle.loads(pickle.dumps(self.pt, protocol=proto))
        except Exception as exc:
            self.diverge(f"{text} raised {exc!r}", exc)
        self.note(f"pt2 = {text.replace('P', str(proto))}  # then pt = one of pt, pt2; the other must not change")
        self.check_table(clone, self.ref, "pt2")
        if not (clone == self.pt) or clone != self.pt:
            self.diverge(f"{text} is not == the original")
        if clone is self.pt:
            self.diverge(f"{text} returned the same object")
        keep_ref = copy.deepcopy(self.ref)
        if inp.one_in(2):
            self.add_ghost("the original table after a copy", self.pt, keep_ref)
            self.pt = clone
        else:
            self.add_ghost("a copy of the table", clone, keep_ref)

    def op_tampered_state(self, obj, label: str) -> None:
        """Unpickling a tampered pickle: ``obj.__reduce__()``'s callable applied to a
        mutated copy of its state must give CorruptStateError or a valid object."""
        inp = self.inp
        try:
            rebuild, args = obj.__reduce__()[:2]
        except Exception as exc:
            self.diverge(f"{label}.__reduce__() raised {exc!r}", exc)
        if len(args) != 1 or not isinstance(args[0], dict) or CorruptStateError is None:
            return   # not the state-dict form: nothing to tamper with here
        state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args[0].items()}
        done = []
        for _ in range(1 + inp.below(3)):
            keys = sorted(state)
            if not keys:
                break
            key = inp.pick(keys)
            value = state[key]
            kind = inp.below(12)
            if kind == 0:
                del state[key]
                done.append(f"del state[{key!r}]")
            elif kind == 1:
                state[key] = inp.pick([None, 1, [1, 2], "x", 1.5, np.float64(1)])
                done.append(f"state[{key!r}] = {show(state[key])}")
            elif kind == 2 and isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                dt = inp.pick(["float64", "uint64", "int8", "int32", "uint32", ">i8", "bool", "object", "U3"])
                try:
                    state[key] = value.astype(dt)
                except (ValueError, OverflowError, TypeError):
                    continue
                done.append(f"state[{key!r}] = state[{key!r}].astype({dt!r})")
            elif kind in (3, 4, 5) and isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                new = inp.pick(EDGE_INTS + [0, 1, -1, 2, 3])
                a = value.astype(np.int64 if fits(new, "int64") else np.uint64, copy=True) \
                    if (fits(new, "int64") or fits(new, "uint64")) else None
                if a is None or (a.dtype == np.uint64 and (a < 0).any()):
                    continue
                if a.ndim == 0:
                    a = np.array(new, dtype=a.dtype)
                elif a.size:
                    a.flat[inp.below(a.size)] = new
                else:
                    continue
                state[key] = a
                done.append(f"state[{key!r}] = <{value.tolist()!r} with a {show_int(new)}>")
            elif kind == 6 and isinstance(value, np.ndarray) and value.ndim == 1:
                state[key] = value[:inp.below(value.size + 1)] if inp.one_in(2) else np.append(value, inp.below(4))
                done.append(f"state[{key!r}] = <{value.tolist()!r} resized to {state[key].size}>")
            elif kind == 7 and isinstance(value, np.ndarray):
                state[key] = value.reshape(1, -1) if value.ndim == 1 else value.reshape(-1)
                done.append(f"state[{key!r}] = <reshaped to {state[key].shape}>")
            elif kind == 8:
                other = inp.pick(keys)
                state[key], state[other] = state[other], state[key]
                done.append(f"swap state[{key!r}], state[{other!r}]")
            elif kind == 9:
                state["version"] = np.array(inp.pick([0, 2, -1, 2**40]), dtype=np.int64)
                done.append(f"state['version'] = {state['version']!r}")
            elif kind == 10:
                state["kind"] = np.array(inp.pick(["PageTable", "BlockAllocator", "KVCacheManager", "x", ""]))
                done.append(f"state['kind'] = {state['kind']!r}")
            else:
                state[inp.pick(["extra", "tokens", "refcount", "seq_ids"])] = np.array([1, 2], dtype=np.int64)
                done.append("state[...] = np.array([1, 2])")
        how = "; ".join(done) or "nothing changed"
        if inp.one_in(3) and HAVE_LOAD_ANY:
            # The same state written as a well-formed archive: the file path's checks.
            path = self._path()
            try:
                with open(path, "wb") as f:
                    np.savez(f, **{k: v for k, v in state.items() if isinstance(k, str)})
            except Exception:
                return    # not something np.savez can write; nothing to load
            loader = inp.pick([pagetable.load, type(obj).load])
            text = f"{getattr(loader, '__qualname__', loader)}(<np.savez of {label}'s state with: {how}>)"
            rebuild, state = loader, path
        else:
            text = f"{rebuild.__name__}(<{label}'s state with: {how}>)"
        try:
            rebuilt = rebuild(state)
        except CorruptStateError:
            self.note(f"{text}  # -> CorruptStateError")
            return
        except Exception as exc:
            self.note(f"{text}  # -> {type(exc).__name__}")
            self.diverge(f"{text} raised {type(exc).__name__} (must be CorruptStateError): {exc!r}", exc)
        self.note(f"{text}  # -> ok")
        self.check_loaded(text, rebuilt)

    # -- persistence ------------------------------------------------------------------
    def _path(self):
        self.file_counter += 1
        p = _tmpdir() / f"state-{os.getpid()}-{self.file_counter}.bin"
        return p if self.inp.one_in(2) else str(p)

    def _mutate(self, data: bytes) -> bytes:
        inp = self.inp
        buf = bytearray(data)
        for _ in range(1 + inp.below(3)):
            kind = inp.below(8)
            if kind == 0 and buf:
                del buf[inp.below(len(buf) + 1):]                       # truncate
            elif kind in (1, 2) and buf:
                buf[inp.below(len(buf))] ^= 1 << inp.below(8)          # flip a bit
            elif kind == 3 and buf:
                buf[inp.below(len(buf))] = inp.pick([0, 0xFF, 0x7F, 0x80, 1, inp.byte()])
            elif kind == 4:
                at = inp.below(len(buf) + 1)
                buf[at:at] = bytes(inp.byte() for _ in range(1 + inp.below(8)))
            elif kind == 5 and buf:
                at = inp.below(len(buf))
                del buf[at:at + 1 + inp.below(16)]
            elif kind == 6 and len(buf) >= 4:
                at = inp.below(len(buf) - 3)                             # a 32-bit field
                buf[at:at + 4] = inp.pick([b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
                                           b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00",
                                           b"\x01\x00\x00\x00"])
            elif buf:
                at = inp.below(len(buf))
                buf[at:at] = buf[at:at + 1 + inp.below(32)]             # duplicate a range
        return bytes(buf)

    def check_loaded(self, text: str, obj) -> None:
        """An object a loader accepted must pass its invariant checks and stay usable."""
        try:
            if isinstance(obj, PageTable):
                obj._check_invariants()
                ids = list(obj)
                for s in ids[:8]:
                    obj.get_sequence_blocks(s)
                obj.slot_mapping(ids, [0] * len(ids))
                obj.to_csr(ids)
                obj.copy()._check_invariants()
                obj.append_block(2**62, 1)
                obj._check_invariants()
            elif isinstance(obj, KVCacheManager):
                obj.check()
                ids = list(obj.page_table)
                obj.seq_lens(ids)
                obj.flashinfer_layout(ids)
                try:
                    obj.append_tokens(ids, 1)
                except OutOfBlocksError:
                    pass
                obj.check()
                obj.free_sequence(ids)
                obj.check()
                if obj.num_free_blocks != obj.num_blocks:
                    raise AssertionError("blocks leaked after freeing every sequence")
            elif isinstance(obj, BlockAllocator):
                self.check_allocator_invariants(obj, text)
                n = obj.num_free
                got = obj.allocate(n)
                if len(set(got.tolist())) != n:
                    raise AssertionError(f"allocate handed out a block twice: {got.tolist()}")
                obj.free(got)
                self.check_allocator_invariants(obj, text)
            else:
                raise AssertionError(f"a loader returned a {type(obj).__name__}")
        except Divergence:
            raise
        except Exception as exc:
            self.diverge(f"{text} accepted a corrupt file: the object it returned fails: {exc!r}", exc)

    def check_allocator_invariants(self, alloc, label) -> None:
        refs = alloc._refcounts().tolist()
        free = alloc._free_blocks().tolist()
        n = alloc.num_blocks
        problems = []
        if len(refs) != n:
            problems.append(f"{len(refs)} refcounts for {n} blocks")
        if any(c < 0 for c in refs):
            problems.append("a negative refcount")
        if len(free) != alloc.num_free:
            problems.append(f"num_free {alloc.num_free} but {len(free)} on the stack")
        if len(set(free)) != len(free) or any(not 0 <= b < n for b in free):
            problems.append(f"free stack {free} has a duplicate or an id outside the pool")
        elif sorted(free) != [b for b, c in enumerate(refs) if c == 0]:
            problems.append(f"free stack {free} is not the set of blocks with refcount 0")
        if problems:
            self.diverge(f"{label}: allocator invariants broken: {'; '.join(problems)}")

    def roundtrip_file(self, label: str, obj, cls, state_of) -> object:
        """save / load through the class and ``pagetable.load``; then mutated bytes."""
        inp = self.inp
        path = self._path()
        text = f"{label}.save({show(path)}); {cls.__name__}.load(...)"
        try:
            obj.save(path)
            loaded = cls.load(path)
        except Exception as exc:
            self.diverge(f"{text} raised {exc!r}", exc)
        self.note(f"{label}.save(path); {label}2 = {cls.__name__}.load(path)")
        if type(loaded) is not cls or state_of(loaded) != state_of(obj):
            self.diverge(f"{text}: the loaded object differs: {state_of(loaded)} vs {state_of(obj)}")
        if HAVE_LOAD_ANY:
            try:
                any_loaded = pagetable.load(path)
            except Exception as exc:
                self.diverge(f"pagetable.load of a saved {cls.__name__} raised {exc!r}", exc)
            if type(any_loaded) is not cls or state_of(any_loaded) != state_of(obj):
                self.diverge(f"pagetable.load of a saved {cls.__name__} gave {any_loaded!r}")
        data = pathlib.Path(path).read_bytes()
        for _ in range(1 + inp.below(3)):
            self.load_mutated(cls, data)
        return loaded

    def load_mutated(self, cls, data: bytes) -> None:
        if CorruptStateError is None:
            return
        inp = self.inp
        bad = self._mutate(data)
        path = self._path()
        pathlib.Path(path).write_bytes(bad)
        head = f"# file: {cls.__name__}.save() output mutated to {len(bad)} bytes {bad[:48]!r}..."
        any_obj = None
        any_exc = None
        if HAVE_LOAD_ANY:
            try:
                any_obj = pagetable.load(path)
            except CorruptStateError as exc:
                any_exc = exc
            except Exception as exc:
                self.note(head)
                self.diverge(f"pagetable.load(mutated {cls.__name__} file) raised {type(exc).__name__} "
                             f"(must be CorruptStateError): {exc!r}; bytes {bad!r}", exc)
            if any_obj is not None:
                self.check_loaded(f"pagetable.load(mutated {cls.__name__} file {bad!r})", any_obj)
        loaders = [c for c, have in ((PageTable, HAVE_TABLE_SAVE), (BlockAllocator, HAVE_ALLOC_SAVE),
                                     (KVCacheManager, HAVE_KV_SAVE)) if have]
        loader = cls if inp.below(4) else inp.pick(loaders)
        try:
            obj = loader.load(path)
        except CorruptStateError:
            return
        except (TypeError, ValueError) as exc:
            if any_obj is not None and not isinstance(any_obj, loader):
                return    # a valid file of another kind: any clear refusal will do
            self.note(head)
            self.diverge(f"{loader.__name__}.load(mutated {cls.__name__} file) raised "
                         f"{type(exc).__name__} (must be CorruptStateError): {exc!r}; bytes {bad!r}", exc)
        except Exception as exc:
            self.note(head)
            self.diverge(f"{loader.__name__}.load(mutated {cls.__name__} file) raised {type(exc).__name__} "
                         f"(must be CorruptStateError): {exc!r}; bytes {bad!r}", exc)
        if not isinstance(obj, loader):
            self.diverge(f"{loader.__name__}.load returned a {type(obj).__name__}")
        if any_exc is not None:
            self.diverge(f"{loader.__name__}.load accepted a file that pagetable.load rejects "
                         f"({any_exc}); bytes {bad!r}")
        self.check_loaded(f"{loader.__name__}.load(mutated {cls.__name__} file {bad!r})", obj)

    def op_save_table(self) -> None:
        if not HAVE_TABLE_SAVE:
            return
        loaded = self.roundtrip_file("pt", self.pt, PageTable, table_state)
        if self.inp.one_in(2):
            self.add_ghost("a table saved and loaded", self.pt, copy.deepcopy(self.ref))
            self.pt = loaded

    # -- manager ------------------------------------------------------------------------
    def new_manager(self) -> None:
        inp = self.inp
        if inp.one_in(5):
            nb, bs = gen_scalar(inp, [], 40), gen_scalar(inp, [], 20)
        else:
            nb = int_spelling(inp, inp.pick([1, 2, 3, 4, 5, 8, 12, 16, 33, 64, 64, 1024, 4096]))
            bs = int_spelling(inp, inp.pick([1, 2, 3, 4, 16, 5]))
        ex = Expect()
        nbv = o_scalar(ex, nb, "num_blocks", 1, INT32_MAX)
        bsv = o_scalar(ex, bs, "block_size", 1, INT32_MAX)
        text = f"kv = KVCacheManager({show(nb)}, {show(bs)})"
        if not ex.must_fail and nbv * bsv > INT32_MAX:
            ex.fail("num_blocks * block_size must be below 2**31", ValueError)
        if not ex.must_fail and (nbv > 4096 or nbv * bsv > 2**16):
            return   # valid, but too big for a fuzz iteration (the reference's lists too)
        ok, kv = self.outcome(text, lambda: KVCacheManager(nb, bs), ex)
        if ok:
            self.kv = kv
            self.kref = ReferenceKVCacheManager(nbv, bsv)

    def kknown(self) -> list[int]:
        return list(self.kref._blocks) if self.kref is not None else []

    def kv_seq_elem(self, inp):
        return gen_int(inp, self.kknown())

    def check_manager(self, kv=None, kref=None, label="kv") -> None:
        kv = self.kv if kv is None else kv
        kref = self.kref if kref is None else kref
        try:
            kv.check()
        except AssertionError as exc:
            self.diverge(f"{label}.check() failed: {exc}", exc)
        try:
            kref.check()
        except AssertionError as exc:
            self.diverge(f"the reference manager's check() failed: {exc}", exc)
        got, want = manager_state(kv), ref_manager_state(kref)
        if got != want:
            diffs = [f"{k}: {got[k]!r} vs reference {want[k]!r}" for k in want if got.get(k) != want[k]]
            self.diverge(f"{label}'s state differs from the reference: " + "; ".join(diffs))
        ids = want["ids"]
        if ids:
            layout = kv.flashinfer_layout(ids)
            ref_layout = kref.flashinfer_layout(ids)
            for g, w, what in zip(layout, ref_layout, ("kv_indptr", "kv_indices", "kv_last_page_len")):
                self.same(f"{label}.flashinfer_layout({ids})", g, w, what)
        if kv.usage != kref.usage:
            self.diverge(f"{label}.usage = {kv.usage}, the reference says {kref.usage}")
        for s in ids[:4]:
            if s not in kv:
                self.diverge(f"{s} in {label} is False")
            if len(kref._blocks[s]) and kref._tokens[s]:
                pos = kref._tokens[s] - 1
                got_slot = kv.page_table.slot_mapping([s], [pos]).tolist()
                if got_slot != [kref._slot(s, pos)]:
                    self.diverge(f"{label}.page_table.slot_mapping([{s}], [{pos}]) is {got_slot}")

    def kv_compare(self, text, lib_call, ref_call, ex: Expect, convert=None, touch=()):
        """Run the reference (normalized args) then the library; same outcome."""
        ref_ok, ref_value = False, None
        backup = None
        if not ex.must_fail and ex.errors:
            # The library may refuse what the reference accepts: undo the reference then.
            backup = (copy.deepcopy(self.kref), copy.deepcopy(self.aref))
        if not ex.must_fail:
            try:
                ref_value = ref_call()
                ref_ok = True
            except Exception as exc:
                cat = category(exc)
                if cat is None:
                    self.diverge(f"the reference raised an undocumented {exc!r} for {text}", exc)
                ref_value = exc
                lib_ex = Expect()
                lib_ex.errors = set(ex.errors) | {cat}
                if "error-priority" in IGNORE and cat in (KeyError, ValueError):
                    lib_ex.errors |= {KeyError, ValueError}
                lib_ex.must_fail = True
                lib_ex.why = ex.why + [f"the reference raised {type(exc).__name__}: {exc}"]
                ex = lib_ex
        ok, got = self.outcome(text, lib_call, ex, touch)
        if ok and ref_ok and convert is not None:
            convert(text, got, ref_value)
        if ref_ok and not ok and backup is not None:
            self.kref, self.aref = backup
        return ok, got, ref_ok, ref_value

    def manager_op(self) -> None:
        inp = self.inp
        if self.kv is None or inp.one_in(40):
            self.new_manager()
            if self.kv is None:
                return
        kv, kref = self.kv, self.kref
        known = self.kknown()
        op = inp.below(17)
        if op == 16:
            self.op_bulk_manager()
        elif op in (0, 1):
            s = gen_scalar(inp, known, 12)
            t = gen_scalar(inp, [], 3 * kref.block_size + 2) if not inp.one_in(6) else int_spelling(inp, inp.pick(EDGE_INTS))
            ex = Expect()
            sv = o_seq(ex, s, "seq_id")
            tv = scalar_int(t)
            if tv is None:
                ex.fail("num_tokens is not an integer", TypeError)
            text = f"kv.add_sequence({show(s)}, {show(t)})"
            self.kv_compare(text, lambda: kv.add_sequence(s, t), lambda: kref.add_sequence(sv, tv), ex,
                            self.same_append_result)
        elif op in (2, 3, 4, 5):
            self.op_append_tokens("append_tokens")
        elif op == 6:
            self.op_append_tokens("can_append")
        elif op == 7:
            p, c = gen_scalar(inp, known), gen_scalar(inp, known, 12)
            ex = Expect()
            pv, cv = o_seq(ex, p, "parent_id"), o_seq(ex, c, "child_id")
            self.kv_compare(f"kv.fork({show(p)}, {show(c)})", lambda: kv.fork(p, c), lambda: kref.fork(pv, cv), ex)
        elif op in (8, 9):
            x = gen_scalar(inp, known) if inp.one_in(2) else self.distinct_ids()
            ex = Expect()
            if _is_element_int(x):     # one sequence id, as an int or a numpy integer
                v = int(x)
                norm = np.array([v], dtype=np.int64) if INT64_MIN <= v <= INT64_MAX else None
                if norm is None:
                    ex.fail("seq id beyond int64", OverflowError, ValueError)
            else:
                vals = o_ids(ex, x, "seq_ids", "pos")
                norm = np.array(vals, dtype=np.int64) if vals is not None else None
            self.kv_compare(f"kv.free_sequence({show(x)})", lambda: kv.free_sequence(x),
                            lambda: kref.free_sequence(norm), ex, touch=(x,))
        elif op in (10, 11):
            name = inp.pick(["seq_lens", "block_table", "flashinfer_layout"])
            x = gen_array(inp, self.kv_seq_elem)
            ex = Expect()
            vals = o_ids(ex, x, "seq_ids", "pos")   # int64; the reference judges the rest
            norm = np.array(vals, dtype=np.int64) if vals is not None else None

            def compare(text, got, want):
                if isinstance(want, tuple):
                    for g, w in zip(got, want):
                        self.same(text, g, w)
                else:
                    self.same(text, got, want)

            self.kv_compare(f"kv.{name}({show(x)})", lambda: getattr(kv, name)(x),
                            lambda: getattr(kref, name)(norm), ex, compare, touch=(x,))
        elif op == 12:
            self.op_views()
        elif op == 13:
            if inp.one_in(2):
                self.op_copy_manager()
            else:
                self.op_tampered_state(kv, "kv")
        elif op == 14:
            if HAVE_KV_SAVE:
                loaded = self.roundtrip_file("kv", kv, KVCacheManager, manager_state)
                self.check_manager(loaded, kref, "kv2")
                if inp.one_in(2):
                    self.add_ghost("a manager saved and loaded", kv, copy.deepcopy(kref))
                    self.kv = loaded
        else:
            x = gen_scalar(inp, known) if not inp.one_in(4) else non_int(inp)
            v = scalar_int(x)
            try:
                got = x in kv
            except TypeError:
                got = None
            self.note(f"{show(x)} in kv  # -> {got}")
            if v is not None and got != (0 <= v <= INT64_MAX and v in kref._blocks):
                self.diverge(f"{show(x)} in kv is {got}, the reference holds {list(kref._blocks)}")

    def op_bulk_manager(self) -> None:
        """Many sequences: prefills, forks of a part of them, a decode step, frees."""
        import random

        inp = self.inp
        kv, kref = self.kv, self.kref
        rng = random.Random(inp.below(2**32))
        ids = [s for s in self._bulk_ids(rng, inp.pick([8, 20, 60, 150])) if s not in kref._blocks]
        for s in ids:
            t = rng.choice([0, 1, 2, kref.block_size, kref.block_size + 1, 3 * kref.block_size - 1])
            self.kv_compare(f"kv.add_sequence({s}, {t})", lambda: kv.add_sequence(s, t),
                            lambda: kref.add_sequence(s, t), Expect(), self.same_append_result)
        live = list(kref._blocks)
        for s in live[: rng.randrange(len(live) + 1)]:
            if rng.randrange(3) == 0:
                child = rng.randrange(2**62)
                self.kv_compare(f"kv.fork({s}, {child})", lambda: kv.fork(s, child),
                                lambda: kref.fork(s, child), Expect())
        live = list(kref._blocks)
        rng.shuffle(live)
        step = np.array(live[: rng.randrange(len(live) + 1)], dtype=np.int64)
        reg(step, f"np.array({step.tolist()})")
        self.kv_compare(f"kv.append_tokens({show(step)}, 1)", lambda: kv.append_tokens(step, 1),
                        lambda: kref.append_tokens(step.copy(), 1), Expect(), self.same_append_result)
        self.check_manager()
        doomed = np.array([s for s in kref._blocks if rng.randrange(3)], dtype=np.int64)
        reg(doomed, f"np.array({doomed.tolist()})")
        self.kv_compare(f"kv.free_sequence({show(doomed)})", lambda: kv.free_sequence(doomed),
                        lambda: kref.free_sequence(doomed.copy()), Expect())

    def distinct_ids(self):
        inp = self.inp
        known = self.kknown()
        n = gen_length(inp) % 6
        if known and not inp.one_in(5):
            vals = [inp.pick(known) for _ in range(n)]
            if not inp.one_in(4):
                vals = list(dict.fromkeys(vals))
        else:
            vals = [self.kv_seq_elem(inp) for _ in range(n)]
        return spell_array(inp, vals)

    def op_append_tokens(self, name: str) -> None:
        inp = self.inp
        kv, kref = self.kv, self.kref
        x = self.distinct_ids()
        ex = Expect()
        vals = o_ids(ex, x, "seq_ids", "pos")   # int64; the reference judges the rest
        n = len(vals) if vals is not None else len(o_array(Expect(), x, "") or [])
        r = inp.below(6)
        if r < 2:
            counts = int_spelling(inp, inp.pick([0, 1, 1, 1, 2, 3, 5, 16, 17, 40]))
        elif r == 2:
            counts = gen_scalar(inp, [], 6) if not inp.one_in(3) else int_spelling(inp, inp.pick(EDGE_INTS))
        elif r == 5:
            v = inp.below(5)
            counts = reg(np.array(v), f"np.array({v})")
        else:
            k = n if not inp.one_in(8) else gen_length(inp)
            counts = gen_array(inp, lambda i: i.below(2 * kref.block_size + 2) if not i.one_in(10) else i.pick(EDGE_INTS), k)
        norm_counts = None
        if isinstance(counts, (list, tuple, np.ndarray)) and not (isinstance(counts, np.ndarray) and counts.ndim == 0):
            cv = o_array(ex, counts, "num_new_tokens")
            if cv is not None:
                if any(not INT64_MIN <= c <= INT64_MAX for c in cv):
                    ex.fail("num_new_tokens beyond int64", OverflowError, ValueError)
                else:
                    norm_counts = np.array(cv, dtype=np.int64)
        else:
            c = counts.item() if isinstance(counts, np.ndarray) else counts
            cv = scalar_int(c)
            if cv is None:
                ex.fail("num_new_tokens is not an integer", TypeError)
            elif cv < 0:
                # The contract, whatever the batch; the reference accepts a negative
                # count for an empty batch.
                ex.fail("num_new_tokens is negative", ValueError)
            elif cv > INT64_MAX:
                # Too large for its type; the reference says OutOfBlocksError instead
                # (and succeeds for an empty batch).
                ex.fail("num_new_tokens beyond int64", OverflowError, OutOfBlocksError)
            norm_counts = cv
        text = f"kv.{name}({show(x)}, {show(counts)})"
        norm = np.array(vals, dtype=np.int64) if vals is not None else None
        # Semantic errors the reference will not see when a conversion failed.
        raw = o_array(Expect(), x, "")
        if ex.must_fail and raw is not None:
            for i, s in enumerate(raw):
                if s < 0:
                    ex.fail("negative sequence id", ValueError)
                elif s not in kref._blocks:
                    ex.fail("unknown sequence", KeyError)
                if s in raw[:i]:
                    ex.fail("duplicate sequence", ValueError)
        if ex.must_fail and isinstance(norm_counts, np.ndarray) and (norm_counts < 0).any():
            ex.fail("negative count", ValueError)
        if ex.must_fail and isinstance(norm_counts, int) and norm_counts < 0:
            ex.fail("negative count", ValueError)
        if ex.must_fail and isinstance(norm_counts, np.ndarray) and vals is not None and len(norm_counts) != len(vals):
            ex.fail("counts length", ValueError)
        if name == "append_tokens":
            before = self.kref.can_append(norm, norm_counts) if not ex.must_fail and self._plan_ok(norm, norm_counts) else None
            ok, got, ref_ok, want = self.kv_compare(
                text, lambda: kv.append_tokens(x, counts), lambda: kref.append_tokens(norm, norm_counts),
                ex, self.same_append_result, touch=(x, counts))
            if before is not None and before != ok and ref_ok == ok:
                self.diverge(f"can_append said {before} but append_tokens {'succeeded' if ok else 'failed'}: {text}")
        else:
            def compare(text, got, want):
                if type(got) is not bool or got != want:
                    self.diverge(f"{text} is {got!r}, the reference says {want!r}")

            self.kv_compare(text, lambda: kv.can_append(x, counts), lambda: kref.can_append(norm, norm_counts),
                            ex, compare, touch=(x, counts))
        if (ex.must_fail and norm is not None and type(norm_counts) is int
                and not (INT64_MIN <= norm_counts <= INT64_MAX and norm_counts >= 0)
                and "ref-counts" not in IGNORE):
            # The oracle overrode the reference (a scalar count that is negative or
            # beyond int64); the reference must still raise what the manager raised.
            lib_exc = self._last_exception
            shadow = copy.deepcopy(kref)
            try:
                getattr(shadow, name)(norm, norm_counts)
            except Exception as exc:
                if lib_exc is not None and category(exc) is not category(lib_exc):
                    self.diverge(f"{text} raised {type(lib_exc).__name__} but the reference raises "
                                 f"{type(exc).__name__}: {exc}")
            else:
                self.diverge(f"{text} raised {type(lib_exc).__name__}: {lib_exc}; the reference accepts it "
                             f"(ReferenceKVCacheManager.{name}({norm.tolist()}, {show_int(norm_counts)}))")

    def _plan_ok(self, norm, counts) -> bool:
        try:
            self.kref.can_append(norm, counts)
            return True
        except Exception:
            return False

    def same_append_result(self, text, got, want) -> None:
        for field in ("slots", "copy_src", "copy_dst"):
            self.same(text, getattr(got, field), getattr(want, field), field)
        if self.inp.one_in(8):
            try:
                again = pickle.loads(pickle.dumps(got))
            except Exception as exc:
                self.diverge(f"pickling the AppendResult of {text} raised {exc!r}", exc)
            if not (again == got) or not all(_arrays_equal(getattr(again, f), getattr(got, f))
                                             for f in ("slots", "copy_src", "copy_dst")):
                self.diverge(f"the AppendResult of {text} does not survive pickling: {again!r}")

    def op_views(self) -> None:
        """A manager's page_table and allocator: reads work, changes raise RuntimeError."""
        inp = self.inp
        kv, kref = self.kv, self.kref
        known = self.kknown()
        table = kv.page_table
        alloc = kv.allocator
        for s in known[:3]:
            got = table.get_sequence_blocks(s)
            if got is None or got.tolist() != kref._blocks[s]:
                self.diverge(f"kv.page_table.get_sequence_blocks({s}) is {got!r}")
        blocks = list(range(kref.num_blocks))
        got = alloc.refcount(blocks).tolist()
        if got != [kref._allocator._refcount[b] for b in blocks]:
            self.diverge(f"kv.allocator.refcount(...) is {got}")
        if alloc.num_free != kref.num_free_blocks or alloc.num_blocks != kref.num_blocks:
            self.diverge("kv.allocator.num_free / num_blocks differ from the reference")
        if inp.one_in(3):
            self.op_copy_views(table, alloc)
            return
        s = inp.pick(known) if known else 0
        b = inp.below(kref.num_blocks)
        attempts = []
        if READ_ONLY_TABLE_VIEW:
            attempts += [
                (f"kv.page_table.append_block({s}, {b})", lambda: table.append_block(s, b)),
                (f"kv.page_table.append_blocks([{s}], [{b}])", lambda: table.append_blocks([s], [b])),
                (f"kv.page_table.remove_sequence({s})", lambda: table.remove_sequence(s)),
                (f"kv.page_table.fork_sequence({s}, 2**62)", lambda: table.fork_sequence(s, 2**62)),
                (f"kv.page_table.set_block({s}, 0, {b})", lambda: table.set_block(s, 0, b)),
            ]
        if READ_ONLY_ALLOCATOR_VIEW:
            attempts += [
                ("kv.allocator.allocate(1)", lambda: alloc.allocate(1)),
                ("kv.allocator.allocate(0)", lambda: alloc.allocate(0)),
                (f"kv.allocator.free([{b}])", lambda: alloc.free([b])),
                (f"kv.allocator.incref([{b}])", lambda: alloc.incref([b])),
            ]
        if not attempts:
            return
        text, fn = inp.pick(attempts)
        try:
            fn()
        except RuntimeError as exc:
            self.note(f"{text}  # -> RuntimeError")
            if isinstance(exc, OutOfBlocksError):
                self.diverge(f"{text} on a read-only view raised OutOfBlocksError, not a refusal", exc)
        except Exception as exc:
            if "set_block" in text and not kref._blocks.get(s):
                self.note(f"{text}  # -> {type(exc).__name__}")   # nothing to set; any refusal
                return
            self.diverge(f"{text} on a read-only view raised {exc!r}; expected RuntimeError", exc)
        else:
            self.diverge(f"{text} on a manager's read-only view succeeded; expected RuntimeError")

    def op_copy_views(self, table, alloc) -> None:
        """A copy of a manager's table or pool is an ordinary object: it can change, and
        changing it leaves the manager alone."""
        inp = self.inp
        how = inp.pick(["copy", "copy.copy", "copy.deepcopy", "pickle", "save"])

        def saved(o):
            path = self._path()
            o.save(path)
            return (type(o).load if inp.one_in(2) else pagetable.load)(path)

        make = {"copy": lambda o: o.copy(), "copy.copy": copy.copy, "copy.deepcopy": copy.deepcopy,
                "pickle": lambda o: pickle.loads(pickle.dumps(o)), "save": saved}[how]
        if inp.one_in(2):
            text = f"t = {how}(kv.page_table); t.append_block(2**62, 5); t.remove_sequence(...)"
            try:
                t = make(table)
                if type(t) is not PageTable or t != table:
                    self.diverge(f"{text}: the copy is a {type(t).__name__}, equal: {t == table}")
                if inp.one_in(2):
                    # Carry on fuzzing the copy as the main table: it may hold sequences
                    # with no block (prefills of 0 tokens), which appends cannot make.
                    ref = ReferencePageTable(t.block_size)
                    for seq in list(t):
                        ref.sequences[seq] = list(self.kref._blocks[seq])
                    self.check_table(t, ref, "t")
                    self.add_ghost("the main table before it was replaced", self.pt, self.ref)
                    self.pt, self.ref = t, ref
                    self.note(f"pt = {how}(kv.page_table)")
                    return
                t.append_block(2**62, 5)
                for seq in list(t)[:2]:
                    t.remove_sequence(seq)
                t._check_invariants()
            except Divergence:
                raise
            except Exception as exc:
                self.diverge(f"{text} raised {exc!r}", exc)
        else:
            text = f"a = {how}(kv.allocator); a.allocate(a.num_free); a.free(...)"
            try:
                a = make(alloc)
                if type(a) is not BlockAllocator or a != alloc:
                    self.diverge(f"{text}: the copy is a {type(a).__name__}, equal: {a == alloc}")
                got = a.allocate(a.num_free)
                a.free(got)
                if a.num_free and a.num_free == a.num_blocks:
                    a.incref(a.allocate(1))
            except Divergence:
                raise
            except Exception as exc:
                self.diverge(f"{text} raised {exc!r}", exc)
        self.note(text)

    def op_copy_manager(self) -> None:
        if not HAVE_KV_COPY:
            return
        inp = self.inp
        how = inp.pick(["copy", "copy.copy", "copy.deepcopy", "pickle"])
        try:
            if how == "copy":
                clone = self.kv.copy()
            elif how == "copy.copy":
                clone = copy.copy(self.kv)
            elif how == "copy.deepcopy":
                clone = copy.deepcopy(self.kv)
            else:
                clone = pickle.loads(pickle.dumps(self.kv, protocol=inp.below(pickle.HIGHEST_PROTOCOL + 1)))
        except Exception as exc:
            self.diverge(f"{how}(kv) raised {exc!r}", exc)
        self.note(f"kv2 = {how}(kv)  # then kv = one of kv, kv2; the other must not change")
        if clone is self.kv:
            self.diverge(f"{how}(kv) returned the same object")
        if not (clone == self.kv) or clone != self.kv:
            self.diverge(f"{how}(kv) is not == kv")
        self.check_manager(clone, self.kref, "kv2")
        keep = copy.deepcopy(self.kref)
        if inp.one_in(2):
            self.add_ghost("the original manager after a copy", self.kv, keep)
            self.kv = clone
        else:
            self.add_ghost("a copy of the manager", clone, keep)

    # -- allocator ----------------------------------------------------------------------
    def allocator_op(self) -> None:
        inp = self.inp
        if self.alloc is None or inp.one_in(30):
            n = gen_scalar(inp, [], 24) if inp.one_in(4) else int_spelling(inp, inp.pick([1, 2, 3, 5, 8, 16, 40]))
            ex = Expect()
            nv = o_scalar(ex, n, "num_blocks", 1, INT32_MAX)
            if not ex.must_fail and nv > 4096:
                return
            ok, alloc = self.outcome(f"alloc = BlockAllocator({show(n)})", lambda: BlockAllocator(n), ex)
            if ok:
                self.alloc, self.aref = alloc, ReferenceBlockAllocator(nv)
            if self.alloc is None:
                return
        alloc, aref = self.alloc, self.aref
        op = inp.below(10)
        if op in (8, 9):
            op = inp.pick([0, 2, 3, 6, 7])
        if op in (0, 1):
            n = gen_scalar(inp, [], 6) if not inp.one_in(6) else int_spelling(inp, inp.pick(EDGE_INTS))
            ex = Expect()
            nv = scalar_int(n)
            if nv is None:
                ex.fail("n is not an integer", TypeError)
            self.kv_compare(f"alloc.allocate({show(n)})", lambda: alloc.allocate(n), lambda: aref.allocate(nv),
                            ex, self.same)
        elif op in (2, 3, 4, 5):
            name = inp.pick(["free", "free", "incref", "refcount"])
            used = [b for b, c in enumerate(aref._refcount) if c] or [0]
            x = gen_array(inp, lambda i: i.pick(used) if not i.one_in(4) else gen_int(i, [], aref.num_blocks + 2)
                          if not i.one_in(4) else i.pick(EDGE_INTS), gen_length(inp) % 7)
            ex = Expect()
            vals = o_array(ex, x, "block_ids")
            norm = None
            if vals is not None:
                if any(not INT64_MIN <= v <= INT64_MAX for v in vals):
                    ex.fail("block id beyond int64", OverflowError, ValueError)
                else:
                    norm = np.array(vals, dtype=np.int64)
                    if any(v > INT32_MAX for v in vals):
                        ex.maybe("block id >= 2**31", OverflowError)
            self.kv_compare(f"alloc.{name}({show(x)})", lambda: getattr(alloc, name)(x),
                            lambda: getattr(aref, name)(norm), ex, self.same, touch=(x,))
        elif op == 6 and inp.one_in(2):
            self.op_tampered_state(alloc, "alloc")
        elif op == 6:
            if HAVE_ALLOC_COPY:
                how = inp.pick(["copy", "copy.copy", "copy.deepcopy", "pickle"])
                try:
                    clone = {"copy": lambda a: a.copy(), "copy.copy": copy.copy, "copy.deepcopy": copy.deepcopy,
                             "pickle": lambda a: pickle.loads(pickle.dumps(a))}[how](alloc)
                except Exception as exc:
                    self.diverge(f"{how}(alloc) raised {exc!r}", exc)
                self.note(f"alloc2 = {how}(alloc)")
                if clone is alloc or allocator_state(clone) != allocator_state(alloc) or not (clone == alloc):
                    self.diverge(f"{how}(alloc) is not an equal, separate allocator")
                keep = copy.deepcopy(aref)
                if inp.one_in(2):
                    self.add_ghost("the original allocator after a copy", alloc, keep)
                    self.alloc = clone
                else:
                    self.add_ghost("a copy of the allocator", clone, keep)
        else:
            if HAVE_ALLOC_SAVE:
                loaded = self.roundtrip_file("alloc", alloc, BlockAllocator, allocator_state)
                if inp.one_in(2):
                    self.add_ghost("an allocator saved and loaded", alloc, copy.deepcopy(aref))
                    self.alloc = loaded

    def check_allocator(self, alloc=None, aref=None, label="alloc") -> None:
        alloc = self.alloc if alloc is None else alloc
        aref = self.aref if aref is None else aref
        if alloc is None:
            return
        got = allocator_state(alloc)
        want = ref_allocator_state(aref)
        if got != want:
            self.diverge(f"{label}'s state {got} differs from the reference {want}")
        self.check_allocator_invariants(alloc, label)

    # -- driver -------------------------------------------------------------------------
    def check_all(self) -> None:
        self.check_table()
        if self.kv is not None:
            self.check_manager()
        self.check_allocator()

    def check_ghosts(self) -> None:
        for label, obj, ref in self.ghosts:
            if isinstance(obj, PageTable):
                self.check_table(obj, ref, label)
            elif isinstance(obj, KVCacheManager):
                self.check_manager(obj, ref, label)
            else:
                self.check_allocator(obj, ref, label)

    def run(self, max_ops: int = 200) -> None:
        inp = self.inp
        ops = 0
        while not inp.exhausted and ops < max_ops:
            ops += 1
            target = inp.below(20)
            # The three objects are independent: check the one the call was made on.
            if target < 10:
                self.table_op()
                self.check_table()
            elif target < 16:
                self.manager_op()
                if self.kv is not None:
                    self.check_manager()
            else:
                self.allocator_op()
                self.check_allocator()
            if ops % 16 == 0:
                self.check_ghosts()
        self.check_all()
        self.check_ghosts()

    def add_ghost(self, label, obj, ref) -> None:
        self.ghosts = self.ghosts[-3:] + [(label, obj, ref)]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def table_state(pt) -> tuple:
    ids = list(pt)
    return (pt.block_size, ids, [pt.get_sequence_blocks(s).tolist() for s in ids], len(pt), pt.total_blocks)


def allocator_state(alloc) -> tuple:
    return (alloc.num_blocks, alloc.num_free, alloc._refcounts().tolist(), alloc._free_blocks().tolist())


def ref_allocator_state(aref) -> tuple:
    return (aref.num_blocks, aref.num_free, list(aref._refcount), list(aref._free_stack))


def manager_state(kv) -> dict:
    ids = list(kv.page_table)
    table = kv.block_table(ids)
    lens = kv.seq_lens(ids).tolist()
    blocks = [[b for b in row if b != PAD_SLOT_ID] for row in table.tolist()]
    return {
        "block_size": kv.block_size, "num_blocks": kv.num_blocks, "num_free": kv.num_free_blocks,
        "len": len(kv), "ids": ids, "seq_lens": lens, "blocks": blocks,
        "refcounts": kv.allocator._refcounts().tolist(), "free_stack": kv.allocator._free_blocks().tolist(),
    }


def ref_manager_state(kref) -> dict:
    ids = list(kref._blocks)
    return {
        "block_size": kref.block_size, "num_blocks": kref.num_blocks, "num_free": kref.num_free_blocks,
        "len": len(kref), "ids": ids, "seq_lens": [kref._tokens[s] for s in ids],
        "blocks": [list(kref._blocks[s]) for s in ids],
        "refcounts": list(kref._allocator._refcount), "free_stack": list(kref._allocator._free_stack),
    }


def run_one(data: bytes) -> None:
    """Decode ``data`` into calls and check every one against the reference models."""
    _REG.clear()
    try:
        Harness(Input(data)).run()
    finally:
        _REG.clear()


if __name__ == "__main__":
    # python tests/fuzz/harness.py CRASH_FILE...  replays inputs (PAGETABLE_FUZZ_VERBOSE=1 to trace)
    for name in sys.argv[1:]:
        run_one(pathlib.Path(name).read_bytes())
        print(f"{name}: ok")
