"""The answer of ``can_admit``: whether a prompt fits now, and whether it ever could.

Pure Python, shared by :class:`pagetable.KVCacheManager` and the reference model, so
that both return the same type (``docs/HYBRID.md``, "Batched admission").
"""

from __future__ import annotations

from typing import NamedTuple


class Admission(NamedTuple):
    """What admitting one prompt would take.

    Attributes
    ----------
    fits_now : bool
        ``need <= available - ceil(watermark * num_blocks)``: an ``add_sequence`` of
        the prompt now would succeed with that many blocks kept back.
    could_ever_fit : bool
        ``ceil(n / block_size) <= num_blocks - ceil(watermark * num_blocks)``: it fits
        an empty pool without hits, so waiting (or preempting) can make it fit.
    need : int
        Fresh blocks the prompt takes after its prefix hits now.
    """

    fits_now: bool
    could_ever_fit: bool
    need: int
