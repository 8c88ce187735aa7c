"""Compile a kernel source the way ROCm 7's hiprtc does, for one AMD target, and check it.

hiprtc (what CuPy calls on ROCm) prepends its runtime header ``hiprtc_runtime.h``, defines
``__HIPCC_RTC__``, adds no include paths and links the device libraries.  Debian's clang 19
reproduces that compile for targets Debian's ROCm 5.2 does not know (gfx942, gfx1100,
gfx1201) when given ROCm 7.2's ``hiprtc_runtime.h``::

    clang-19 -x hip --cuda-device-only --no-gpu-bundle-output -nogpulib -nogpuinc \\
        -D__HIPCC_RTC__ -include hiprtc_runtime.h --offload-arch=TARGET -O3 \\
        -Werror -Wall -Wextra \\
        -Xclang -mlink-builtin-bitcode -Xclang .../amdgcn/bitcode/ockl.bc \\
        -Xclang -mlink-builtin-bitcode -Xclang .../amdgcn/bitcode/oclc_abi_version_500.bc \\
        SOURCE -o kernels_TARGET.co

The result is a linked code object (an ELF shared object for ``amdgcn-amd-amdhsa``).  This
script then fails when:

* the compiler printed any diagnostic (warnings are errors), or produced nothing;
* the code object's dynamic symbols lack a kernel (``NAME`` and its descriptor
  ``NAME.kd``) for any ``extern "C" __global__`` function the source declares, read with
  ``llvm-readelf --dyn-symbols``;
* the code object's AMDGPU metadata (``llvm-readelf --notes``) reports, for any kernel,
  register spills, scratch (private segment) use, a dynamic stack, or a wavefront size
  other than the target's (64 on CDNA, 32 on RDNA), or lacks a kernel's entry.

It prints one line per kernel: SGPRs, VGPRs, AGPRs, spills, scratch bytes, LDS bytes,
wavefront size.  ``--json PATH`` writes the same figures.

Usage: ``python .ci/rtc7_compile.py SOURCE TARGET --header hiprtc_runtime.h
[--clang clang-19] [--readelf llvm-readelf-19] [--bitcode-dir DIR] [--json PATH]
[--keep PATH]``.  Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

BITCODE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode",   # Debian's rocm-device-libs
    "/usr/lib/llvm-19/lib/clang/19/lib/amdgcn/bitcode",
    "/opt/rocm/amdgcn/bitcode",
)
BITCODE_FILES = ("ockl.bc", "oclc_abi_version_500.bc")

# Targets whose only wavefront size is 32 (RDNA: gfx10xx, gfx11xx, gfx12xx, compiled in
# their default wave32 mode); CDNA and GCN run 64-wide wavefronts.
def expected_wavefront_size(target):
    return 32 if re.match(r"gfx1[0-9]{3}", target) else 64


def declared_kernels(source):
    """The names of the ``extern "C" __global__`` functions ``source`` declares."""
    code = re.sub(r"/\*.*?\*/", " ", source, flags=re.DOTALL)
    code = re.sub(r"//[^\n]*", " ", code)
    return sorted(set(re.findall(
        r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_]\w*)\s*\(', code)))


def find_tool(explicit, names):
    for name in ([explicit] if explicit else []) + list(names):
        path = shutil.which(name) or (name if os.path.isfile(name) else None)
        if path:
            return path
    return None


def find_bitcode_dir(explicit):
    for directory in ([explicit] if explicit else []) + list(BITCODE_DIRS):
        if all(os.path.isfile(os.path.join(directory, f)) for f in BITCODE_FILES):
            return directory
    return None


def compile_command(clang, header, bitcode_dir, target, source, output):
    command = [clang, "-x", "hip", "--cuda-device-only", "--no-gpu-bundle-output",
               "-nogpulib", "-nogpuinc", "-D__HIPCC_RTC__", "-include", header,
               f"--offload-arch={target}", "-O3", "-Werror", "-Wall", "-Wextra"]
    for name in BITCODE_FILES:
        command += ["-Xclang", "-mlink-builtin-bitcode",
                    "-Xclang", os.path.join(bitcode_dir, name)]
    return command + [source, "-o", output]


def dynamic_symbols(readelf, code_object):
    out = subprocess.run([readelf, "--wide", "--dyn-symbols", code_object],
                         capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0].endswith(":") and fields[3] in ("FUNC", "OBJECT"):
            symbols[fields[7]] = fields[3]
    return symbols


def kernel_metadata(readelf, code_object):
    """Per-kernel metadata from the code object's NT_AMDGPU_METADATA note (YAML text)."""
    out = subprocess.run([readelf, "--notes", code_object],
                         capture_output=True, text=True, check=True).stdout
    kernels, current = {}, None
    for line in out.splitlines():
        item = re.match(r"\s*(-\s+)?\.([a-z_]+):\s*(.*?)\s*$", line)
        if not item:
            continue
        starts, key, value = item.group(1), item.group(2), item.group(3)
        indent = len(line) - len(line.lstrip())
        if starts and indent <= 4:   # a new entry of amdhsa.kernels
            current = {}
            kernels.setdefault(id(current), current)
        if current is None or indent > 6 or not value:
            continue   # nested (argument lists) or the list head itself
        current[key] = value
    by_name = {}
    for entry in kernels.values():
        if "name" in entry:
            by_name[entry["name"]] = entry
    return by_name


