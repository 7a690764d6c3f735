"""Benchmark sweep: dispatch and combine of N simulated ranks on one GPU, next to a pure-torch
path moving the same rows, against the device's copy roofline measured in the same run.

    python -m bench.run --ranks 8 --tokens 16,128,1024,4096 --shape deepseek --payloads bf16 --out bench/out

Every configuration is first checked against a2a.reference (a mismatch aborts). With a baseline
library (`--baseline`, bench/baseline.py: any module with FlashInfer's functional API, e.g.
FlashInfer itself) the same inputs run through it too, checked, and each row gains its time and
the ratio a2a / baseline. Rows go to <out>/results.csv and results.json; a summary table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

from bench.harness import (  # noqa: E402
    L2Flush,
    RankGraphs,
    Round,
    capture_graph,
    copy_roofline_gbps,
    dispatch_row_bytes,
    time_region,
)
from bench import baseline as peer  # noqa: E402
from bench.profile.host_per_call import functional_round  # noqa: E402
from bench.torch_baseline import TorchBaseline  # noqa: E402
import a2a  # noqa: E402


def capture(world, body) -> torch.cuda.CUDAGraph:
    """A graph of `body` forking into the rank streams, joined back before the capture ends."""
    return capture_graph(lambda: (body(), world.join_into_caller()))


def measure_peer(module, round_: Round, iterations: int, flush: L2Flush) -> dict[str, float | None]:
    """The baseline library's graph times on round_'s inputs (bench.baseline), per phase; None where
    it cannot run (its combine on one GPU beyond MAX_CONCURRENT_COMBINE_ROWS)."""
    world = round_.world
    run = peer.FunctionalBaseline(module, world, round_.experts, round_.payloads, round_.tokens, round_.hidden,
                                  round_.num_experts)  # fmt: skip
    run.check()
    us: dict[str, float | None] = dict.fromkeys(("dispatch", "combine_in_workspace", "round"))
    graph = capture(world, run.dispatch)
    us["dispatch"] = time_region(graph.replay, iterations, before=flush)
    del graph
    if run.combine_runs_concurrently:
        run.dispatch()
        planes = run.fill_planes()
        graphs = {"combine_in_workspace": capture(world, lambda: run.combine(planes)),
                  "round": capture(world, lambda: (run.dispatch(), run.combine(planes)))}  # fmt: skip
        for phase, graph in graphs.items():
            us[phase] = time_region(graph.replay, iterations, before=flush)
        del graphs
    world.synchronize()
    return us


def measure(world, tokens: int, shape: str, payloads: str, iterations: int, flush: L2Flush, roofline: float,
            commit: str, peer_module=None) -> list[dict]:  # fmt: skip
    round_ = Round.build(world, tokens, shape, payloads)
    round_.check()
    ep = world.ep_size
    pairs = round_.unique_pairs
    row_bytes = dispatch_row_bytes(round_)
    combine_row = round_.hidden * 2
    dispatch_bytes = (ep * tokens + pairs) * row_bytes
    combine_bytes = (pairs + ep * tokens) * combine_row
    expanded = ep * tokens * (1 + round_.ranks[0].top_k)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731

    # Eager: the phase of all ranks between a fork and a join on the caller's stream, and the
    # Python time of one rank's call (what a user pays per rank per phase without graphs).
    eager = {"dispatch": [], "combine_in_workspace": [], "combine_staged": []}
    host = {"dispatch": [], "combine_in_workspace": [], "combine_staged": []}
    for _ in range(max(5, iterations // 3)):
        for phase in eager:
            if phase != "dispatch":
                round_.dispatch()
                planes = round_.fill_planes() if phase == "combine_in_workspace" else None
                world.join_into_caller()
            def run(phase=phase, planes=planes if phase != "dispatch" else None):
                for r, moe in enumerate(round_.ranks):
                    begin = time.perf_counter()
                    if phase == "dispatch":
                        moe.dispatch(round_.experts[r], round_.payloads[r], tokens)
                    else:
                        moe.combine(planes[r] if planes else round_.expert_outputs[r], tokens,
                                    payload_in_workspace=planes is not None)
                    host[phase].append((time.perf_counter() - begin) * 1e6)
                world.join_into_caller()
            eager[phase].append(time_region(run, 1, before=flush))
            if phase == "dispatch":
                round_.combine(None)
        world.synchronize()

    # Host cost of the path engines take (one process per rank: the functional op on the current
    # stream, no stream switch): each rank's call timed with its stream already current.
    functional = {"dispatch": [], "combine_staged": []}
    for _ in range(max(5, iterations // 3)):
        dispatch_us, combine_us = functional_round(round_)
        functional["dispatch"] += dispatch_us
        functional["combine_staged"] += combine_us
    world.synchronize()

    # CUDA graphs: the GPU time of each phase with no host in the way.
    graph_dispatch = capture(world, round_.dispatch)
    planes = round_.fill_planes()
    graph_combine_ws = capture(world, lambda: round_.combine(planes))
    round_.dispatch()
    graph_combine_staged = capture(world, lambda: round_.combine(None))
    graph_round = capture(world, lambda: (round_.dispatch(), round_.combine(planes)))
    graph_us = {
        name: time_region(graph.replay, iterations, before=flush)
        for name, graph in (("dispatch", graph_dispatch), ("combine_in_workspace", graph_combine_ws),
                            ("combine_staged", graph_combine_staged), ("round", graph_round))
    }  # fmt: skip
    graph_us["round_rank_graphs"] = RankGraphs(round_, planes).time_us(iterations, before=flush)

    baseline = TorchBaseline(round_)
    torch_us = {"dispatch": time_region(baseline.dispatch, iterations, before=flush)}
    torch_us["combine_in_workspace"] = torch_us["combine_staged"] = time_region(baseline.combine, iterations, before=flush)
    torch_us["round"] = torch_us["round_rank_graphs"] = torch_us["dispatch"] + torch_us["combine_in_workspace"]

    peer_us = measure_peer(peer_module, round_, iterations, flush) if peer_module is not None else {}
    common = dict(gpu=torch.cuda.get_device_name(), ranks=ep, tokens=tokens, shape=shape, payloads=payloads,
                  commit=commit, roofline_gbps=round(roofline, 1), unique_pairs=pairs,
                  baseline=getattr(peer_module, "__name__", None))  # fmt: skip
    sizes = {"dispatch": (dispatch_bytes, row_bytes), "combine_in_workspace": (combine_bytes, combine_row),
             "combine_staged": (combine_bytes, combine_row), "round": (dispatch_bytes + combine_bytes, None),
             "round_rank_graphs": (dispatch_bytes + combine_bytes, None)}  # fmt: skip
    rows = []
    for phase, us in graph_us.items():
        nbytes, row = sizes[phase]
        gbps = nbytes / us / 1e3
        rows.append(dict(common, phase=phase, us=round(us, 2), bytes=nbytes, gbps_dedup=round(gbps, 1),
                         gbps_topk_expanded=round(expanded * row / us / 1e3, 1) if row else None,
                         bytes_per_rank=nbytes // ep, roofline_ratio=round(gbps / roofline, 3),
                         torch_us=round(torch_us[phase], 2), speedup_vs_torch=round(torch_us[phase] / us, 2),
                         eager_us=round(median(eager[phase]), 1) if phase in eager else None,
                         host_us_per_rank=round(median(host[phase]), 1) if phase in host else None,
                         host_us_functional=round(median(functional[phase]), 1) if phase in functional else None,
                         baseline_us=round(peer_us[phase], 2) if peer_us.get(phase) else None,
                         ratio_to_baseline=round(us / peer_us[phase], 3) if peer_us.get(phase) else None))  # fmt: skip
    del graph_dispatch, graph_combine_ws, graph_combine_staged, graph_round
    world.synchronize()
    for moe in round_.ranks:
        moe._reset_workspace()
    return rows


def git_commit() -> str:
    """The checkout's short commit (pass --commit where the checkout's git metadata is not current)."""
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
    parser.add_argument("--commit", default=None, help="commit recorded in the rows (default: git rev-parse)")
    parser.add_argument("--baseline", default=None,
                        help="a module with FlashInfer's functional moe_a2a_* API run on the same inputs "
                             "(bench/baseline.py; default: flashinfer.comm if it imports; 'none': no baseline)")
    args = parser.parse_args()
    peer_module = peer.load(args.baseline)
    print(f"baseline: {getattr(peer_module, '__name__', 'none')}")
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
                    new = measure(world, tokens, shape, payloads, args.iterations, flush, roofline,
                                  args.commit or git_commit(), peer_module)  # fmt: skip
                    rows += new
                    for row in new:
                        print(f"ep={ep} {shape} {payloads} tokens={tokens:5d} {row['phase']:20s} graph {row['us']:8.1f} us "
                              f"{row['gbps_dedup']:7.1f} GB/s {100 * row['roofline_ratio']:5.1f}% | torch {row['torch_us']:8.1f} us "
                              f"x{row['speedup_vs_torch']:.2f} | eager {row['eager_us']} us, host/rank {row['host_us_per_rank']} us "
                              f"(functional on the current stream {row['host_us_functional']} us)"
                              + (f" | baseline {row['baseline_us']} us, a2a / baseline {row['ratio_to_baseline']}"
                                 if row["baseline_us"] else ""),
                              flush=True)  # fmt: skip
    keys = sorted({k for row in rows for k in row})
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
