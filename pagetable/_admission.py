"""What ``can_admit`` answers: a small named tuple, shared by the Cython manager and the reference."""

from typing import NamedTuple


class Admission(NamedTuple):
    """Whether a prompt fits: now, ever (in an empty pool), and the fresh blocks it needs now."""

    fits_now: bool
    could_ever_fit: bool
    need: int
