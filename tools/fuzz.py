#!/usr/bin/env python3
"""Shortcut for the atheris fuzzer: ``python tools/fuzz.py [libFuzzer flags] [CORPUS...]``.

Same as ``python tests/fuzz/fuzz_atheris.py``; see docs/FUZZING.md.
"""

import pathlib
import runpy
import sys

runpy.run_path(str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "fuzz_atheris.py"),
               run_name="__main__")
