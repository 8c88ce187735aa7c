from typing_extensions import disjoint_base

from pagetable._persist import Persistent

@disjoint_base
class Guarded(Persistent):
    def _set_owned(self, owned: bool) -> None: ...

__test__: dict[str, str]
