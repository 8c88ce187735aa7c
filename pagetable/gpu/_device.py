"""The CuPy side of the device path: :class:`DeviceBlockTable` and the kernel launcher.

CuPy is imported on first use (:func:`_import_cupy`), never at import time.  The
kernels are compiled once per process through ``cupy.RawModule``: NVRTC on CUDA, hiprtc
on ROCm (``cupy.cuda.runtime.is_hip``), the same text for both.  Every launch is checked
against the parsed signatures of ``_signatures``; what to upload is planned by
``_planner``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from ._planner import SyncStats, _HostMirror, _UploadPlan
from ._signatures import (
    PAD_SLOT_ID,
    _block_shift,
    kernel_signatures,
    kernel_source,
    launch_shape_per_item,
    launch_shape_per_request,
)

_INT32_MAX = np.iinfo(np.int32).max


class GPUUnavailableError(RuntimeError):
    """Raised when the device path is used without CuPy or without a GPU device."""


_usable_cupy = None


def _import_cupy():
    """Return the cupy module with a usable device, or raise GPUUnavailableError.

    The answer is kept once positive, so launches (graph capture included) make no
    runtime calls for it.
    """
    global _usable_cupy
    if _usable_cupy is not None:
        return _usable_cupy
    try:
        import cupy
    except Exception as error:  # ImportError, or CuPy failing to load its CUDA/HIP libraries
        raise GPUUnavailableError(
            "pagetable.gpu needs CuPy, which is not installed: pip install "
            "'pagetable[cuda12]', 'pagetable[cuda13]' or 'pagetable[rocm]'"
        ) from error
    try:
        device_count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CuPy raises its runtime's own error types
        raise GPUUnavailableError(
            f"CuPy is installed but cannot reach a GPU device: {error}"
        ) from error
    if device_count == 0:
        raise GPUUnavailableError("CuPy is installed but finds no GPU device")
    _usable_cupy = cupy
    return cupy


def is_available() -> bool:
    """Whether CuPy is installed and can see at least one GPU device.

    Returns
    -------
    bool
        True when :class:`DeviceBlockTable` can be used.
    """
    try:
        _import_cupy()
    except GPUUnavailableError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _raw_module():
    """The kernel module, compiled once per process (CuPy compiles per device on first use).

    No options and no includes: the source compiles as-is under NVRTC and hiprtc.
    """
    cupy = _import_cupy()
    return cupy.RawModule(code=kernel_source())


@functools.lru_cache(maxsize=None)
def _kernel(kernel_name: str, device_id: int):
    """A kernel of the module on one device, looked up once."""
    return _raw_module().get_function(kernel_name)


def _launch(kernel_name: str, grid, block, arguments: Sequence[Any]) -> None:
    """Launch a kernel on the current stream, checking each argument against its declaration.

    Arrays must be C-contiguous CuPy arrays of the declared element type; scalars are
    converted to the declared width.  A mismatch raises instead of being reinterpreted.
    """
    cupy = _import_cupy()
    parameters = kernel_signatures()[kernel_name]
    if len(arguments) != len(parameters):
        raise TypeError(f"{kernel_name}: {len(arguments)} arguments for {len(parameters)} parameters")
    converted = []
    for parameter, argument in zip(parameters, arguments):
        if parameter.is_pointer:
            if not isinstance(argument, cupy.ndarray):
                raise TypeError(f"{kernel_name}: {parameter.name} must be a CuPy array")
            if argument.dtype != parameter.dtype or not argument.flags.c_contiguous:
                raise TypeError(
                    f"{kernel_name}: {parameter.name} must be C-contiguous {parameter.dtype}, "
                    f"got {argument.dtype} (contiguous={argument.flags.c_contiguous})"
                )
            converted.append(argument)
        else:
            info = np.iinfo(parameter.dtype)
            value = int(argument)
            if not info.min <= value <= info.max:
                raise OverflowError(f"{kernel_name}: {parameter.name}={value} does not fit {parameter.dtype}")
            converted.append(parameter.dtype.type(value))
    _kernel(kernel_name, cupy.cuda.runtime.getDevice())(grid, block, tuple(converted))


def _as_device_array(cupy, value: Any, argument: str, dtype, clamp_to_int32: bool = False):
    """A 1-D C-contiguous CuPy array of ``dtype`` viewing ``value`` without a copy when it can.

    CuPy arrays are used as they are; objects exposing DLPack (PyTorch, JAX) or
    ``__cuda_array_interface__`` (Numba) are wrapped in place; anything else is taken as
    host data and copied to the device.  A different integer dtype costs
    one conversion on the device.  With ``clamp_to_int32``, values outside int32 become -1,
    which the kernels treat as out of range, instead of wrapping into a valid row.
    """
    if isinstance(value, cupy.ndarray):
        array = value
    elif hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        # DLPack first: PyTorch then orders its stream with ours on the device, where
        # __cuda_array_interface__ would make CuPy wait for the producer's stream on the host.
        array = cupy.from_dlpack(value)
    elif hasattr(value, "__cuda_array_interface__"):
        array = cupy.asarray(value)
    else:
        host = np.asarray(value)
        if host.size and host.dtype.kind not in "iu":
            raise TypeError(f"{argument} must hold integers, got dtype {host.dtype}")
        array = cupy.asarray(host if host.size else host.astype(dtype))
    if array.ndim != 1:
        raise ValueError(f"{argument} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{argument} must hold integers, got dtype {array.dtype}")
    if array.dtype != dtype:
        if clamp_to_int32 and array.dtype.itemsize >= 4 and array.dtype != np.int32:
            out_of_range = array > _INT32_MAX
            if array.dtype.kind == "i":
                out_of_range |= array < 0
            array = cupy.where(out_of_range, -1, array)
        array = array.astype(dtype)
    return cupy.ascontiguousarray(array)


class _StagingBuffer:
    """Pinned host memory for one upload, and the event that says when its copy is done."""

    def __init__(self, cupy, num_int32: int) -> None:
        self.capacity = max(int(num_int32), 1024)
        self.memory = cupy.cuda.alloc_pinned_memory(self.capacity * 4)
        self.array = np.frombuffer(self.memory, dtype=np.int32, count=self.capacity)
        self.copy_done = cupy.cuda.Event(disable_timing=True)
        self.copy_queued = False


class DeviceBlockTable:
    """A GPU mirror of a :class:`pagetable.PageTable`, kept current by incremental uploads.

    The device holds a dense ``int32 [max_rows, max_blocks_per_seq]`` table (entry ``[r, j]``
    is the physical block of logical block ``j`` of the sequence in row ``r``, PAD_SLOT_ID
    past the row's length) and an ``int32 [max_rows]`` array of row lengths.  Sequences get
    rows with :meth:`assign` and give them back with :meth:`release`; the device kernels take
    row indices (see :meth:`rows_for`).

    :meth:`sync` uploads what changed since the last call.  The host copy is a
    :class:`pagetable.BatchTable` (docs/BATCH_TABLE.md), whose change planning this
    shares: the page table's change stamps pick the rows that changed at all, and only
    entries that differ from what the device holds are sent (appended blocks, a last
    block replaced by copy-on-write, a row rewritten further in, the PAD entries of a
    released or shrunk row).  Rows named in :meth:`invalidate` are compared whole
    (never required for edits made through the page table).  Updates are packed into pinned host staging buffers, copied on a non-blocking
    stream and applied by one scatter kernel; when the packed updates would be at least
    ``full_upload_fraction`` of the table's bytes, the whole table is uploaded instead.

    Parameters
    ----------
    page_table : pagetable.PageTable or pagetable.KVCacheManager
        The host table to mirror (a manager's ``page_table``).
    max_rows : int
        Rows of the device table: the most sequences mirrored at once.
    max_blocks_per_seq : int
        Columns of the device table: the most blocks one sequence may have.
    num_staging_buffers : int, optional
        Pinned staging buffers used in rotation (at least 2), so that one sync never
        overwrites a buffer an earlier sync's copy may still be reading.
    full_upload_fraction : float, optional
        Upload the whole table when incremental updates would move at least this fraction
        of its bytes.
    device : int, optional
        CUDA/HIP device ordinal; the current device by default.

    Raises
    ------
    GPUUnavailableError
        If CuPy is not installed or no GPU device is present.
    ValueError
        If a size is not positive or the table would not fit int32 indexing of a row.

    Notes
    -----
    Ordering: the scatter kernel waits (on the device) for the work queued on the caller's
    current stream before :meth:`sync`, and the caller's current stream waits for the
    upload after it, so kernels of step N never see step N+1's table and vice versa.  The
    host blocks only when a staging buffer's earlier copy has not finished yet.
    """

    def __init__(
        self,
        page_table: Any,
        max_rows: int,
        max_blocks_per_seq: int,
        *,
        num_staging_buffers: int = 2,
        full_upload_fraction: float = 0.5,
        device: int | None = None,
    ) -> None:
        for argument, value in (("max_rows", max_rows), ("max_blocks_per_seq", max_blocks_per_seq)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{argument} must be an integer, got {value!r}")
            if not 0 < value <= _INT32_MAX:
                raise ValueError(f"{argument} must be in 1 .. {_INT32_MAX}, got {value}")
        if num_staging_buffers < 2:
            raise ValueError(f"num_staging_buffers must be at least 2, got {num_staging_buffers}")
        if not 0.0 < full_upload_fraction <= 1.0:
            raise ValueError(f"full_upload_fraction must be in (0, 1], got {full_upload_fraction}")
        cupy = _import_cupy()
        self._cupy = cupy
        self._page_table = page_table
        self._block_size = int(page_table.block_size)
        self._block_shift = _block_shift(self._block_size)
        self._full_upload_fraction = float(full_upload_fraction)
        self._mirror = _HostMirror(page_table, int(max_rows), int(max_blocks_per_seq))
        self._device = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
        with self._device:
            self._stream = cupy.cuda.Stream(non_blocking=True)
            with self._stream:
                self._table = cupy.full((max_rows, max_blocks_per_seq), PAD_SLOT_ID, dtype=cupy.int32)
                self._row_lengths = cupy.zeros(max_rows, dtype=cupy.int32)
                self._device_updates = cupy.empty(1024, dtype=cupy.int32)
                # Stand-ins for optional kernel arrays that a flag says are not used; kept
                # apart from every real argument so no output is ever aliased.
                self._unused_token_counts = cupy.zeros(1, dtype=cupy.int32)
                self._unused_last_page_len = cupy.zeros(1, dtype=cupy.int32)
                self._unused_positions = cupy.zeros(1, dtype=cupy.int64)
            self._stream.synchronize()
            self._caller_done = cupy.cuda.Event(disable_timing=True)
            self._upload_done = cupy.cuda.Event(disable_timing=True)
            self._staging = [_StagingBuffer(cupy, 1024) for _ in range(num_staging_buffers)]
        self._next_staging = 0
        self.last_sync: SyncStats = SyncStats("none", 0, self._mirror.table_bytes)
        """Statistics of the most recent :meth:`sync`."""

    # ---------------------------------------------------------------- properties

    @property
    def table(self):
        """The device table, a CuPy ``int32 [max_rows, max_blocks_per_seq]`` array.

        Read it on the caller's stream after :meth:`sync`; do not write to it.
        """
        return self._table

    @property
    def row_lengths(self):
        """Blocks mapped per row, a CuPy ``int32 [max_rows]`` array (0 for a free row)."""
        return self._row_lengths

    @property
    def max_rows(self) -> int:
        """Rows of the device table."""
        return self._mirror.max_rows

    @property
    def max_blocks_per_seq(self) -> int:
        """Columns of the device table."""
        return self._mirror.max_blocks_per_seq

    @property
    def block_size(self) -> int:
        """Tokens per block, taken from the page table."""
        return self._block_size

    @property
    def stream(self):
        """The non-blocking stream that uploads run on."""
        return self._stream

    # ---------------------------------------------------------------- rows

    def assign(self, seq_ids: Any) -> np.ndarray:
        """Give each sequence a device row; its blocks are uploaded by the next :meth:`sync`.

        Parameters
        ----------
        seq_ids : array_like of int
            Sequence ids without a row yet.  They need not be in the page table yet.

        Returns
        -------
        numpy.ndarray of int32
            The rows, in the order of ``seq_ids``.

        Raises
        ------
        ValueError
            If a sequence already has a row, is listed twice, or too few rows are free.
        """
        return self._mirror.assign(seq_ids)

    def release(self, seq_ids: Any) -> np.ndarray:
        """Give the sequences' rows back; the next :meth:`sync` pads them on the device.

        Parameters
        ----------
        seq_ids : array_like of int
            Sequences that hold rows.

        Returns
        -------
        numpy.ndarray of int32
            The rows released.

        Raises
        ------
        KeyError
            If a sequence has no row (nothing is released then).
        """
        return self._mirror.release(seq_ids)

    def invalidate(self, seq_ids: Any) -> None:
        """Mark sequences for a whole-row upload at the next :meth:`sync`.

        Never needed for edits made through the page table (its change stamps show them
        all); useful if the device table itself was written to by other code.

        Parameters
        ----------
        seq_ids : array_like of int
            Sequences that hold rows.

        Raises
        ------
        KeyError
            If a sequence has no row.
        """
        self._mirror.invalidate(seq_ids)

    def rows_for(self, seq_ids: Any) -> np.ndarray:
        """Rows of the given sequences, to pass to the device methods (after ``cupy.asarray``).

        Parameters
        ----------
        seq_ids : array_like of int
            Sequences that hold rows.

        Returns
        -------
        numpy.ndarray of int32

        Raises
        ------
        KeyError
            If a sequence has no row.
        """
        return self._mirror.rows_for(seq_ids)

    # ---------------------------------------------------------------- upload

    def _staging_buffer(self, num_int32: int) -> _StagingBuffer:
        """The next staging buffer in rotation, once its previous copy has finished."""
        buffer = self._staging[self._next_staging]
        if buffer.copy_queued:
            buffer.copy_done.synchronize()
            buffer.copy_queued = False
        if buffer.capacity < num_int32:
            buffer = _StagingBuffer(self._cupy, max(num_int32, 2 * buffer.capacity))
            self._staging[self._next_staging] = buffer
        self._next_staging = (self._next_staging + 1) % len(self._staging)
        return buffer

    def sync(self) -> SyncStats:
        """Bring the device table up to date with the page table.

        Returns
        -------
        SyncStats
            What was uploaded (also kept in :attr:`last_sync`).

        Raises
        ------
        ValueError
            If a sequence has more than ``max_blocks_per_seq`` blocks (nothing is uploaded).
        """
        cupy = self._cupy
        plan = self._mirror.plan(self._page_table, self._full_upload_fraction)
        if plan.stats.mode == "none":
            self._mirror.commit()
            self.last_sync = plan.stats
            return plan.stats
        with self._device:
            caller_stream = cupy.cuda.get_current_stream()
            # Events are reused: a wait is bound to the record before it, so recording
            # again at the next sync cannot disturb this sync's waits.
            caller_done = self._caller_done
            caller_done.record(caller_stream)
            if plan.stats.mode == "incremental":
                self._upload_incremental(plan, caller_done)
            else:
                self._upload_full(plan, caller_done)
            upload_done = self._upload_done
            upload_done.record(self._stream)
            caller_stream.wait_event(upload_done)
        self._mirror.commit()
        self.last_sync = plan.stats
        return plan.stats

    def _upload_incremental(self, plan: _UploadPlan, caller_done) -> None:
        cupy = self._cupy
        packed_updates = plan.packed_updates
        assert packed_updates is not None
        count = packed_updates.size
        staging = self._staging_buffer(count)
        staging.array[:count] = packed_updates
        with self._stream:
            if self._device_updates.size < count:
                # Allocated on the upload stream, so the pool reuses the old buffer only
                # after the kernels queued on this stream are done with it.
                self._device_updates = cupy.empty(max(count, 2 * self._device_updates.size), dtype=cupy.int32)
            # The copy needs nothing from the caller's stream, so it overlaps its work;
            # only the scatter waits for it.
            self._device_updates.data.copy_from_host_async(staging.memory.ptr, count * 4, self._stream)
            staging.copy_done.record(self._stream)
            staging.copy_queued = True
            self._stream.wait_event(caller_done)
            grid, block = launch_shape_per_item(plan.num_cell_updates + plan.num_length_updates)
            _launch(
                "pagetable_apply_updates", grid, block,
                (self._table, self._row_lengths, self.max_rows, self.max_blocks_per_seq,
                 self._device_updates, plan.num_cell_updates, plan.num_length_updates),
            )

    def _upload_full(self, plan: _UploadPlan, caller_done) -> None:
        full_table, full_lengths = plan.full_table, plan.full_lengths
        assert full_table is not None and full_lengths is not None
        table_count = full_table.size
        count = table_count + full_lengths.size
        staging = self._staging_buffer(count)
        staging.array[:table_count] = full_table.ravel()
        staging.array[table_count:count] = full_lengths
        with self._stream:
            self._stream.wait_event(caller_done)
            self._table.data.copy_from_host_async(staging.memory.ptr, table_count * 4, self._stream)
            self._row_lengths.data.copy_from_host_async(
                staging.memory.ptr + table_count * 4, full_lengths.size * 4, self._stream
            )
            staging.copy_done.record(self._stream)
            staging.copy_queued = True

    # ---------------------------------------------------------------- device queries

    def _table_arguments(self) -> tuple:
        return (self._table, self._row_lengths, self.max_rows, self.max_blocks_per_seq)

    def lookup(self, rows: Any, positions: Any):
        """Physical block and offset of each (row, position) pair, on the device.

        Parameters
        ----------
        rows : array_like of int
            Device rows (int32 is used as is; other integer types are converted, values
            outside int32 counting as out of range).
        positions : array_like of int
            Token positions, same length (int64 is used as is).

        Returns
        -------
        block_ids, offsets : cupy.ndarray of int32
            PAD_SLOT_ID in both where the row is out of range or the position unmapped.
        """
        cupy = self._cupy
        with self._device:
            rows = _as_device_array(cupy, rows, "rows", np.int32, clamp_to_int32=True)
            positions = _as_device_array(cupy, positions, "positions", np.int64)
            _check_same_length(rows, positions)
            block_ids = cupy.empty(rows.size, dtype=cupy.int32)
            offsets = cupy.empty(rows.size, dtype=cupy.int32)
            grid, block = launch_shape_per_item(rows.size)
            _launch(
                "pagetable_lookup", grid, block,
                self._table_arguments() + (self._block_size, self._block_shift,
                                           rows, positions, rows.size, block_ids, offsets),
            )
        return block_ids, offsets

    def slot_mapping(self, rows: Any, positions: Any, out: Any = None):
        """KV-cache slot (``block_id * block_size + offset``) of each (row, position) pair.

        Parameters
        ----------
        rows, positions : array_like of int
            As in :meth:`lookup`.
        out : cupy.ndarray of int64, optional
            Preallocated output of the same length.

        Returns
        -------
        cupy.ndarray of int64
            PAD_SLOT_ID where unmapped.
        """
        cupy = self._cupy
        with self._device:
            rows = _as_device_array(cupy, rows, "rows", np.int32, clamp_to_int32=True)
            positions = _as_device_array(cupy, positions, "positions", np.int64)
            _check_same_length(rows, positions)
            out = _output(cupy, out, "out", rows.size, np.int64)
            grid, block = launch_shape_per_item(rows.size)
            _launch(
                "pagetable_slot_mapping", grid, block,
                self._table_arguments() + (self._block_size, self._block_shift,
                                           rows, positions, rows.size, out),
            )
        return out

    def slot_mapping_from_batch(
        self,
        rows: Any,
        query_start_loc: Any,
        first_positions: Any,
        num_tokens_padded: int | None = None,
        *,
        out: Any = None,
        positions_out: Any = None,
        max_query_len: int | None = None,
    ):
        """Slot mapping of a whole batch from its description, expanded on the device.

        Request ``r`` owns output tokens ``query_start_loc[r] .. query_start_loc[r+1] - 1``,
        at positions ``first_positions[r], first_positions[r] + 1, ...`` of row ``rows[r]``.
        The output has a fixed length, padded with PAD_SLOT_ID, so a captured graph can
        replay the call for any batch that fits.

        Parameters
        ----------
        rows : array_like of int, shape (B,)
            Device row of each request.
        query_start_loc : array_like of int, shape (B + 1,)
            Non-decreasing token offsets of the requests (vLLM's ``query_start_loc``), int32.
        first_positions : array_like of int, shape (B,)
            Position of each request's first new token (tokens already computed), int64.
        num_tokens_padded : int, optional
            Output length.  Defaults to ``out``'s length, else to ``query_start_loc[-1]``
            (which reads it back from the device: not capturable in a graph).
        out : cupy.ndarray of int64, optional
            Preallocated slot-mapping output.
        positions_out : cupy.ndarray of int64, optional
            When given, receives each token's position (PAD_SLOT_ID on padding).
        max_query_len : int, optional
            Longest query in the batch, when the host knows it: sizes the grid's token
            tiles.  Defaults to the output length (correct, possibly more blocks than needed).

        Returns
        -------
        cupy.ndarray of int64
            The slot mapping.
        """
        cupy = self._cupy
        with self._device:
            rows = _as_device_array(cupy, rows, "rows", np.int32, clamp_to_int32=True)
            query_start_loc = _as_device_array(cupy, query_start_loc, "query_start_loc", np.int32)
            first_positions = _as_device_array(cupy, first_positions, "first_positions", np.int64)
            num_requests = rows.size
            if query_start_loc.size != num_requests + 1 or first_positions.size != num_requests:
                raise ValueError(
                    f"query_start_loc must have len(rows) + 1 = {num_requests + 1} entries and "
                    f"first_positions len(rows) = {num_requests}; got {query_start_loc.size} "
                    f"and {first_positions.size}"
                )
            if num_tokens_padded is None:
                num_tokens_padded = out.size if out is not None else int(query_start_loc[-1:].get()[0])
            out = _output(cupy, out, "out", num_tokens_padded, np.int64)
            write_positions = positions_out is not None
            if write_positions:
                positions_out = _output(cupy, positions_out, "positions_out", num_tokens_padded, np.int64)
            else:
                positions_out = self._unused_positions  # write_positions is 0
            longest = num_tokens_padded if max_query_len is None else int(max_query_len)
            grid, block = launch_shape_per_request(num_requests, longest)
            _launch(
                "pagetable_slot_mapping_from_batch", grid, block,
                self._table_arguments() + (self._block_size, self._block_shift,
                                           rows, query_start_loc, first_positions, num_requests,
                                           num_tokens_padded, out, int(write_positions),
                                           positions_out),
            )
        return out

    def block_table(self, rows: Any, out_width: int | None = None):
        """The batch's rows of the device table, as PagedAttention kernels take them.

        Parameters
        ----------
        rows : array_like of int, shape (B,)
            Device rows.
        out_width : int, optional
            Columns of the output; ``max_blocks_per_seq`` by default.  Rows longer than
            this are cut.

        Returns
        -------
        table : cupy.ndarray of int32, shape (B, out_width)
            Block ids, PAD_SLOT_ID past each row's length and for out-of-range rows.
        num_blocks : cupy.ndarray of int32, shape (B,)
            Blocks per request (0 for an out-of-range row).
        """
        cupy = self._cupy
        width = self.max_blocks_per_seq if out_width is None else int(out_width)
        if width < 0:
            raise ValueError(f"out_width must be non-negative, got {out_width}")
        with self._device:
            rows = _as_device_array(cupy, rows, "rows", np.int32, clamp_to_int32=True)
            table = cupy.empty((rows.size, width), dtype=cupy.int32)
            num_blocks = cupy.empty(rows.size, dtype=cupy.int32)
            grid, block = launch_shape_per_request(rows.size, width)
            _launch(
                "pagetable_gather_block_table", grid, block,
                self._table_arguments() + (rows, rows.size, width, table, num_blocks),
            )
        return table, num_blocks

    def to_csr(self, rows: Any, token_counts: Any = None, *, indices_out: Any = None):
        """CSR page list of a batch (FlashInfer's ``kv_indptr`` / ``kv_indices`` /
        ``kv_last_page_len``), built on the device.

        ``kv_indptr`` comes from a one-thread prefix-sum kernel (O(B), microseconds for
        thousands of requests, no host round trip); the indices from a kernel parallel over
        (request, page tile).

        Parameters
        ----------
        rows : array_like of int, shape (B,)
            Device rows.
        token_counts : array_like of int, shape (B,), optional
            KV tokens of each request (int32).  When given, a request covers
            ``ceil(tokens / block_size)`` pages (at most its row's blocks) and
            ``kv_last_page_len`` is returned, each in ``1 .. block_size`` (0 when empty).
            Without it a request covers every block of its row.
        indices_out : cupy.ndarray of int32, optional
            Preallocated ``kv_indices`` buffer; never written past its end, and its length
            is what the method returns for the indices.  Without it the total is read back
            from the device (not capturable in a graph).

        Returns
        -------
        kv_indptr : cupy.ndarray of int32, shape (B + 1,)
        kv_indices : cupy.ndarray of int32
        kv_last_page_len : cupy.ndarray of int32, shape (B,), or None
            None when ``token_counts`` is not given.
        """
        cupy = self._cupy
        with self._device:
            rows = _as_device_array(cupy, rows, "rows", np.int32, clamp_to_int32=True)
            num_requests = rows.size
            has_token_counts = token_counts is not None
            if has_token_counts:
                token_counts = _as_device_array(cupy, token_counts, "token_counts", np.int32)
                if token_counts.size != num_requests:
                    raise ValueError(
                        f"token_counts must have len(rows) = {num_requests} entries, "
                        f"got {token_counts.size}"
                    )
                last_page_len = cupy.empty(num_requests, dtype=cupy.int32)
            else:
                # has_token_counts is 0: neither is touched.
                token_counts = self._unused_token_counts
                last_page_len = self._unused_last_page_len
            indptr = cupy.empty(num_requests + 1, dtype=cupy.int32)
            _launch(
                "pagetable_csr_indptr", (1, 1, 1), (1, 1, 1),
                (self._row_lengths, self.max_rows, self.max_blocks_per_seq, self._block_size,
                 rows, num_requests, int(has_token_counts), token_counts, indptr, last_page_len),
            )
            if indices_out is None:
                indices_out = cupy.empty(int(indptr[-1:].get()[0]), dtype=cupy.int32)
            else:
                indices_out = _output(cupy, indices_out, "indices_out", None, np.int32)
            grid, block = launch_shape_per_request(num_requests, self.max_blocks_per_seq)
            _launch(
                "pagetable_csr_indices", grid, block,
                self._table_arguments() + (rows, num_requests, indptr,
                                           indices_out.size, indices_out),
            )
        return indptr, indices_out, (last_page_len if has_token_counts else None)


def _check_same_length(rows, positions) -> None:
    if rows.size != positions.size:
        raise ValueError(
            f"rows and positions must have the same length, got {rows.size} and {positions.size}"
        )


def _output(cupy, out: Any, argument: str, length: int | None, dtype):
    """A checked preallocated output, or a new one of ``length`` entries."""
    if out is None:
        return cupy.empty(length, dtype=dtype)
    # Wrapped, never converted: the kernel must write into the caller's memory.
    if isinstance(out, cupy.ndarray):
        pass
    elif hasattr(out, "__dlpack__") and not isinstance(out, np.ndarray):
        out = cupy.from_dlpack(out)
    elif hasattr(out, "__cuda_array_interface__"):
        out = cupy.asarray(out)
    else:
        raise TypeError(f"{argument} must be a device array, got {type(out).__name__}")
    if out.ndim != 1 or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"{argument} must be a 1-D C-contiguous {np.dtype(dtype)} array, got "
            f"{out.dtype} with shape {out.shape}"
        )
    if length is not None and out.size != length:
        raise ValueError(f"{argument} must have {length} entries, got {out.size}")
    return out
