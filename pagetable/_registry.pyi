from typing import final

@final
class SequenceRegistry:
    """The KV-cache manager's record of its sequences (its interface is C only)."""
    def __init__(self) -> None: ...

__test__: dict[str, str]
