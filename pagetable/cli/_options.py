"""Option types shared by the subcommands: each refuses a bad value while parsing.

An ``argparse`` ``type=`` function that raises ``argparse.ArgumentTypeError`` makes the
parser print ``usage`` and one ``error:`` line and exit with status 2, before any work
starts.  Every numeric option goes through one of these, so ``nan``, ``inf``, negative,
zero and absurdly large values never reach the code that would allocate or loop on them.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (inclusive; no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low:,}" if high is None else f"in {low:,}..{high:,}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = "integer"   # what argparse names in "invalid integer value"
    return parse


def positive_real(high: float) -> Callable[[str], float]:
    """A finite real number in ``(0, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number in (0, {high:g}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


#: A numpy seed: any non-negative integer (``default_rng`` refuses negative ones).
seed = integer(0)


def output_file(text: str) -> str:
    """A file the run can write at its end: refused now, not after minutes of work.

    The file itself is not created (a run that fails should leave nothing behind); its
    folder must exist and be writable, and an existing file must be writable.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no folder {folder}")
    if os.path.exists(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} is not writable")
    return text


def matplotlib_missing() -> str | None:
    """Why ``--plot`` cannot work here, or None when matplotlib imports."""
    try:
        import matplotlib  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'pagetable[plot]' (or pip install matplotlib)"
    return None
