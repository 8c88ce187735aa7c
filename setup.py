"""Build script: the compiled modules of pagetable, with one set of directives.

Set ``PAGETABLE_DEBUG=1`` to build with bounds and initialisation checks back on
(useful when chasing an indexing bug; slower).  OpenMP is used where the compiler
supports it and skipped silently where it does not; ``PAGETABLE_NO_OPENMP=1`` turns
it off explicitly.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PAGETABLE_DEBUG", "0") not in ("", "0")

# Every compiled module, in the order they depend on each other.  Each .pyx has a
# .pxd beside it declaring what other modules may cimport (see the README's layout).
MODULES = [
    "pagetable._accept",      # the acceptance layer: every argument check
    "pagetable._buffers",     # anonymous mappings and the arrays on them
    "pagetable._persist",     # save / load / copy / pickle, once for every class
    "pagetable._guard",       # the change and ownership flags a manager sets
    "pagetable._table",       # PageTable (with _idmap, _rows, _table_kernels .pxd)
    "pagetable._allocator",   # BlockAllocator
    "pagetable._results",     # AppendResult and OutOfBlocksError
    "pagetable._registry",    # the manager's record of its sequences
    "pagetable._prefix_cache",  # block hashes, the hash -> block map, events
    "pagetable._manager",     # KVCacheManager
    "pagetable._batch",       # BatchTable, the persistent dense block table
]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "binding": False,
    # Cython's automatic pickling of cdef classes restores C fields from whatever
    # tuple it is handed; every class pickles through its validated state instead.
    "auto_pickle": False,
    # Not free-threading compatible, on purpose: the thread-safety contract (a change
    # holds the GIL except while the OS maps memory; readers detect overlapping
    # changes by a stamp) relies on the GIL.  Importing a module under a
    # free-threaded interpreter therefore turns the GIL back on, with a warning.
    "freethreading_compatible": False,
}


def _compiler_accepts(flags, source="int main(void){return 0;}\n"):
    """Whether the C compiler builds and links ``source`` with ``flags``."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        try:
            result = subprocess.run(
                cc.split() + flags + [src, "-o", os.path.join(tmp, "probe")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return result.returncode == 0


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or empty lists when unsupported."""
    if os.environ.get("PAGETABLE_NO_OPENMP", "0") not in ("", "0"):
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    probe = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    if not _compiler_accepts(["-fopenmp"], probe):
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _branch_alignment_flags():
    """Keep jumps from crossing or ending on 32-byte boundaries on x86-64.

    Intel CPUs from Skylake to Cascade Lake carry a microcode fix for their "JCC
    erratum" that takes such jumps out of the decoded-instruction cache.  Where a
    hot loop's jumps land then depends on where the linker placed the function, and
    an unrelated change elsewhere in the module moved ``slot_mapping`` 35-50% up or
    down on such a machine.  Padding the branches makes speed independent of layout.
    """
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = ["-Wa,-mbranches-within-32B-boundaries"]
    return flags if _compiler_accepts(flags) else []


def _xxhash_macros():
    """Compile XXH3 in from the xxHash library's header when the system has it.

    The prefix cache then digests a block with one inlined C call instead of a call
    into the ``xxhash`` Python package (same library, same bytes; about 100 ns less
    per block).  Without the header (``apt-get install libxxhash-dev``) the build
    falls back to the package silently; ``PAGETABLE_NO_C_XXHASH=1`` forces that.
    """
    if os.environ.get("PAGETABLE_NO_C_XXHASH", "0") not in ("", "0"):
        return []
    probe = ("#define XXH_INLINE_ALL\n#include <xxhash.h>\n"
             "#if XXH_VERSION_NUMBER < 800\n#error XXH3 is stable from 0.8\n#endif\n"
             "int main(void){return XXH3_128bits(\"\", 0).low64 == 0;}\n")
    return [("PAGETABLE_HAVE_XXHASH", "1")] if _compiler_accepts([], probe) else []


OMP_COMPILE, OMP_LINK = _openmp_flags()
# -g0: no debug information in a release build (it tripled the size of each module).
EXTRA_COMPILE = ["-O3", "-g0"] + _branch_alignment_flags() if sys.platform != "win32" else ["/O2"]
if DEBUG and sys.platform != "win32":
    EXTRA_COMPILE = ["-O1", "-g"]

extensions = [
    Extension(
        name,
        [name.replace(".", os.sep) + ".pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("PAGETABLE_DEBUG_BUILD", "1" if DEBUG else "0")]
        + (_xxhash_macros() if name == "pagetable._prefix_cache" else []),
        extra_compile_args=EXTRA_COMPILE + OMP_COMPILE,
        extra_link_args=OMP_LINK,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
    ),
)
