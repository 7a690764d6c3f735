"""The kernels of one replay of a whole round (8 simulated ranks), in start order, with start / end
relative to the first kernel: shows where a small round's time goes. `rank-graphs` replays one graph
per rank, gated to start together (bench.harness.RankGraphs), instead of one graph of every rank.

    python -m bench.profile.round_timeline [tokens] [rank-graphs] [route-warps=N]
"""

import sys

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from bench.harness import RankGraphs, Round, capture_graph  # noqa: E402

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 16
for arg in sys.argv[2:]:
    if arg.startswith("route-warps="):  # try another routing CTA size (a2a.ops.configs.ROUTE_NUM_WARPS)
        from a2a.ops import configs

        configs.ROUTE_NUM_WARPS = int(arg.split("=")[1])
world = a2a.SimulatedWorld(8, "cuda")
round_ = Round.build(world, tokens, "deepseek", "bf16")
round_.check()
round_.dispatch()
planes = round_.fill_planes()
round_.combine(planes)
if "rank-graphs" in sys.argv:
    rank_graphs = RankGraphs(round_, planes)
    replay = lambda: rank_graphs.time_us(1)  # noqa: E731
else:
    graph = capture_graph(lambda: (round_.dispatch(), round_.combine(planes), world.join_into_caller()))
    replay = graph.replay
for _ in range(20):
    replay()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
    for _ in range(3):
        replay()
        torch.cuda.synchronize()
events = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA and "sleep" not in e.name
          and "a2a" not in e.name and not e.name.startswith("Memset")]
events.sort(key=lambda e: e.time_range.start)
# The last replay only.
starts = [e.time_range.start for e in events]
gaps = [b - a for a, b in zip(starts, starts[1:])]
cut = max(range(len(gaps)), key=lambda i: gaps[i] if i > len(gaps) // 2 else -1) + 1 if gaps else 0
last = events[cut:]
origin = last[0].time_range.start
print(f"{len(last)} kernels in the last replay, round span {max(e.time_range.end for e in last) - origin:.1f} us")
for e in last:
    print(f"{e.time_range.start - origin:8.1f} {e.time_range.end - origin:8.1f} {e.time_range.end - e.time_range.start:7.1f}  "
          f"{e.name[:40]}")
