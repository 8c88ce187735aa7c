"""A stand-in for the slice of CuPy that pagetable.gpu uses, backed by numpy and the
emulated kernels, so DeviceBlockTable's Python code runs in CI without a GPU.

It is deliberately strict where a real device would be: "device" arrays are a numpy
subclass that host numpy code cannot mistake for its own (``get()`` is the way back), host
to device copies must come from the pinned buffers this module hands out, and a launched
kernel goes through the checked ctypes launcher (declared types, canaries, both thread
orders).  Streams and events are ordered trivially (everything runs at once), so this
checks what the code computes, not its concurrency; tests/gpu covers that on a device.
"""

import ctypes
import time
import types

import numpy as np


class DeviceArray(np.ndarray):
    """A "device" array: numpy storage, CuPy's ``get`` / ``set`` / ``data`` surface."""

    def get(self):
        return np.array(self)

    def set(self, host):
        self[...] = host

    @property
    def data(self):
        return _DevicePointer(self)


class _DevicePointer:
    def __init__(self, array):
        self._array = array

    def copy_from_host_async(self, host_pointer, nbytes, stream=None):
        assert int(host_pointer) in _PinnedMemory.live_ranges_containing(int(host_pointer), nbytes), (
            "host to device copies must read pinned staging memory"
        )
        assert nbytes <= self._array.nbytes, "copy overruns the device buffer"
        ctypes.memmove(self._array.ctypes.data, int(host_pointer), nbytes)

    def copy_from_device_async(self, source, nbytes, stream=None):
        assert nbytes <= self._array.nbytes and nbytes <= source._array.nbytes
        ctypes.memmove(self._array.ctypes.data, source._array.ctypes.data, nbytes)


class _PinnedMemory(bytearray):
    """Pinned host memory: a buffer with a stable ``ptr``."""

    _live = []

    def __init__(self, nbytes):
        super().__init__(nbytes)
        self.ptr = ctypes.addressof((ctypes.c_char * max(nbytes, 1)).from_buffer(self))
        _PinnedMemory._live.append((self.ptr, nbytes))

    @classmethod
    def live_ranges_containing(cls, pointer, nbytes):
        return {pointer for start, size in cls._live if start <= pointer and pointer + nbytes <= start + size}


def _device(array):
    return np.asarray(array).view(DeviceArray)


def make_fake_cupy(kernels):
    """Build a module object that pagetable.gpu can use in place of ``cupy``."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = DeviceArray
    cupy.__version__ = "emulated"

    def numpy_on_the_device(name):
        # Array functions not spelled out below (arange, searchsorted, minimum...) are
        # numpy's, with array results kept on the "device".
        function = getattr(np, name)
        if not callable(function) or isinstance(function, type):
            return function  # dtypes and constants as they are

        def wrapped(*arguments, **keywords):
            result = function(*arguments, **keywords)
            return _device(result) if isinstance(result, np.ndarray) else result

        return wrapped

    cupy.__getattr__ = numpy_on_the_device
    cupy.int32 = np.int32
    cupy.int64 = np.int64
    cupy.float32 = np.float32
    cupy.full = lambda shape, value, dtype=None: _device(np.full(shape, value, dtype=dtype))
    cupy.zeros = lambda shape, dtype=None: _device(np.zeros(shape, dtype=dtype))
    # Fresh device memory holds garbage, not zeros: make reads of unwritten entries visible.
    cupy.empty = lambda shape, dtype=None: _device(
        np.full(shape, -777 if np.dtype(dtype).kind == "i" else 77, dtype=dtype)
    )

    def asarray(value, dtype=None):
        if isinstance(value, DeviceArray):
            return value if dtype is None or value.dtype == dtype else value.astype(dtype)
        return _device(np.array(value, dtype=dtype))  # a host to device copy

    cupy.asarray = asarray
    cupy.ascontiguousarray = (
        lambda array: array if array.flags.c_contiguous else _device(np.ascontiguousarray(array))
    )
    cupy.where = lambda condition, x, y: _device(np.where(condition, x, y))
    cupy.from_dlpack = lambda value: _device(np.from_dlpack(value))

    class Stream:
        current = None

        def __init__(self, null=False, non_blocking=False):
            self.non_blocking = non_blocking
            self._previous = []

        def __enter__(self):
            self._previous.append(Stream.current)
            Stream.current = self
            return self

        def __exit__(self, *exc):
            Stream.current = self._previous.pop()

        def synchronize(self):
            pass

        def wait_event(self, event):
            assert isinstance(event, Event) and event.recorded, "waiting on an unrecorded event"

    Stream.current = Stream(null=True)

    class Event:
        def __init__(self, block=False, disable_timing=False, interprocess=False):
            self.recorded = False
            self.disable_timing = disable_timing

        def record(self, stream=None):
            self.recorded = True
            self.time = time.perf_counter()

        def synchronize(self):
            assert self.recorded

    class Device:
        def __init__(self, device=None):
            self.id = device or 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def get_elapsed_time(start, end):
        assert not (start.disable_timing or end.disable_timing), "timing a disable_timing event"
        return (end.time - start.time) * 1e3

    class RawModule:
        def __init__(self, code=None, options=(), backend="nvrtc"):
            assert "#include" not in code
            self.code = code

        def get_function(self, name):
            def launch(grid, block, arguments):
                kernels.launch(name, grid, block, *arguments)

            return launch

    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(
        Stream=Stream,
        Event=Event,
        Device=Device,
        get_current_stream=lambda: Stream.current,
        alloc_pinned_memory=_PinnedMemory,
        get_elapsed_time=get_elapsed_time,
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            getDevice=lambda: 0,
            is_hip=False,
            getDeviceProperties=lambda device: {"name": b"emulated device (numpy + grid emulation)"},
        ),
    )
    return cupy
