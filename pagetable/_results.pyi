import numpy as np
import numpy.typing as npt
from typing import final

_IntArray = npt.ArrayLike

__test__: dict[str, str]

class OutOfBlocksError(RuntimeError):
    requested: int
    available: int
    def __init__(self, requested: int, available: int) -> None: ...

@final
class AppendResult:
    @property
    def slots(self) -> npt.NDArray[np.int64]: ...
    @property
    def copy_src(self) -> npt.NDArray[np.int32]: ...
    @property
    def copy_dst(self) -> npt.NDArray[np.int32]: ...
    @property
    def num_cached_tokens(self) -> int: ...
    @property
    def lookahead_slots(self) -> npt.NDArray[np.int64]: ...
    def __init__(
        self,
        slots: _IntArray,
        copy_src: _IntArray,
        copy_dst: _IntArray,
        num_cached_tokens: int = 0,
        lookahead_slots: _IntArray | None = None,
    ) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]
    def __reduce__(self) -> tuple[object, tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int32], int]]: ...

__pyx_capi__: dict[str, object]  # C functions for cimport
