"""The kernels as the host sees them: their source, its parsed signatures, launch shapes.

Pure Python, no CuPy: the CuPy launcher (``_device``) and the CPU emulation in
``tests/kernel_emulation`` both check their arguments against :func:`kernel_signatures`,
so the two can never disagree about a kernel's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np

from pagetable._table import PAD_SLOT_ID

KERNEL_SOURCE_PATH: Path = Path(__file__).resolve().parent / "pagetable_kernels.cu"
"""Path of the one kernel source shared by ROCm and CUDA."""

THREADS_PER_BLOCK: int = 256
"""Threads per block of every launch: a multiple of both 32 (NVIDIA, RDNA) and 64 (CDNA)."""

# Enough blocks to fill the largest GPUs several times over; the kernels' grid-stride loops
# cover the rest, so bounding the grid never changes a result.
_MAX_BLOCKS_PER_LAUNCH = 1 << 16
_MAX_GRID_Y = 65535


@dataclasses.dataclass(frozen=True)
class KernelParameter:
    """One parameter of a kernel, as declared in the kernel source.

    Attributes
    ----------
    name : str
        The parameter's name in the source.
    dtype : numpy.dtype
        ``int32`` for ``int``, ``int64`` for ``long long``; for a pointer, its element type.
    is_pointer : bool
        Whether the parameter is a device pointer (an array argument).
    is_const : bool
        Whether the pointed-to data is read-only (``const``).
    """

    name: str
    dtype: np.dtype
    is_pointer: bool
    is_const: bool


_C_TYPES: dict[str, np.dtype] = {"int": np.dtype(np.int32), "long long": np.dtype(np.int64)}
_KERNEL_PATTERN = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def kernel_source() -> str:
    """Return the text of the kernel source file.

    Returns
    -------
    str
        The contents of :data:`KERNEL_SOURCE_PATH`.
    """
    return KERNEL_SOURCE_PATH.read_text()


@functools.lru_cache(maxsize=None)
def kernel_signatures() -> dict[str, tuple[KernelParameter, ...]]:
    """Parse the parameter lists of every kernel in the source.

    Both the GPU launcher and the CPU emulation build their argument checks from this,
    so an argument of the wrong type fails loudly instead of being reinterpreted.

    Returns
    -------
    dict of str to tuple of KernelParameter
        Kernel name to its parameters, in declaration order.

    Raises
    ------
    ValueError
        If a parameter has a type other than ``int`` or ``long long`` (or pointers to them).
    """
    signatures = {}
    for match in _KERNEL_PATTERN.finditer(kernel_source()):
        name, parameter_text = match.group(1), match.group(2)
        parameters = []
        for declaration in parameter_text.split(","):
            declaration = " ".join(declaration.split())
            is_const = declaration.startswith("const ")
            if is_const:
                declaration = declaration[len("const "):]
            is_pointer = "*" in declaration
            type_name, _, parameter_name = declaration.replace("*", " ").rpartition(" ")
            type_name = type_name.strip()
            if type_name not in _C_TYPES:
                raise ValueError(
                    f"kernel {name}: parameter {parameter_name!r} has type {type_name!r}; "
                    "only int and long long are allowed"
                )
            parameters.append(
                KernelParameter(parameter_name.strip(), _C_TYPES[type_name], is_pointer, is_const)
            )
        signatures[name] = tuple(parameters)
    return signatures


def launch_shape_per_item(num_items: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block shape of a kernel that runs one thread per item (grid-stride).

    Parameters
    ----------
    num_items : int
        Number of items (tokens, queries, updates).

    Returns
    -------
    grid, block : tuple of int
        Launch dimensions, at least one block even for no items.
    """
    num_blocks = -(-num_items // THREADS_PER_BLOCK)
    num_blocks = max(1, min(num_blocks, _MAX_BLOCKS_PER_LAUNCH))
    return (num_blocks, 1, 1), (THREADS_PER_BLOCK, 1, 1)


def launch_shape_per_request(
    num_requests: int, max_items_per_request: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block shape of a kernel parallel over (request, item tile).

    ``blockIdx.y`` walks requests and the x dimension walks tiles of a request's items
    (tokens or pages), so no thread needs a prefix sum over other requests.

    Parameters
    ----------
    num_requests : int
        Number of requests in the batch.
    max_items_per_request : int
        The most items any request has (the longest query, or the table width).

    Returns
    -------
    grid, block : tuple of int
        Launch dimensions.  The grid is bounded; grid-stride loops cover the rest.
    """
    grid_y = max(1, min(num_requests, _MAX_GRID_Y))
    tiles = max(1, -(-max_items_per_request // THREADS_PER_BLOCK))
    grid_x = max(1, min(tiles, _MAX_BLOCKS_PER_LAUNCH // grid_y))
    return (grid_x, grid_y, 1), (THREADS_PER_BLOCK, 1, 1)


def _block_shift(block_size: int) -> int:
    """log2(block_size) when it is a power of two, else -1 (the kernels then divide)."""
    if block_size > 0 and block_size & (block_size - 1) == 0:
        return block_size.bit_length() - 1
    return -1
