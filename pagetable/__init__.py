"""pagetable: the page table of a paged KV cache."""
