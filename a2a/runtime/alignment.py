"""Integer alignment: the one helper the workspace layout (a2a.layout) and the memory allocators
(symmetric and host-shared memory) share."""


def align_up(value: int, alignment: int) -> int:
    """The smallest multiple of `alignment` that is >= `value` (both non-negative, alignment > 0)."""
    return (value + alignment - 1) // alignment * alignment
