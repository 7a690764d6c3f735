"""Integer alignment: the one helper the workspace layout (a2a.layout) and the memory allocators
(symmetric and host-shared memory) share."""


def align_up(value: int, alignment: int) -> int:
    """The smallest multiple of `alignment` that is >= `value` (both non-negative, alignment > 0)."""
    return (value + alignment - 1) // alignment * alignment


# Where a workspace's planes start, and how far apart an allocator puts its segments: a 4096-byte
# boundary. Unaligned planes cost the copies 4 %: 8 simulated ranks' 1024-token DeepSeek dispatch
# on an H200 took 221.6 us with every plane 4096-byte aligned in memory, 230.8 us with the planes
# 128-byte aligned in segments 128-byte apart, 234.8 us with the segments aligned but the planes
# at 3456 mod 4096 (bench/profile/graph_ab.py, one process; bench/RESULTS.md, session 14).
SEGMENT_ALIGN = 4096
