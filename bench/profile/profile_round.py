"""Where the time goes in one DeepSeek-like round (8 simulated ranks, 4096 tokens each, bf16):
GPU time per kernel (torch.profiler) and host time per Python function of one rank's calls (cProfile).

    python -m bench.profile.profile_round [tokens]
"""

import cProfile
import pstats
import sys

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from bench.harness import Round  # noqa: E402

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
world = a2a.SimulatedWorld(8, "cuda")
round_ = Round.build(world, tokens, "deepseek", "bf16")
round_.check()
for _ in range(3):
    round_.dispatch()
    round_.combine(round_.fill_planes())
world.synchronize()

activities = [torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=activities) as profile:
    round_.dispatch()
    planes = round_.fill_planes()
    round_.combine(planes)
    round_.dispatch()
    round_.combine(None)
    world.synchronize()
print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=40))

profiler = cProfile.Profile()
profiler.enable()
for _ in range(20):
    round_.dispatch()
    round_.combine(None)
world.synchronize()
profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
