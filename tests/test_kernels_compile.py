"""The kernel source compiles for every GPU toolchain CI can reach, with no warnings.

* hiprtc, through ctypes, exactly as CuPy compiles a RawModule on ROCm (no includes added),
  one process per target (Debian's hiprtc 5.2 crashes on a second program in a process);
* Debian's hipcc for AMD targets, hip_runtime.h force-included, warnings as errors;
* nvcc to PTX, warnings as errors.

Each check skips, with the reason, where its tool is not installed
(``apt-get install -y hipcc`` brings hipcc and hiprtc; ``.ci/compile_kernels.sh`` does all
of this from the shell, installing hipcc when missing).
"""

import ctypes.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from pagetable import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIPRTC_SCRIPT = os.path.join(ROOT, ".ci", "hiprtc_compile.py")
SOURCE = str(gpu.KERNEL_SOURCE_PATH)
KERNEL_NAMES = sorted(gpu.kernel_signatures())


def _has_hiprtc():
    for name in ("libamdhip64.so", "libamdhip64.so.5", "libamdhip64.so.6"):
        try:
            if hasattr(ctypes.CDLL(name), "hiprtcCreateProgram"):
                return True
        except OSError:
            continue
    return ctypes.util.find_library("amdhip64") is not None


def test_source_uses_only_the_portable_subset():
    source = gpu.kernel_source()
    code = re.sub(r"//[^\n]*", "", source)
    assert "#include" not in code, "hiprtc gets no include paths: the source must include nothing"
    for forbidden in ("__shfl", "__ballot", "__syncwarp", "warpSize", "__shared__",
                      "__syncthreads", "__launch_bounds__", "size_t", "long int", "unsigned long"):
        assert forbidden not in code, f"{forbidden} is outside the hiprtc/NVRTC portable subset"
    assert len(KERNEL_NAMES) >= 7


@pytest.mark.parametrize("target", ["gfx908", "gfx90a", "gfx1030"])
def test_hiprtc_compiles(target):
    if not _has_hiprtc():
        pytest.skip("hiprtc (libamdhip64) not installed: apt-get install -y hipcc")
    result = subprocess.run([sys.executable, HIPRTC_SCRIPT, SOURCE, target],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["gfx908", "gfx90a", "gfx940", "gfx1030"])
def test_hipcc_compiles(target, tmp_path):
    hipcc = shutil.which("hipcc")
    if hipcc is None:
        pytest.skip("hipcc not installed: apt-get install -y hipcc")
    environment = dict(os.environ, HIP_PLATFORM="amd")
    command = [hipcc, f"--offload-arch={target}", "-include", "hip/hip_runtime.h",
               "-Werror", "-Wall", "-c", "-x", "hip", SOURCE, "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()


def test_nvcc_compiles_to_ptx(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    ptx = tmp_path / "kernels.ptx"
    result = subprocess.run([nvcc, "-ptx", "-Werror", "all-warnings", SOURCE, "-o", str(ptx)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    assert entries == set(KERNEL_NAMES), "every kernel keeps its unmangled extern \"C\" name"


def test_hiprtc_check_fails_on_a_warning(tmp_path):
    """The hiprtc check is only worth having if a warning in the log fails it."""
    if not _has_hiprtc():
        pytest.skip("hiprtc (libamdhip64) not installed: apt-get install -y hipcc")
    source = tmp_path / "warns.cu"
    source.write_text(
        '__device__ int maybe(int a) { if (a) return 1; }\n'
        'extern "C" __global__ void k(int* x) { x[0] = maybe(x[1]); }\n'
    )
    result = subprocess.run([sys.executable, HIPRTC_SCRIPT, str(source), "gfx90a"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "warning" in result.stdout


# ROCm 7's hiprtc mode (``.ci/rtc7_compile.py``): Debian's clang-19 with ROCm 7.2's
# hiprtc_runtime.h, for the GPUs Debian's ROCm 5.2 does not know.  The header comes from
# PyPI (``bash .ci/fetch_hiprtc_runtime.sh PATH``); these run where PAGETABLE_HIPRTC_RUNTIME_H
# names it and clang-19 is installed.  ``.ci/compile_kernels.sh`` runs them in CI.
RTC7_SCRIPT = os.path.join(ROOT, ".ci", "rtc7_compile.py")


def _load_rtc7():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rtc7_compile", RTC7_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rtc7_check_reads_every_declared_kernel():
    """The symbol check expects exactly the kernels the launcher knows of."""
    rtc7 = _load_rtc7()
    assert rtc7.declared_kernels(gpu.kernel_source()) == KERNEL_NAMES
    assert rtc7.declared_kernels('// extern "C" __global__ void gone(int* x) {}\n'
                                 '/* extern "C" __global__ void gone2(int* x) {} */\n'
                                 'extern "C"  __global__ void kept (int* x) {}\n') == ["kept"]
    assert rtc7.expected_wavefront_size("gfx942") == 64
    assert rtc7.expected_wavefront_size("gfx90a") == 64
    assert rtc7.expected_wavefront_size("gfx1100") == 32
    assert rtc7.expected_wavefront_size("gfx1201") == 32


def _rtc7_header():
    header = os.environ.get("PAGETABLE_HIPRTC_RUNTIME_H")
    if not header or not os.path.isfile(header):
        pytest.skip("set PAGETABLE_HIPRTC_RUNTIME_H (bash .ci/fetch_hiprtc_runtime.sh PATH)")
    if shutil.which("clang-19") is None:
        pytest.skip("clang-19 not installed: apt-get install -y clang-19 lld-19 llvm-19 "
                    "rocm-device-libs")
    return header


@pytest.mark.parametrize("target", ["gfx942", "gfx90a", "gfx1100", "gfx1101", "gfx1102",
                                    "gfx1200", "gfx1201"])
def test_rtc7_mode_compiles_every_kernel_without_spills(target, tmp_path):
    header = _rtc7_header()
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, RTC7_SCRIPT, SOURCE, target, "--header", header,
                             "--json", str(figures)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    import json
    kernels = json.loads(figures.read_text())["kernels"]
    assert sorted(kernels) == KERNEL_NAMES
    wave = 64 if target in ("gfx942", "gfx90a") else 32
    for name, row in kernels.items():
        assert row["wavefront_size"] == wave, name
        assert row["private_segment_fixed_size"] == 0, name
        assert row["vgpr_spill_count"] == row["sgpr_spill_count"] == 0, name


@pytest.mark.parametrize("body", [
    '__device__ int maybe(int a) { if (a) return 1; }\n'
    'extern "C" __global__ void k(int* x) { x[0] = maybe(x[1]); }\n',
    'extern "C" __global__ void k(int* x) { x[0] = 1; }\n#ifndef __HIPCC_RTC__\n'
    'extern "C" __global__ void k_dropped(int* x) { x[0] = 2; }\n#endif\n',
    'extern "C" __global__ void k(int* x) { int a[64]; for (int i = 0; i < 64; ++i) '
    'a[i] = x[i]; x[0] = a[x[64] & 63]; }\n',
], ids=["warning", "missing_kernel", "scratch"])
def test_rtc7_check_fails_on_a_broken_source(body, tmp_path):
    header = _rtc7_header()
    source = tmp_path / "broken.cu"
    source.write_text(body)
    result = subprocess.run([sys.executable, RTC7_SCRIPT, str(source), "gfx942",
                             "--header", header], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
