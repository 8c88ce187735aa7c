"""Slow, obviously-correct models of the compiled classes, for tests.

Every fast path is held against these: the hypothesis state machines, the fuzzing
harness and the serving simulation run the compiled class and its model side by
side and compare every answer.  Plain Python lists and dicts; no speed at all.
"""

from pagetable.reference.batch import ReferenceBatchTable
from pagetable.reference.manager import ReferenceBlockAllocator, ReferenceKVCacheManager
from pagetable.reference.hybrid import ReferenceHybridKVCacheManager
from pagetable.reference.table import ReferencePageTable

__all__ = ["ReferencePageTable", "ReferenceBlockAllocator", "ReferenceKVCacheManager",
           "ReferenceHybridKVCacheManager", "ReferenceBatchTable"]
