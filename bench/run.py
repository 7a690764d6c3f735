"""Benchmark sweep: dispatch and combine of N simulated ranks on one GPU, next to a pure-torch
path moving the same rows, against the device's copy roofline measured in the same run.

    python -m bench.run --ranks 8 --tokens 16,128,1024,4096 --shape deepseek --payloads bf16 --out bench/out

Every configuration is first checked against a2a.reference (a mismatch aborts). Rows go to
<out>/results.csv and results.json; a summary table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

from bench.harness import (  # noqa: E402
    L2Flush,
    Round,
    copy_roofline_gbps,
    dispatch_row_bytes,
    host_microseconds,
    time_region,
)
from bench.torch_baseline import TorchBaseline  # noqa: E402
import a2a  # noqa: E402


def measure(world, tokens: int, shape: str, payloads: str, iterations: int, flush: L2Flush, roofline: float) -> list[dict]:
    round_ = Round.build(world, tokens, shape, payloads)
    round_.check()
    ep = world.ep_size
    pairs = round_.unique_pairs
    row_bytes = dispatch_row_bytes(round_)
    combine_row = round_.hidden * 2
    dispatch_bytes = (ep * tokens + pairs) * row_bytes
    combine_bytes = (pairs + ep * tokens) * combine_row
    top_k = round_.ranks[0].top_k
    expanded = ep * tokens * (1 + top_k)

    def timed_dispatch():
        round_.dispatch()
        world.join_into_caller()

    def timed_combine(in_workspace: bool):
        def run():
            round_.combine(planes_holder[0] if in_workspace else None)
            world.join_into_caller()
        return run

    planes_holder = [None]
    dispatch_us, combine_ws_us, combine_sep_us = [], [], []
    for _ in range(iterations):
        dispatch_us.append(time_region(timed_dispatch, 1, before=flush))
        planes_holder[0] = round_.fill_planes()
        world.join_into_caller()
        combine_ws_us.append(time_region(timed_combine(True), 1, before=flush))
    for _ in range(iterations):
        round_.dispatch()
        world.join_into_caller()
        combine_sep_us.append(time_region(timed_combine(False), 1, before=flush))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731

    # Host cost: Python time of one rank's call, eager.
    host_dispatch, host_combine = [], []
    for _ in range(max(5, iterations // 5)):
        host_dispatch.append(host_microseconds(lambda: round_.ranks[0].dispatch(round_.experts[0], round_.payloads[0], tokens), 1))
        for r in range(1, ep):
            round_.ranks[r].dispatch(round_.experts[r], round_.payloads[r], tokens)
        host_combine.append(host_microseconds(lambda: round_.ranks[0].combine(round_.expert_outputs[0], tokens), 1))
        for r in range(1, ep):
            round_.ranks[r].combine(round_.expert_outputs[r], tokens)
        world.synchronize()

    # Whole round replayed from a CUDA graph (dispatch + in-workspace combine).
    graph = torch.cuda.CUDAGraph()
    capture = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(capture):
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=capture):
            round_.dispatch()
            planes = round_.fill_planes()
            round_.combine(planes)
            world.join_into_caller()
    torch.cuda.synchronize()
    graph_us = time_region(graph.replay, iterations, before=flush)

    baseline = TorchBaseline(round_)
    base_dispatch = time_region(baseline.dispatch, iterations, before=flush)
    base_combine = time_region(baseline.combine, iterations, before=flush)

    common = dict(gpu=torch.cuda.get_device_name(), ranks=ep, tokens=tokens, shape=shape, payloads=payloads,
                  commit=_commit(), roofline_gbps=round(roofline, 1), unique_pairs=pairs)  # fmt: skip
    rows = []
    for phase, us, nbytes, row, base in (
        ("dispatch", median(dispatch_us), dispatch_bytes, row_bytes, base_dispatch),
        ("combine_in_workspace", median(combine_ws_us), combine_bytes, combine_row, base_combine),
        ("combine_staged", median(combine_sep_us), combine_bytes, combine_row, base_combine),
    ):
        gbps = nbytes / us / 1e3
        rows.append(dict(common, phase=phase, us=round(us, 2), bytes=nbytes, gbps_dedup=round(gbps, 1),
                         gbps_topk_expanded=round(expanded * row / us / 1e3, 1),
                         bytes_per_rank=nbytes // ep, roofline_ratio=round(gbps / roofline, 3),
                         torch_us=round(base, 2), speedup_vs_torch=round(base / us, 2)))  # fmt: skip
    rows.append(dict(common, phase="round_graph_replay", us=round(graph_us, 2), bytes=dispatch_bytes + combine_bytes,
                     gbps_dedup=round((dispatch_bytes + combine_bytes) / graph_us / 1e3, 1),
                     host_us_dispatch_per_rank=round(median(host_dispatch), 1),
                     host_us_combine_per_rank=round(median(host_combine), 1)))  # fmt: skip
    for moe in round_.ranks:
        moe._reset_workspace()
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="8")
    parser.add_argument("--tokens", default="16,128,1024,4096")
    parser.add_argument("--shape", default="deepseek")
    parser.add_argument("--payloads", default="bf16")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    flush = L2Flush()
    roofline = copy_roofline_gbps()
    print(f"copy roofline: {roofline:.0f} GB/s (read + write) on {torch.cuda.get_device_name()}")
    rows = []
    for ep in [int(x) for x in args.ranks.split(",")]:
        world = a2a.SimulatedWorld(ep, "cuda")
        for shape in args.shape.split(","):
            for payloads in args.payloads.split(","):
                for tokens in [int(x) for x in args.tokens.split(",")]:
                    new = measure(world, tokens, shape, payloads, args.iterations, flush, roofline)
                    rows += new
                    for row in new:
                        extra = (f"host/rank: dispatch {row['host_us_dispatch_per_rank']} us, combine {row['host_us_combine_per_rank']} us"
                                 if "host_us_dispatch_per_rank" in row else
                                 f"{row['gbps_dedup']:8.1f} GB/s {100 * row['roofline_ratio']:5.1f}% roofline  torch {row['torch_us']:9.1f} us")  # fmt: skip
                        print(f"ep={ep} {shape} {payloads} tokens={tokens:5d} {row['phase']:22s} {row['us']:9.1f} us  {extra}", flush=True)
    keys = sorted({k for row in rows for k in row})
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
