"""Python time of one functional dispatch + combine, with every launch and host wait stubbed (CPU).

    python -m bench.profile.host_overhead [ranks] [tokens] [hidden]

A machine without a GPU still shows what the host path costs in Python: one real round builds the
plans (kernels run under the interpreter), then `BoundLaunch.__call__` and the launchers'
`run_steps` become no-ops and rank 0's functional calls are timed (medians of 2000). It leaves
out the CUDA launch calls themselves: compare trees with it, and measure on the GPU with
`bench/profile/host_cost.py`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import a2a
import a2a.ops.combine as combine_module
import a2a.ops.dispatch as dispatch_module
import a2a.ops.launch as launch_module


def main() -> None:
    ep, tokens, hidden = (int(v) for v in (sys.argv[1:] + ["8", "32", "1024"][len(sys.argv) - 1:])[:3])
    top_k, experts = 8, 8 * ep
    world = a2a.SimulatedWorld(ep, "cpu")
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, [2 * hidden, 4 * top_k, 4 * top_k], 2 * hidden)
    workspace = torch.zeros(ep, size, dtype=torch.uint8)
    metainfo = [a2a.moe_a2a_initialize(workspace, r, ep, tokens) for r in range(ep)]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, experts, (tokens, top_k), generator=generator, dtype=torch.int32)
    x, weights = torch.randn(tokens, hidden).to(torch.bfloat16), torch.rand(tokens, top_k)
    payload = torch.zeros(ep, tokens, hidden, dtype=torch.bfloat16)
    offsets = []
    for r in range(ep):
        with world.stream(r).activate():
            offsets.append(a2a.moe_a2a_dispatch(ids, [x, ids, weights], workspace, metainfo[r], tokens, r, ep, top_k,
                                                experts)[1])  # fmt: skip
    world.synchronize()
    for r in range(ep):
        with world.stream(r).activate():
            a2a.moe_a2a_combine(payload, tokens, workspace, metainfo[r], tokens, r, ep, top_k, offsets[r])
    world.synchronize()
    launch_module.BoundLaunch.__call__ = lambda self, *args, **kwargs: None
    dispatch_module.run_steps = combine_module.run_steps = lambda stream, steps: None
    dispatch_us, combine_us = [], []
    with world.stream(0).activate():
        for _ in range(2000):
            begin = time.perf_counter()
            a2a.moe_a2a_dispatch(ids, [x, ids, weights], workspace, metainfo[0], tokens, 0, ep, top_k, experts)
            middle = time.perf_counter()
            a2a.moe_a2a_combine(payload, tokens, workspace, metainfo[0], tokens, 0, ep, top_k, offsets[0])
            end = time.perf_counter()
            dispatch_us.append((middle - begin) * 1e6)
            combine_us.append((end - middle) * 1e6)
    print(f"{ep} ranks, {tokens} tokens, hidden {hidden}: dispatch {statistics.median(dispatch_us):.1f} us, "
          f"combine {statistics.median(combine_us):.1f} us (Python only, medians of 2000)")


if __name__ == "__main__":
    main()
