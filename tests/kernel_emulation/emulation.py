"""Builds the kernel source as C++ under grid_emulation.h and calls it through ctypes.

Used by tests/test_kernels_emulated.py (directly, and behind the fake CuPy in
fake_cupy.py).  Arguments are checked against the parameter types parsed from the source
(the same parse the CuPy launcher uses), every array is surrounded by canaries that must
survive the launch (an out-of-bounds write fails), and each launch runs twice, blocks and
threads in forward then reverse order, and must give the same result (a race fails).
"""

import ctypes
import os
import shutil
import subprocess

import numpy as np

from pagetable import gpu

EMULATION_DIR = os.path.dirname(os.path.abspath(__file__))
CANARY = np.int64(0x5A5A5A5A5A5A5A5A)
CANARY_ENTRIES = 8

_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64}


def find_compiler():
    """The C++ compiler to build the emulation with, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class EmulatedKernels:
    """Calls the emulated kernels with checked arguments, in both thread orders."""

    def __init__(self, library):
        self._library = library
        self._reverse_order = ctypes.c_int.in_dll(library, "emulation_reverse_order")
        self._launchers = {}
        for name, parameters in gpu.kernel_signatures().items():
            argument_types = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
            argument_types += [
                ctypes.c_void_p if parameter.is_pointer else _CTYPES[parameter.dtype]
                for parameter in parameters
            ]
            address = ctypes.c_void_p.in_dll(library, f"launch_{name}").value
            self._launchers[name] = ctypes.CFUNCTYPE(None, *argument_types)(address)

    def _run_once(self, name, grid, block, arguments, reverse):
        parameters = gpu.kernel_signatures()[name]
        arrays = [(p, a) for p, a in zip(parameters, arguments) if p.is_pointer]
        for index, (first, first_array) in enumerate(arrays):
            for second, second_array in arrays[index + 1:]:
                if not (first.is_const and second.is_const):
                    # A device would see one buffer; the emulation would see two copies.
                    assert not np.shares_memory(first_array, second_array), (
                        f"{name}: {first.name} and {second.name} alias the same memory"
                    )
        guarded = []
        call_arguments = []
        for parameter, argument in zip(parameters, arguments):
            if parameter.is_pointer:
                assert isinstance(argument, np.ndarray), f"{name}: {parameter.name} must be an array"
                assert argument.dtype == parameter.dtype, (
                    f"{name}: {parameter.name} is {parameter.dtype}, got {argument.dtype}"
                )
                assert argument.flags.c_contiguous
                # Canaries on both sides, so a write outside the array is caught.
                flat = argument.reshape(-1)
                canary = parameter.dtype.type(CANARY if parameter.dtype == np.int64 else 0x5A5A5A5A)
                padded = np.full(flat.size + 2 * CANARY_ENTRIES, canary, dtype=parameter.dtype)
                padded[CANARY_ENTRIES:CANARY_ENTRIES + flat.size] = flat
                guarded.append((parameter, flat, padded, canary))
                call_arguments.append(padded.ctypes.data + CANARY_ENTRIES * padded.itemsize)
            else:
                info = np.iinfo(parameter.dtype)
                assert info.min <= int(argument) <= info.max, f"{name}: {parameter.name} overflows"
                call_arguments.append(int(argument))
        self._reverse_order.value = int(reverse)
        self._launchers[name](grid[0], grid[1], block[0], *call_arguments)
        self._reverse_order.value = 0
        results = []
        for parameter, flat, padded, canary in guarded:
            assert (padded[:CANARY_ENTRIES] == canary).all(), f"{name} wrote before {parameter.name}"
            assert (padded[-CANARY_ENTRIES:] == canary).all(), f"{name} wrote past {parameter.name}"
            results.append(padded[CANARY_ENTRIES:-CANARY_ENTRIES].copy())
        return guarded, results

    def launch(self, name, grid, block, *arguments):
        """Run the kernel; its writable arrays are updated in place, as on a device."""
        assert grid[2] == 1 and block[1] == 1 and block[2] == 1
        parameters = gpu.kernel_signatures()[name]
        assert len(arguments) == len(parameters), f"{name}: wrong number of arguments"
        guarded, forward = self._run_once(name, grid, block, arguments, reverse=False)
        _, backward = self._run_once(name, grid, block, arguments, reverse=True)
        for (parameter, flat, _, _), first, second in zip(guarded, forward, backward):
            if parameter.is_const:
                assert np.array_equal(first, flat), f"{name} wrote to const {parameter.name}"
            np.testing.assert_array_equal(
                first, second, err_msg=f"{name}: {parameter.name} depends on thread order"
            )
            flat[...] = first


def build_emulated_kernels(build_dir, compiler):
    """Compile the kernel source with its launchers into ``build_dir`` and load it."""
    launcher_source = build_dir / "emulated_kernels.cpp"
    lines = [
        '#include "grid_emulation.h"',
        f'#include "{gpu.KERNEL_SOURCE_PATH}"',
    ]
    lines += [f"EMULATED_LAUNCHER({name})" for name in gpu.kernel_signatures()]
    launcher_source.write_text("\n".join(lines) + "\n")
    library_path = build_dir / "emulated_kernels.so"
    command = [
        compiler, "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
        "-Wno-unused-parameter", "-I", EMULATION_DIR,
        str(launcher_source), "-o", str(library_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{' '.join(command)}\n{result.stderr}"
    return EmulatedKernels(ctypes.CDLL(str(library_path)))
