"""Where the gather-reduce kernel's time goes: variants of `_combine_kernel` timed side by side.

    python -m bench.profile.combine_variants --tokens 16,128,1024,4096 --out $OUT/variants.csv

Each variant is the production kernel with one part changed (GATING: how the fault / round check
gates the row loads; ELECTION: how the programs elect the one that signals the gather):
  branch/acq_rel  the gather of d23e55b: every program ends in an acq_rel election
  mask/acq_rel    the check loaded next to the top-k entries and applied as a load mask
  branch/spin     the gather since e0d97ca: every program but the last adds to a counter without
                  a fence (a REDG it does not wait for); the grid's last program spins until the
                  others have added, then signals
  mask/spin       both changes
  mask/none       no election (what a gather that signals elsewhere costs)
  none/none       neither check nor election (the kernel before the safety work)
Variants without an election signal nothing: the measurement replays combine-only graphs, then
discards the round. Measurement only: the production kernel is not changed by this script.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import os
import sys
import tempfile

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
import a2a.ops.combine as combine_module  # noqa: E402
from bench.harness import L2Flush, Round, time_region  # noqa: E402

VARIANTS = [("branch", "acq_rel"), ("mask", "acq_rel"), ("branch", "spin"), ("mask", "spin"), ("mask", "none"),
            ("none", "none")]  # fmt: skip

TEMPLATE = '''
import triton
import triton.language as tl
from a2a.kernels.combine import _round_to_bf16
from a2a.kernels.signal import _record_round_mismatch, _signal_gathered


@triton.jit(do_not_specialize=["runtime_max_tokens", "ep_rank", "stride_scales_rank", "num_tokens", "stride_rank",
                               "active_low", "active_high", "host_record_ptr"])
def _combine_kernel(plane_ptr, stride_plane_rank, scales_ptr, stride_scales_rank, out_ptr, topk_target_ranks_ptr,
                    topk_send_indices_ptr, runtime_max_tokens, ep_rank, num_tokens, election_ptr, gather_count_ptr,
                    gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr, host_record_ptr, dispatch_rows_ptr,
                    dispatch_rt_ptr, active_low, active_high, HIDDEN: tl.constexpr, TOP_K: tl.constexpr,
                    TILE: tl.constexpr, HAS_SCALES: tl.constexpr, EP_SIZE: tl.constexpr, EP_PAD: tl.constexpr,
                    FLAG_ARRAY_STRIDE: tl.constexpr, HAS_HOST_RECORD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    GATING_CODE
    if token < num_tokens:
        cols = tile * TILE + tl.arange(0, TILE)
        col_mask = cols < HIDDEN
        acc = tl.zeros([TILE], dtype=tl.float32)
        first_row = ep_rank.to(tl.int64) * runtime_max_tokens
        if go:
            for k in tl.static_range(TOP_K):
                target = tl.load(topk_target_ranks_ptr + token * TOP_K + k)
                slot = tl.load(topk_send_indices_ptr + token * TOP_K + k)
                sends = (target >= 0) & ok
                row = first_row + tl.where(sends, slot, 0)
                src = plane_ptr + tl.where(sends, target, 0).to(tl.int64) * stride_plane_rank + row * HIDDEN
                mask = col_mask & ((cols * 0 + target >= 0) & ok)
                values = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
                acc += values
        acc = tl.where(ok & go, acc, float("nan"))
        result = _round_to_bf16(acc)
        tl.store(out_ptr + token * HIDDEN + cols, result, mask=col_mask)
    ELECTION_CODE
'''

GATING = {
    "branch": "matches = (tl.load(dispatch_rows_ptr) == num_tokens) & (tl.load(dispatch_rt_ptr) == runtime_max_tokens)\n"
              "    go = (tl.load(fault_record_ptr) == 0) & matches\n    ok = True",
    "mask": "matches = (tl.load(dispatch_rows_ptr) == num_tokens) & (tl.load(dispatch_rt_ptr) == runtime_max_tokens)\n"
            "    ok = (tl.load(fault_record_ptr) == 0) & matches\n    go = True",
    "none": "go = True\n    ok = True",
}
ELECTION = {
    "acq_rel": "tl.debug_barrier()\n    finished = tl.atomic_add(election_ptr, 1, sem='acq_rel', scope='gpu')\n"
               "    if finished == tl.num_programs(0) * tl.num_programs(1) - 1:\n        tl.store(election_ptr, 0)\n"
               "        _signal_gathered(gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr,"
               " active_low, active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)",
    "spin": "tl.debug_barrier()\n    others = tl.num_programs(0) * tl.num_programs(1) - 1\n"
            "    if (tl.program_id(0) == tl.num_programs(0) - 1) & (tl.program_id(1) == tl.num_programs(1) - 1):\n"
            "        while tl.load(election_ptr, volatile=True) < others:\n            pass\n"
            "        tl.atomic_xchg(election_ptr, 0, sem='acq_rel', scope='gpu')\n"
            "        _signal_gathered(gather_count_ptr, gathered_mask_ptr, flags_ptr, stride_rank, fault_record_ptr,"
            " active_low, active_high, ep_rank, EP_SIZE, EP_PAD, FLAG_ARRAY_STRIDE)\n"
            "    else:\n        tl.atomic_add(election_ptr, 1, sem='relaxed', scope='gpu')",
    "none": "pass",
}


def load_variant(gating: str, election: str, folder: str):
    source = TEMPLATE.replace("GATING_CODE", GATING[gating]).replace("ELECTION_CODE", ELECTION[election])
    name = f"combine_variant_{gating}_{election}"
    path = os.path.join(folder, name + ".py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module._combine_kernel


def capture_relaxed(body) -> torch.cuda.CUDAGraph:
    """bench.harness.capture_graph in relaxed mode: the variant's module is loaded during capture."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="relaxed"):
            body()
    torch.cuda.synchronize()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--tokens", default="16,128,1024,4096")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the variants (interleaved)")
    parser.add_argument("--out", default="bench/out/combine_variants.csv")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="a2a-variants-")
    kernels = {v: load_variant(*v, folder) for v in VARIANTS}
    production = combine_module._combine_kernel
    flush = L2Flush()
    world = a2a.SimulatedWorld(args.ranks, "cuda")
    rows = []
    for tokens in [int(x) for x in args.tokens.split(",")]:
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                combine_module._combine_kernel = production
                round_ = Round.build(world, tokens, "deepseek", "bf16")
                if repeat == 0 and variant == VARIANTS[0]:
                    round_.check()  # the production kernel against the reference, once per size
                round_.dispatch()
                planes = round_.fill_planes()
                expected = [out.clone() for out in round_.combine(planes)]  # the production kernel's output
                round_.dispatch()  # the same round again: the graph below combines it
                planes = round_.fill_planes()
                world.join_into_caller()
                combine_module._combine_kernel = kernels[variant]
                for moe in round_.ranks:
                    moe._rank_workspace.plans.clear()  # rebuild the combine plan with the variant
                outputs = []
                graph = capture_relaxed(lambda: (outputs.extend(round_.combine(planes)), world.join_into_caller()))
                us = time_region(graph.replay, args.iterations, before=flush)
                torch.cuda.synchronize()
                for r, (got, want) in enumerate(zip(outputs, expected)):
                    if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                        raise AssertionError(f"variant {variant}: rank {r}'s output differs from the production kernel's")
                rows.append(dict(tokens=tokens, gating=variant[0], election=variant[1], repeat=repeat, us=round(us, 2)))
                print(f"tokens={tokens:5d} gating={variant[0]:7s} election={variant[1]:8s} pass {repeat}: {us:8.1f} us",
                      flush=True)
                del graph, planes, outputs, expected
                world.synchronize()
                del round_
                gc.collect()
                torch.cuda.empty_cache()
    combine_module._combine_kernel = production
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