FIGURES = ("sgpr_count", "vgpr_count", "agpr_count", "sgpr_spill_count", "vgpr_spill_count",
           "private_segment_fixed_size", "group_segment_fixed_size", "wavefront_size")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--header", required=True, help="ROCm 7's hiprtc_runtime.h")
    parser.add_argument("--clang")
    parser.add_argument("--readelf")
    parser.add_argument("--bitcode-dir")
    parser.add_argument("--json")
    parser.add_argument("--keep", help="keep the code object at this path")
    args = parser.parse_args(argv)
    label = f"hiprtc-7 mode {args.target}"

    clang = find_tool(args.clang, ("clang-19", "/usr/lib/llvm-19/bin/clang"))
    readelf = find_tool(args.readelf, ("llvm-readelf-19", "/usr/lib/llvm-19/bin/llvm-readelf"))
    bitcode_dir = find_bitcode_dir(args.bitcode_dir)
    missing = [what for what, found in (("clang-19", clang), ("llvm-readelf-19", readelf),
                                        ("rocm-device-libs bitcode", bitcode_dir),
                                        ("hiprtc_runtime.h", os.path.isfile(args.header)))
               if not found]
    if missing:
        print(f"{label}: FAILED, missing {', '.join(missing)}")
        return 1
    with open(args.source) as f:
        expected = declared_kernels(f.read())
    if not expected:
        print(f"{label}: FAILED, the source declares no extern \"C\" __global__ kernel")
        return 1

    with tempfile.TemporaryDirectory() as work:
        code_object = args.keep or os.path.join(work, f"kernels_{args.target}.co")
        command = compile_command(clang, os.path.abspath(args.header), bitcode_dir,
                                  args.target, args.source, code_object)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        log = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or log or not os.path.isfile(code_object) \
                or os.path.getsize(code_object) == 0:
            print(f"{label}: FAILED (rc {result.returncode})\n{' '.join(command)}\n{log}")
            return 1
        size = os.path.getsize(code_object)
        symbols = dynamic_symbols(readelf, code_object)
        metadata = kernel_metadata(readelf, code_object)

    problems = []
    for name in expected:
        if symbols.get(name) != "FUNC" or symbols.get(name + ".kd") != "OBJECT":
            problems.append(f"{name}: not in the code object's symbols (kernel or .kd)")
        elif name not in metadata:
            problems.append(f"{name}: no entry in the code object's metadata")
    wave = expected_wavefront_size(args.target)
    rows = {}
    for name in expected:
        entry = metadata.get(name)
        if entry is None:
            continue
        try:
            figures = {key: int(entry.get(key, "0")) for key in FIGURES}
        except ValueError as error:
            problems.append(f"{name}: unreadable metadata ({error})")
            continue
        rows[name] = figures
        if figures["sgpr_spill_count"] or figures["vgpr_spill_count"]:
            problems.append(f"{name}: spills registers")
        if figures["private_segment_fixed_size"]:
            problems.append(f"{name}: uses {figures['private_segment_fixed_size']} bytes of scratch")
        if entry.get("uses_dynamic_stack", "false") != "false":
            problems.append(f"{name}: uses a dynamic stack")
        if figures["wavefront_size"] != wave:
            problems.append(f"{name}: wavefront size {figures['wavefront_size']}, expected {wave}")

    print(f"{label}: code object {size} bytes, {len(rows)}/{len(expected)} kernels")
    print(f"  {'kernel':36s} sgpr vgpr agpr spill scratch lds wave")
    for name, f in rows.items():
        print(f"  {name:36s} {f['sgpr_count']:4d} {f['vgpr_count']:4d} {f['agpr_count']:4d} "
              f"{f['sgpr_spill_count'] + f['vgpr_spill_count']:5d} "
              f"{f['private_segment_fixed_size']:7d} {f['group_segment_fixed_size']:3d} "
              f"{f['wavefront_size']:4d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": args.target, "code_object_bytes": size, "kernels": rows},
                      f, indent=1)
    if problems:
        print(f"{label}: FAILED\n  " + "\n  ".join(problems))
        return 1
    print(f"{label}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
