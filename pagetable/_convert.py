"""Argument validation and conversion shared by every Python-facing entry point.

Everything here runs before a table is touched, so a bad argument raises before
anything changes.  Messages name the argument and the offending value.
"""

from __future__ import annotations

import operator

import numpy as np

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

_INT64 = np.dtype(np.int64)
_INT32 = np.dtype(np.int32)
_BOOL_TYPES = {bool, np.bool_}


def as_index(value: object, name: str) -> int:
    """Return ``value`` as a Python int, rejecting bools, floats and other non-integers."""
    if type(value) is int:
        return value  # type: ignore[return-value]
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, not bool ({value!r})")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def check_range(value: int, low: int, high: int, name: str) -> int:
    """Raise ``ValueError`` below ``low`` and ``OverflowError`` above ``high``."""
    if value < low:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    if value > high:
        raise OverflowError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _exact_integers(values: object, array: np.ndarray, name: str) -> np.ndarray | None:
    """The int64 array of an array-like whose elements are all Python or numpy integers.

    numpy turns such a list into float64 or object when no one integer dtype holds
    every element: ``[np.uint64(1), np.int64(2)]`` becomes float64 and ``[2**64]``
    object.  The values are integers all the same, so they are read again one by one,
    exactly; ``None`` means the elements are not all integers.
    """
    if array.dtype.kind not in "fcO" or isinstance(values, np.ndarray):
        return None
    flat = list(np.asarray(values, dtype=object).ravel())
    if not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in flat
    ):
        return None
    exact = [int(v) for v in flat]
    for v in exact:
        if not -(2**63) <= v <= INT64_MAX:
            raise OverflowError(f"{name} holds {v}, which does not fit in 64 bits")
    return np.array(exact, dtype=np.int64)


def _not_integers(array: np.ndarray, name: str) -> TypeError:
    if array.dtype.kind == "b":
        return TypeError(f"{name} must hold integers, got booleans")
    return TypeError(f"{name} must hold integers, got dtype {array.dtype}")


def as_int_array(values: object, name: str, dtype: np.dtype = _INT64) -> np.ndarray:
    """Return ``values`` as a 1-D C-contiguous, aligned, native-order array of ``dtype``.

    ``dtype`` is int64 or int32.  Accepts lists, tuples and numpy arrays of any integer
    dtype: non-contiguous views, unaligned buffers, read-only arrays and foreign byte
    order included (such arrays are copied; a behaved array of ``dtype`` is returned
    as it is).  Values that do not fit in ``dtype`` raise ``OverflowError``; nothing is
    silently truncated.  This is the slow path of every array argument; the compiled
    modules accept a behaved array of the right dtype without calling it.
    """
    dtype = np.dtype(dtype)
    if type(values) is np.ndarray and values.dtype == dtype and values.ndim == 1:  # type: ignore[union-attr]
        return np.require(values, requirements=["C", "A"])
    if isinstance(values, (list, tuple)) and _BOOL_TYPES & set(map(type, values)):
        # numpy reads [True, 2] as integers; a bool is not a sequence or block id.
        raise TypeError(f"{name} must hold integers, got a bool among them")
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TypeError(f"{name} must be a 1-D array of integers: {exc}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {array.shape}")
    kind = array.dtype.kind
    if kind not in "iu":
        if array.size == 0 and kind != "b" and kind != "O":
            return np.empty(0, dtype=dtype)
        exact = _exact_integers(values, array, name)
        if exact is None:
            raise _not_integers(array, name)
        array = exact
    if array.dtype == dtype:
        return np.require(array, requirements=["C", "A"])
    info = np.iinfo(dtype)
    src = np.iinfo(array.dtype)
    if array.size and (src.max > info.max or src.min < info.min):
        high = array.max()
        low = array.min()
        if high > info.max:
            raise OverflowError(f"{name} holds {high}, which does not fit in {dtype}")
        if low < info.min:
            raise OverflowError(f"{name} holds {low}, which does not fit in {dtype}")
    return np.require(array.astype(dtype), requirements=["C", "A"])


def _view_without_copy(out: object, name: str) -> np.ndarray:
    """A numpy view of a writeable buffer that is not an ndarray, or ``TypeError``.

    DLPack (``__dlpack__``: CPU torch tensors, CuPy's host arrays, JAX) is tried
    first, then the buffer protocol and ``__array_interface__``; each shares the
    caller's memory by construction, so writes through the view reach ``out``.
    """
    if hasattr(out, "__dlpack__"):
        try:
            return np.from_dlpack(out)
        except (TypeError, ValueError, RuntimeError, BufferError) as exc:
            raise TypeError(
                f"{name} ({type(out).__name__}) cannot be written in place from the host: {exc}"
            ) from None
    if not hasattr(out, "__array_interface__"):
        try:
            memoryview(out)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{name} must be a numpy.ndarray or a writeable buffer (DLPack, buffer protocol), "
                f"got {type(out).__name__}"
            ) from None
    return np.asarray(out)


def check_output(out: object, shape: tuple[int, ...], dtype: np.dtype, name: str = "out") -> np.ndarray:
    """Validate a caller-supplied output buffer; return it as an ndarray sharing its memory.

    It must be of exactly ``dtype`` in native byte order, of ``shape`` (``-1``
    matches any length), C-contiguous, aligned and writeable.  A numpy.ndarray is
    returned as it is; a tensor or buffer object that is not one (a CPU
    ``torch.Tensor``, a ``memoryview``) is viewed without a copy.
    """
    if not isinstance(out, np.ndarray):
        out = _view_without_copy(out, name)
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} in native byte order, got {out.dtype.str}")
    if out.ndim != len(shape):
        raise ValueError(f"{name} must be {len(shape)}-D, got an array of shape {out.shape}")
    for axis, want in enumerate(shape):
        if want >= 0 and out.shape[axis] != want:
            raise ValueError(f"{name} must have shape {tuple(s if s >= 0 else 'W' for s in shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError(f"{name} must be aligned")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return out


def kernel_blocks_per_block(
    kernel_block_size: object, block_size: int, name: str = "kernel_block_size", of: str = "the block size"
) -> int:
    """``block_size // kernel_block_size``, for a kernel block size that divides ``block_size``.

    ``of`` names what it must divide in the message (``block_size / dcp_world_size``
    for a rank's share of a block).
    """
    value = as_index(kernel_block_size, name)
    if value <= 0 or block_size % value:
        raise ValueError(f"{name} must be a positive divisor of {of} ({block_size}), got {value}")
    return block_size // value
