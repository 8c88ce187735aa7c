"""The fuzz harness (tests/fuzz/harness.py), bounded, so that CI always runs it.

``test_fuzz_pseudo_random`` feeds ``run_one`` a fixed set of pseudo-random inputs (the
same ones on every run); ``test_fuzz_hypothesis`` lets hypothesis choose the bytes and
obeys the active profile (``HYPOTHESIS_PROFILE=thorough`` for many more examples).
For hours of coverage-guided fuzzing use atheris: see docs/FUZZING.md.
"""

import pathlib
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "fuzz"))

import harness  # noqa: E402

SEED_INPUTS = 800         # about 15-20 s of one core
MAX_INPUT = 512
CORPUS = pathlib.Path(__file__).resolve().parent / "fuzz" / "corpus"


def pseudo_random_inputs(count, seed=20240601):
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randbytes(rng.randrange(0, MAX_INPUT))


@pytest.mark.parametrize("chunk", range(5))
def test_fuzz_pseudo_random(chunk):
    inputs = list(pseudo_random_inputs(SEED_INPUTS))
    per_chunk = len(inputs) // 5
    for data in inputs[chunk * per_chunk:(chunk + 1) * per_chunk]:
        harness.run_one(data)


def test_fuzz_corpus():
    """The seed corpus and any regression inputs saved next to it."""
    for path in sorted(CORPUS.glob("*")):
        if path.is_file() and not path.name.startswith("."):
            harness.run_one(path.read_bytes())


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(max_size=2048))
def test_fuzz_hypothesis(data):
    harness.run_one(data)


def test_decoder_runs_past_the_end():
    """Every choice past the end of the input is 0: an empty input is a valid run."""
    harness.run_one(b"")
    harness.run_one(b"\x00")
    harness.run_one(b"\xff" * 64)
