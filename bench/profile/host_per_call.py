"""Host time of one functional call on the current stream, the path engines take (one rank's
`moe_a2a_dispatch` / `moe_a2a_combine` with its stream current, every plan built): medians over
ROUNDS rounds of 8 simulated ranks, DeepSeek bf16. Uses only the functional API and bench.harness's
Round, so the same file measures an older tree too (run it with that tree first on PYTHONPATH):

    python -m bench.profile.host_per_call [tokens ...]
    (cd .base && PYTHONPATH=$PWD python ../bench/profile/host_per_call.py 16 128)

The GPU is kept ahead of the host (a long sleep queued first) so no call waits for the device.
"""

import statistics
import sys
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from bench.harness import Round  # noqa: E402

ROUNDS = 200
SLEEP_CYCLES = 50_000_000  # ~25 ms: longer than a batch of rounds' host time


def functional_round(round_: Round, planes: list | None = None, dispatch=None,
                     combine=None) -> tuple[list[float], list[float]]:  # fmt: skip
    """One round through the functional ops, each rank's call on its own stream (made current
    first, so it is not counted): host us of every rank's dispatch, then of every rank's combine.
    With `planes` (each rank's combine plane) the combine takes its payload in the workspace;
    `dispatch` / `combine` stand in for the ops (same arguments; bench/profile/host_steps.py)."""
    dispatch = dispatch or a2a.moe_a2a_dispatch
    combine = combine or a2a.moe_a2a_combine
    world, ep, tokens = round_.world, round_.world.ep_size, round_.tokens
    dispatch_us, combine_us, offsets = [], [], []
    for r, moe in enumerate(round_.ranks):
        with world.stream(r).activate():
            begin = time.perf_counter()
            _, offset, *_ = dispatch(round_.experts[r], round_.payloads[r], moe.workspace, moe.metainfo, tokens, r, ep,
                                     moe.top_k, moe.num_experts)  # fmt: skip
            dispatch_us.append((time.perf_counter() - begin) * 1e6)
        offsets.append(offset)
    for r, moe in enumerate(round_.ranks):
        with world.stream(r).activate():
            begin = time.perf_counter()
            if planes is None:
                combine(round_.expert_outputs[r], tokens, moe.workspace, moe.metainfo, tokens, r, ep, moe.top_k,
                        offsets[r])  # fmt: skip
            else:
                combine(planes[r], tokens, moe.workspace, moe.metainfo, tokens, r, ep, moe.top_k, offsets[r],
                        payload_in_workspace=True)  # fmt: skip
            combine_us.append((time.perf_counter() - begin) * 1e6)
    return dispatch_us, combine_us


def checked_round(tokens: int) -> Round:
    """The measured round: 8 simulated ranks on the GPU, DeepSeek bf16, checked against the reference once."""
    round_ = Round.build(a2a.SimulatedWorld(8, "cuda"), tokens, "deepseek", "bf16")
    round_.check()
    return round_


def keep_the_gpu_ahead(world: a2a.SimulatedWorld, i: int) -> None:
    """Before round i: every 20 rounds, let the GPU catch up, then queue a long sleep on every rank
    stream, so no call of the next rounds waits for the device."""
    if i % 20 == 0:
        world.synchronize()
        for r in range(world.ep_size):
            with world.stream(r).activate():
                torch.cuda._sleep(SLEEP_CYCLES)


WARM_UP_ROUNDS = 10


def measure(tokens: int) -> tuple[float, float]:
    round_ = checked_round(tokens)
    world = round_.world
    dispatch_us, combine_us = [], []
    for i in range(ROUNDS + WARM_UP_ROUNDS):
        keep_the_gpu_ahead(world, i)
        dispatch, combine = functional_round(round_)
        if i >= WARM_UP_ROUNDS:
            dispatch_us += dispatch
            combine_us += combine
    world.synchronize()
    return statistics.median(dispatch_us), statistics.median(combine_us)


def main() -> None:
    for tokens in [int(t) for t in sys.argv[1:]] or [16, 128]:
        dispatch, combine = measure(tokens)
        print(f"host per functional call, {tokens} tokens: dispatch {dispatch:.1f} us, combine {combine:.1f} us "
              f"(medians of {ROUNDS * 8})", flush=True)


if __name__ == "__main__":
    main()
