"""pagetable: the page table of a paged KV cache.

PagedAttention keeps each sequence's keys and values in fixed-size physical blocks.
:class:`PageTable` maps a sequence's logical token positions to (physical block,
offset) and turns a batch into what attention kernels consume: a slot mapping, a
dense block table, or a CSR page list.  ``PAD_SLOT_ID`` (-1) marks every unmapped
entry.
"""

from pagetable._core import MAX_BLOCK_SIZE, PAD_SLOT_ID, PageTable

__version__ = "0.1.0"

__all__ = ["PAD_SLOT_ID", "MAX_BLOCK_SIZE", "PageTable", "__version__"]
