"""The reference of :class:`pagetable.HybridKVCacheManager`: the same coordinator over
reference managers.

The coordinator itself makes no decision a group's manager does not make (it plans
every group, refuses if any group is short, then commits each), so its reference is
the coordinator unchanged, with :class:`ReferenceKVCacheManager` in every group.
"""

from __future__ import annotations

from typing import Any, Sequence

from pagetable.hybrid import HybridKVCacheManager, KVCacheGroupSpec
from pagetable.reference.manager import ReferenceKVCacheManager


class ReferenceHybridKVCacheManager(HybridKVCacheManager):
    """:class:`pagetable.HybridKVCacheManager` with a
    :class:`ReferenceKVCacheManager` per group; same arguments, ``manager_class``
    aside."""

    def __init__(self, groups: Sequence[KVCacheGroupSpec], **options: Any) -> None:
        if "manager_class" in options:
            raise TypeError("ReferenceHybridKVCacheManager always uses ReferenceKVCacheManager; "
                            "pass manager_class to HybridKVCacheManager instead")
        super().__init__(groups, manager_class=ReferenceKVCacheManager, **options)
