"""Reproduce the "silently wrong" call patterns of the safety issue on one GPU, and count outcomes.

Uses only the API every a2a version has (SimulatedWorld, MoeAlltoAll, A2AError), so the same
script runs against an older checkout: the report shows silent wrong results there and none here.

    python scripts/repro_safety.py [--runs 6]

Cases (N ranks simulated on one GPU, one stream each):
- cross_round: 4 ranks, hidden 7168 bf16; round k with rt 4096, round k+1 with rt 16384 issued
  right after each rank's combine k; rank 1's stream has top priority (its round k+1 rows, source
  1, cover the bytes of every rank's round-k combine rows), rank 3 starts its combine late. Round
  k's combine outputs are checked against the reference.
- late_rank: 2 ranks, A2A_SIGNAL_TIMEOUT_S=1, rank 1's calls are issued 2.5 s after rank 0's.
- disagree_rt: 2 ranks, rank 1 dispatches with rt 6, rank 0 with rt 4.
An outcome is "correct" (every output matches), "raised" (an a2a error on the rank) or "SILENT"
(an output differs and the rank's synchronize() raised nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from a2a import reference  # noqa: E402


def _priority_streams(world: a2a.SimulatedWorld, priorities: list[int]) -> None:
    """Give the world's rank streams these priorities (works on any a2a version)."""
    from cuda.bindings import driver as cu

    from a2a.runtime.cuda_signals import CudaSignalStream

    for rank, priority in enumerate(priorities):
        flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value
        _, handle = cu.cuStreamCreateWithPriority(flags, priority)
        world._streams[rank] = CudaSignalStream(torch.cuda.ExternalStream(int(handle), device=world.device))


def _outcome(moe: a2a.MoeAlltoAll, matches: bool) -> str:
    try:
        moe.synchronize()
    except a2a.A2AError:
        return "raised"
    return "correct" if matches else "SILENT"


def _round_inputs(ep: int, n: int, hidden: int, top_k: int, experts: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.rand(n, experts, generator=generator).topk(top_k, dim=1).indices.to(torch.int32) for _ in range(ep)]
    xs = [torch.randn(n, hidden, generator=generator).to(torch.bfloat16) for _ in range(ep)]
    planes = [torch.randn(ep, n, hidden, generator=generator).to(torch.bfloat16) for _ in range(ep)]
    return ids, xs, planes


def cross_round(seed: int) -> list[str]:
    ep, hidden, top_k, experts, small, big = 4, 7168, 8, 64, 4096, 16384
    world = a2a.SimulatedWorld(ep, "cuda")
    _priority_streams(world, [0, -5, 0, 0])
    moes = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), big, top_k, experts, hidden_size=hidden, world=world) for r in range(ep)]
    ids, xs, planes = _round_inputs(ep, small, hidden, top_k, experts, seed)
    big_ids, big_xs, _ = _round_inputs(ep, big, hidden, top_k, experts, seed + 1)
    dev = world.device
    for r in range(ep):
        moes[r].dispatch(ids[r].to(dev), [xs[r].to(dev)], small)
    outputs = []
    for r in range(ep):
        plane = moes[r].get_combine_payload_tensor_in_workspace(small, hidden, torch.bfloat16)
        with world.stream(r).activate():
            if r == ep - 1:
                torch.cuda._sleep(200_000)  # the slow rank starts its combine ~0.1 ms late
            plane.copy_(planes[r].to(dev))
        outputs.append(moes[r].combine(plane, small, payload_in_workspace=True))
        moes[r].dispatch(big_ids[r].to(dev), [big_xs[r].to(dev)], big)  # the next round, right away
    world.synchronize()
    expected = reference.dispatch(ids, [[x] for x in xs], experts, small)
    want = reference.combine(planes, expected.routing, [small] * ep)
    results = [_outcome(moes[r], torch.equal(outputs[r].cpu(), want[r])) for r in range(ep)]
    for moe in moes:
        moe._reset_workspace()
    return results


def late_rank(seed: int) -> list[str]:
    os.environ["A2A_SIGNAL_TIMEOUT_S"] = "1"
    ep, hidden, top_k, experts, n = 2, 256, 2, 4, 8
    world = a2a.SimulatedWorld(ep, "cuda")
    moes = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), n, top_k, experts, hidden_size=hidden, world=world) for r in range(ep)]
    ids, xs, planes = _round_inputs(ep, n, hidden, top_k, experts, seed)
    dev = world.device
    outputs = []
    for r in range(ep):  # rank 0's whole round, then rank 1's, 2.5 s later
        if r == 1:
            time.sleep(2.5)
        moes[r].dispatch(ids[r].to(dev), [xs[r].to(dev)], n)
        plane = moes[r].get_combine_payload_tensor_in_workspace(n, hidden, torch.bfloat16)
        with world.stream(r).activate():
            plane.copy_(planes[r].to(dev))
        outputs.append(moes[r].combine(plane, n, payload_in_workspace=True))
    world.synchronize()
    expected = reference.dispatch(ids, [[x] for x in xs], experts, n)
    want = reference.combine(planes, expected.routing, [n] * ep)
    results = [_outcome(moes[r], torch.equal(outputs[r].cpu(), want[r])) for r in range(ep)]
    del os.environ["A2A_SIGNAL_TIMEOUT_S"]
    return results  # the world is left behind: after a timeout it is not reused


def disagree_rt(seed: int) -> list[str]:
    os.environ["A2A_SIGNAL_TIMEOUT_S"] = "2"
    ep, hidden, top_k, experts, n = 2, 64, 2, 4, 4
    world = a2a.SimulatedWorld(ep, "cuda")
    moes = [a2a.MoeAlltoAll(a2a.Mapping(ep, r), 8, top_k, experts, hidden_size=hidden, world=world) for r in range(ep)]
    ids, xs, planes = _round_inputs(ep, n, hidden, top_k, experts, seed)
    dev = world.device
    recv = [moes[r].dispatch(ids[r].to(dev), [xs[r].to(dev)], [4, 6][r]) for r in range(ep)]
    world.synchronize()
    expected = reference.dispatch(ids, [[x] for x in xs], experts, 4)
    results = []
    for r in range(ep):
        valid = expected.valid_rows(r)
        got = recv[r][0].cpu()[:, :4]
        results.append(_outcome(moes[r], torch.equal(got[valid], expected.recv_payloads[r][0][valid])))
    del os.environ["A2A_SIGNAL_TIMEOUT_S"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--cases", default="cross_round,late_rank,disagree_rt")
    args = parser.parse_args()
    silent = 0
    for name in args.cases.split(","):
        case = globals()[name]
        for run in range(args.runs if name == "cross_round" else 1):
            try:
                outcome = case(run)
            except a2a.A2AError as error:
                outcome = [f"raised at the call: {type(error).__name__}"]
            silent += sum(o == "SILENT" for o in outcome)
            print(f"{name} run {run}: {outcome}", flush=True)
    print(f"silent wrong results: {silent}")
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
