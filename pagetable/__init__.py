"""pagetable: the page table of a paged KV cache.

PagedAttention keeps each sequence's keys and values in fixed-size physical blocks.
:class:`PageTable` maps a sequence's logical token positions to (physical block,
offset) and turns a batch into what attention kernels consume: a slot mapping, a
dense block table, or a CSR page list.  :class:`BlockAllocator` and
:class:`KVCacheManager` hand out blocks, share them between forked sequences and
copy on write.  ``PAD_SLOT_ID`` (-1) marks every unmapped entry.  Each of the three
saves to and loads from one validated file format (``save`` / ``load``, and
:func:`load` for a file of any kind); a bad file raises :class:`CorruptStateError`.

The GPU path lives in :mod:`pagetable.gpu` and needs CuPy; importing this package
never imports CuPy.
"""

from pagetable._table import MAX_BLOCK_SIZE, PAD_SLOT_ID, PageTable
from pagetable._allocator import BlockAllocator
from pagetable._results import AdmissionResult, AppendResult, OutOfBlocksError
from pagetable._manager import KVCacheManager
from pagetable._batch import BatchTable
from pagetable._state import CorruptStateError, load
from pagetable.hybrid import HybridKVCacheManager, HybridResult, KVCacheGroupSpec

from pagetable._version import __version__

__all__ = [
    "PAD_SLOT_ID",
    "MAX_BLOCK_SIZE",
    "PageTable",
    "BlockAllocator",
    "KVCacheManager",
    "BatchTable",
    "OutOfBlocksError",
    "AppendResult",
    "AdmissionResult",
    "HybridKVCacheManager",
    "KVCacheGroupSpec",
    "HybridResult",
    "CorruptStateError",
    "load",
    "__version__",
]
