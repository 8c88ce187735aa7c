from typing import final

@final
class PrefixCache:
    """A KVCacheManager's prefix cache (its interface is C only; see the manager)."""
    def _arrays(self) -> tuple[object, object, object, object]: ...
    def _block_extra(self, block: int) -> object: ...
    def _lookup(self, digest: bytes) -> int: ...

C_XXHASH_COMPILED: bool

__test__: dict[str, str]
__pyx_capi__: dict[str, object]  # C functions for cimport
