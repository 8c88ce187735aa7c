#!/usr/bin/env python3
"""Coverage-guided fuzzing of pagetable with atheris (libFuzzer).

    python tests/fuzz/fuzz_atheris.py [libFuzzer flags] [CORPUS_DIR ...]
    python tests/fuzz/fuzz_atheris.py -atheris_runs=20000 tests/fuzz/corpus
    python tests/fuzz/fuzz_atheris.py -max_total_time=3600 -timeout=30 corpus/ tests/fuzz/corpus
    python tests/fuzz/fuzz_atheris.py crash-0123abcd          # replay one input

Every call the harness makes is checked against the reference models; a divergence
raises AssertionError, which libFuzzer reports as a crash and saves as ``crash-*``.
See docs/FUZZING.md.
"""

import importlib.util
import pathlib
import sys

import atheris

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("pagetable") is None:
    # Not installed: use the checkout (built in place with setup.py build_ext --inplace).
    sys.path.insert(0, str(HERE.parent.parent))

with atheris.instrument_imports(include=["harness", "pagetable"]):
    import harness


def main():
    atheris.Setup(sys.argv, harness.run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
