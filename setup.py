"""Build script: cythonizes every ``pagetable/*.pyx`` with one set of directives.

Set ``PAGETABLE_DEBUG=1`` to build with bounds and initialisation checks back on
(useful when chasing an indexing bug; slower).  OpenMP is used where the compiler
supports it and skipped silently where it does not; ``PAGETABLE_NO_OPENMP=1`` turns
it off explicitly.
"""

import os
import glob
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PAGETABLE_DEBUG", "0") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "binding": False,
}


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or empty lists when unsupported."""
    if os.environ.get("PAGETABLE_NO_OPENMP", "0") not in ("", "0"):
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        return [], []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            result = subprocess.run(
                cc.split() + ["-fopenmp", src, "-o", os.path.join(tmp, "omp_probe")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return [], []
        if result.returncode != 0:
            return [], []
    return ["-fopenmp"], ["-fopenmp"]


OMP_COMPILE, OMP_LINK = _openmp_flags()
EXTRA_COMPILE = ["-O3"] if sys.platform != "win32" else ["/O2"]
if DEBUG and sys.platform != "win32":
    EXTRA_COMPILE = ["-O1", "-g"]

extensions = []
for pyx in sorted(glob.glob(os.path.join("pagetable", "*.pyx"))):
    name = "pagetable." + os.path.splitext(os.path.basename(pyx))[0]
    extensions.append(
        Extension(
            name,
            [pyx],
            include_dirs=[np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=EXTRA_COMPILE + OMP_COMPILE,
            extra_link_args=OMP_LINK,
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
    ),
)
