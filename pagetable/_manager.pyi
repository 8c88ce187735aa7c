from typing import Any, Sequence, final

import numpy as np
import numpy.typing as npt

from pagetable._admission import Admission
from pagetable._allocator import BlockAllocator
from pagetable.events import KVEventBatch

from pagetable.prefix import ExtraKeys, PrefixCacheStats
from pagetable._persist import Persistent
from pagetable._results import AdmissionResult, AppendResult
from pagetable._table import PageTable

_IntArray = npt.ArrayLike

__test__: dict[str, str]

@final
class KVCacheManager(Persistent):
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        enable_prefix_caching: bool = False,
        hash_algorithm: str = "sha256",
        hash_seed: str | int | None = None,
        enable_kv_cache_events: bool = False,
        event_hash_format: str = "int",
        medium: str = "GPU",
        data_parallel_rank: int | None = None,
        sliding_window: int | None = None,
        attention_chunk: int | None = None,
        group_idx: int = 0,
    ) -> None: ...
    @property
    def page_table(self) -> PageTable: ...
    @property
    def allocator(self) -> BlockAllocator: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def usage(self) -> float: ...
    def __len__(self) -> int: ...
    def __contains__(self, seq_id: object, /) -> bool: ...
    def add_sequence(
        self,
        seq_id: int,
        num_tokens: int | None = None,
        token_ids: _IntArray | None = None,
        extra_keys: ExtraKeys | None = None,
    ) -> AppendResult: ...
    def add_sequences(
        self,
        seq_ids: _IntArray,
        num_tokens: _IntArray | None = None,
        token_ids: Sequence[_IntArray] | None = None,
        extra_keys: Sequence[ExtraKeys | None] | None = None,
    ) -> AdmissionResult: ...
    def can_admit(
        self,
        num_tokens: int | None = None,
        token_ids: _IntArray | None = None,
        extra_keys: ExtraKeys | None = None,
        watermark: float = 0.0,
    ) -> Admission: ...
    def reset(self) -> None: ...
    def truncate(self, seq_ids: int | _IntArray, num_tokens: int | _IntArray) -> None: ...
    def rollback(self, seq_ids: int | _IntArray, num_rejected: int | _IntArray) -> None: ...
    def _hit_mask(self, token_ids: _IntArray, extra_keys: ExtraKeys | None = None) -> npt.NDArray[np.bool_]: ...
    def _admission_plan(
        self,
        seq_ids: _IntArray,
        num_tokens: _IntArray | None = None,
        token_ids: Sequence[_IntArray] | None = None,
        extra_keys: Sequence[ExtraKeys | None] | None = None,
        hit_blocks: _IntArray | None = None,
    ) -> Any: ...
    def _admit(self, plan: Any) -> list[AppendResult]: ...
    def _append_plan(
        self,
        seq_ids: _IntArray,
        num_new_tokens: int | _IntArray = 1,
        token_ids: _IntArray | None = None,
        num_lookahead: int = 0,
        like: Any = None,
    ) -> Any: ...
    def _append(self, plan: Any) -> AppendResult: ...
    def _truncate_check(self, seq_ids: int | _IntArray, num_tokens: int | _IntArray) -> None: ...
    def count_cached_tokens(self, token_ids: _IntArray, extra_keys: ExtraKeys | None = None) -> int: ...
    def reset_prefix_cache(self) -> int: ...
    def take_events(self) -> KVEventBatch: ...
    def _block_hash(self, block: int) -> bytes | None: ...
    @property
    def prefix_caching(self) -> bool: ...
    @property
    def hash_algorithm(self) -> str | None: ...
    @property
    def none_hash(self) -> bytes | None: ...
    @property
    def num_cached_blocks(self) -> int: ...
    @property
    def prefix_cache_stats(self) -> PrefixCacheStats: ...
    def append_tokens(
        self,
        seq_ids: _IntArray,
        num_new_tokens: int | _IntArray = 1,
        token_ids: _IntArray | None = None,
        num_lookahead: int = 0,
    ) -> AppendResult: ...
    def can_append(
        self, seq_ids: _IntArray, num_new_tokens: int | _IntArray = 1, num_lookahead: int = 0
    ) -> bool: ...
    def fork(self, parent_id: int, child_id: int) -> None: ...
    def free_sequence(self, seq_ids: int | _IntArray) -> None: ...
    def seq_lens(self, seq_ids: _IntArray) -> npt.NDArray[np.int32]: ...
    def block_table(self, seq_ids: _IntArray, kernel_block_size: int | None = None) -> npt.NDArray[np.int32]: ...
    def flashinfer_layout(
        self, seq_ids: _IntArray, kernel_block_size: int | None = None
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
    def slot_mapping(
        self,
        seq_ids: _IntArray,
        num_tokens: int | _IntArray = 1,
        *,
        dcp_world_size: int = 1,
        dcp_rank: int = 0,
        interleave: int = 1,
        kernel_block_size: int | None = None,
    ) -> npt.NDArray[np.int64]: ...
    def check(self) -> None: ...
    def _state(self) -> dict[str, np.ndarray]: ...
    @staticmethod
    def _from_state(state: object) -> KVCacheManager: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]
