"""Where the host time of one rank's functional dispatch / combine goes on CUDA (cProfile), the path
engines take: the op on the current stream, every plan built already.

    python -m bench.profile.host_cost [tokens]
"""

import cProfile
import pstats
import sys
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from bench.harness import Round  # noqa: E402

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 128
world = a2a.SimulatedWorld(8, "cuda")
round_ = Round.build(world, tokens, "deepseek", "bf16")
round_.check()
ep = world.ep_size


def one_round() -> None:
    offsets = []
    for r, moe in enumerate(round_.ranks):
        with world.stream(r).activate():
            offsets.append(a2a.moe_a2a_dispatch(round_.experts[r], round_.payloads[r], moe.workspace, moe.metainfo,
                                                tokens, r, ep, moe.top_k, moe.num_experts)[1])  # fmt: skip
    for r, moe in enumerate(round_.ranks):
        with world.stream(r).activate():
            a2a.moe_a2a_combine(round_.expert_outputs[r], tokens, moe.workspace, moe.metainfo, tokens, r, ep,
                                moe.top_k, offsets[r])  # fmt: skip


for _ in range(5):
    one_round()
world.synchronize()
for label, call in (
    ("torch.cuda.current_device", torch.cuda.current_device),
    ("raw current stream", lambda: torch._C._cuda_getCurrentRawStream(0)),
    ("envs.signal_timeout_s", envs.signal_timeout_s),
):
    begin = time.perf_counter()
    for _ in range(1000):
        call()
    print(f"{label}: {(time.perf_counter() - begin) * 1e3:.2f} us per call")
profiler = cProfile.Profile()
profiler.enable()
for _ in range(50):
    one_round()
world.synchronize()
profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
