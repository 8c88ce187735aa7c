"""Compile a kernel source through hiprtc, the way CuPy does on ROCm, for one GPU target.

Loads ``libamdhip64`` with ctypes (Debian's ``libamdhip64-5``, pulled in by
``apt-get install hipcc``, exports the hiprtc entry points) and compiles the source with
``--gpu-architecture=<target>`` and no headers or include paths added: exactly the
environment a ``cupy.RawModule`` meets on ROCm.  Exits non-zero when the compile fails or
when the program log holds any error or warning, printing the log.

One target per process: Debian's hiprtc 5.2 crashes when a second program is compiled in
the same process, so the caller (``.ci/compile_kernels.sh``) starts one process per target.

Usage: ``python .ci/hiprtc_compile.py SOURCE TARGET`` (e.g. ``gfx90a``).
"""

import ctypes
import ctypes.util
import re
import sys

HIPRTC_SUCCESS = 0
LIBRARY_NAMES = ("libamdhip64.so", "libamdhip64.so.5", "libamdhip64.so.6", "libhiprtc.so")


def load_hiprtc():
    """Return the first library that exports ``hiprtcCreateProgram``, or exit with a reason."""
    candidates = list(LIBRARY_NAMES)
    found = ctypes.util.find_library("amdhip64")
    if found:
        candidates.insert(0, found)
    for name in candidates:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(library, "hiprtcCreateProgram"):
            return library
    sys.exit("hiprtc not found: install Debian's hipcc (it pulls in libamdhip64-5)")


def check(library, result, what):
    if result != HIPRTC_SUCCESS:
        library.hiprtcGetErrorString.restype = ctypes.c_char_p
        message = library.hiprtcGetErrorString(result)
        raise RuntimeError(f"{what} failed: {message.decode() if message else result}")


def compile_source(source_path, target):
    """Compile ``source_path`` for ``target``; return (succeeded, program log, code size)."""
    library = load_hiprtc()
    with open(source_path, "rb") as f:
        source = f.read()
    program = ctypes.c_void_p()
    check(
        library,
        library.hiprtcCreateProgram(
            ctypes.byref(program), ctypes.c_char_p(source),
            ctypes.c_char_p(source_path.encode()), 0, None, None,
        ),
        "hiprtcCreateProgram",
    )
    options = [f"--gpu-architecture={target}".encode()]
    option_array = (ctypes.c_char_p * len(options))(*options)
    compile_result = library.hiprtcCompileProgram(program, len(options), option_array)

    log_size = ctypes.c_size_t()
    check(library, library.hiprtcGetProgramLogSize(program, ctypes.byref(log_size)),
          "hiprtcGetProgramLogSize")
    log_buffer = ctypes.create_string_buffer(max(log_size.value, 1))
    check(library, library.hiprtcGetProgramLog(program, log_buffer), "hiprtcGetProgramLog")
    log = log_buffer.value.decode(errors="replace").strip()

    code_size = ctypes.c_size_t()
    if compile_result == HIPRTC_SUCCESS:
        check(library, library.hiprtcGetCodeSize(program, ctypes.byref(code_size)),
              "hiprtcGetCodeSize")
    library.hiprtcDestroyProgram(ctypes.byref(program))
    return compile_result == HIPRTC_SUCCESS, log, code_size.value


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    source_path, target = argv[1], argv[2]
    with open(source_path) as f:
        includes = [line for line in f if line.lstrip().startswith("#include")]
    if includes:
        # hiprtc on a ROCm machine may not find host headers; the source must need none.
        print(f"hiprtc {target}: FAILED, the kernel source must include nothing: {includes}")
        return 1
    succeeded, log, code_size = compile_source(source_path, target)
    # Any diagnostic counts: the kernels must compile cleanly, not just compile.
    diagnostics = re.search(r"\b(error|warning)\b", log, re.IGNORECASE)
    if not succeeded or diagnostics or code_size == 0:
        print(f"hiprtc {target}: FAILED (code object {code_size} bytes)\n{log}")
        return 1
    print(f"hiprtc {target}: ok, code object {code_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
