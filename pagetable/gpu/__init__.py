"""The device path: a GPU mirror of a PageTable and the kernels that read it.

:class:`DeviceBlockTable` keeps a dense ``int32 [max_rows, max_blocks_per_seq]`` copy of a
:class:`pagetable.PageTable` on the GPU, plus each row's block count, and keeps it current
with :meth:`DeviceBlockTable.sync`, which uploads only what changed since the last call.
Batched lookups, slot mapping (from per-token pairs or from a batch description) and the
CSR page list for FlashInfer-style kernels then run on the device.

The package is three layers, each importable without the next:

* ``_signatures`` -- the kernel source ``pagetable_kernels.cu`` (one file, compiled by
  NVRTC on CUDA and hiprtc on ROCm), its parsed signatures and the launch shapes; pure
  Python, shared by the CuPy launcher and the CPU emulation in ``tests/kernel_emulation``;
* ``_planner`` -- the upload planner, pure numpy: what each sync must send;
* ``_device`` -- the CuPy code: :class:`DeviceBlockTable` and the checked launcher.

Importing this package never imports CuPy.  :func:`is_available` says whether CuPy and a
device are present; anything that needs them raises :class:`GPUUnavailableError` naming
what is missing.

Sentinel: :data:`PAD_SLOT_ID` (-1), ``pagetable.PAD_SLOT_ID`` itself, marks
every unmapped entry, padding included.
"""

# The private names (_HostMirror, _block_shift, _raw_module, _kernel) stay reachable here,
# where the tests have always found them.  Module state is not re-exported: patch
# pagetable.gpu._device._usable_cupy itself, not a copy of it.
from ._device import DeviceBlockTable, GPUUnavailableError, _kernel, _raw_module, is_available
from ._planner import SyncStats, _HostMirror
from ._signatures import (
    KERNEL_SOURCE_PATH,
    PAD_SLOT_ID,
    THREADS_PER_BLOCK,
    KernelParameter,
    _block_shift,
    kernel_signatures,
    kernel_source,
    launch_shape_per_item,
    launch_shape_per_request,
)

__all__ = [
    "PAD_SLOT_ID",
    "KERNEL_SOURCE_PATH",
    "THREADS_PER_BLOCK",
    "GPUUnavailableError",
    "KernelParameter",
    "SyncStats",
    "DeviceBlockTable",
    "is_available",
    "kernel_source",
    "kernel_signatures",
    "launch_shape_per_item",
    "launch_shape_per_request",
]
