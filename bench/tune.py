"""Tune the dispatch copy and the combine gather-reduce: `triton.autotune` over the candidate
configs of `a2a.ops.configs`, per (row-bytes bucket, top_k, ep_size), winners written to the table the
launchers read (`a2a/ops/tuned_configs.json`, under this GPU's architecture).

    python -m bench.tune --shapes deepseek,qwen3,mixtral,gptoss --ranks 8 --tokens 1024

Each kernel is timed alone on one rank of a simulated world (its barrier off: the copy and the
reduction only), with Triton's `do_bench` (L2 cleared between runs, median). Routing comes from a
real dispatch, checked against the reference first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402
import triton  # noqa: E402

import a2a  # noqa: E402
from a2a.ops import configs  # noqa: E402
from a2a.ops.combine import _gather_launch  # noqa: E402
from a2a.ops.dispatch import _copy_launch, _row_bytes  # noqa: E402
from a2a.ops.barrier import combine_signature, signature_tensor  # noqa: E402
from a2a.ops.context import resolve_context  # noqa: E402
from bench.harness import Round  # noqa: E402


# Candidates this script times for the copy and gather-reduce kernels (tile in copy units or
# elements, warps); the heuristic's choice is always among those timed too.
TILE_CANDIDATES = (256, 512, 1024, 2048)
WARP_CANDIDATES = (4, 8)


def candidate_configs(row_elements: int, element_bytes: int) -> list[configs.TileConfig]:
    """Configs worth timing for rows of `row_elements`: every thread moves at least one 16-byte vector
    and the tile is not more than twice the row."""
    vec = max(1, configs.VECTOR_BYTES // element_bytes)
    chosen = {
        configs.TileConfig(tile, warps)
        for tile in TILE_CANDIDATES
        for warps in WARP_CANDIDATES
        if tile >= 32 * vec * warps and tile <= 2 * configs.next_power_of_2(row_elements)
    }
    chosen.add(configs._tile_for(row_elements, element_bytes))
    return sorted(chosen, key=lambda c: (c.tile, c.num_warps))


def autotune(launch, row_elements: int, element_bytes: int, grid_rows: int) -> tuple[configs.TileConfig, dict]:
    """Best TileConfig for `launch` (a KernelLaunch) and the median us of every candidate."""
    candidates = candidate_configs(row_elements, element_bytes)
    if len(candidates) == 1:
        return candidates[0], {}
    tuner = triton.autotune(
        configs=[triton.Config({"TILE": c.tile}, num_warps=c.num_warps) for c in candidates], key=[]
    )(launch.kernel)
    fixed = {k: v for k, v in launch.constexprs.items() if k not in ("TILE", "num_warps")}
    tuner[lambda meta: (grid_rows, triton.cdiv(row_elements, meta["TILE"]))](*launch.args, **fixed)
    torch.cuda.synchronize()
    timings = {f"tile={c.kwargs['TILE']},warps={c.num_warps}": round(float(t[0] if isinstance(t, (list, tuple)) else t) * 1e3, 2)
               for c, t in tuner.configs_timings.items()}  # fmt: skip
    best = tuner.best_config
    return configs.TileConfig(best.kwargs["TILE"], best.num_warps), timings


def tune_shape(world: a2a.SimulatedWorld, shape: str, tokens: int) -> dict[str, dict]:
    round_ = Round.build(world, tokens, shape, "bf16")
    round_.check()  # also leaves every rank's routing in its workspace
    round_.dispatch()
    planes = round_.fill_planes()
    world.synchronize()
    moe = round_.ranks[0]
    rank_workspace = resolve_context(moe.workspace, moe.metainfo, 0)
    payloads = round_.payloads[0]
    round_layout = rank_workspace.layout.round_layout(tokens, [_row_bytes(p) for p in payloads])
    full = (1 << world.ep_size) - 1
    results = {}

    # The copy alone, timed on rank 0: its last program signals but does not wait for the peers.
    signature = signature_tensor([], rank_workspace.workspace.device)
    copy, unit_dtypes, _ = _copy_launch(rank_workspace, payloads, rank_workspace.round_state, False, round_layout,
                                        moe.top_k, signature, full, wait_in_kernel=False)  # fmt: skip
    widest = max(range(len(payloads)), key=lambda p: _row_bytes(payloads[p]))
    unit_bytes = unit_dtypes[widest].itemsize
    row_units = _row_bytes(payloads[widest]) // unit_bytes
    best, timings = autotune(copy, row_units, unit_bytes, tokens)
    heuristic = configs._tile_for(row_units, unit_bytes)
    results[("dispatch_copy", configs.table_key(row_units * unit_bytes, moe.top_k, world.ep_size))] = dict(
        tile=best.tile, num_warps=best.num_warps, candidates_us=timings,
        heuristic=f"tile={heuristic.tile},warps={heuristic.num_warps}")

    output = torch.empty(tokens, round_.hidden, dtype=torch.bfloat16, device="cuda")
    # The round's own combine signature: the gather compares it with the rows check()'s combine left
    # in the workspace (another one would record a mismatch and write NaN).
    combine_words = combine_signature(tokens, rank_workspace.layout.max_num_tokens, moe.top_k, planes[0],
                                      round_layout.combine_offset, False, full)  # fmt: skip
    gather = _gather_launch(rank_workspace, planes[0], round_layout.combine_offset, output, moe.top_k, None, full,
                            signature_tensor(combine_words, output.device), wait_in_kernel=False,
                            compare=tokens <= configs.GATHER_COMPARE_MAX_TOKENS)  # the variant a round of `tokens` runs
    best, timings = autotune(gather, round_.hidden, 2, tokens)
    heuristic = configs._tile_for(round_.hidden, 2)
    results[("combine", configs.table_key(round_.hidden * 2, moe.top_k, world.ep_size))] = dict(
        tile=best.tile, num_warps=best.num_warps, candidates_us=timings,
        heuristic=f"tile={heuristic.tile},warps={heuristic.num_warps}")
    round_.combine(planes)
    world.synchronize()
    for rank in round_.ranks:
        rank._reset_workspace()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="deepseek,qwen3,mixtral,gptoss")
    parser.add_argument("--ranks", default="8")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--table", default=str(configs.TUNED_TABLE))
    parser.add_argument("--commit", default=None, help="commit recorded in the table (default: git rev-parse)")
    args = parser.parse_args()
    arch = configs.architecture()
    table = json.loads(open(args.table).read()) if os.path.exists(args.table) else {}
    table.setdefault("configs", {}).setdefault(arch, {})
    for ep in [int(x) for x in args.ranks.split(",")]:
        world = a2a.SimulatedWorld(ep, "cuda")
        for shape in args.shapes.split(","):
            for (kernel, key), entry in tune_shape(world, shape, args.tokens).items():
                entries = table["configs"][arch].setdefault(kernel, {})
                # Timings with every rank busy (bench.profile.tile_choices --record) break ties.
                for field in ("busy_us", "busy_source"):
                    if field in entries.get(key, {}):
                        entry[field] = entries[key][field]
                choice = configs.tie_break(entry)
                entry["tile"], entry["num_warps"] = choice.tile, choice.num_warps
                entries[key] = entry
                print(f"{arch} {kernel:13s} {key:40s} best tile={entry['tile']},warps={entry['num_warps']} "
                      f"(heuristic {entry['heuristic']}): {entry['candidates_us']}", flush=True)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()  # fmt: skip
    table.setdefault("provenance", {})[arch] = dict(
        device=torch.cuda.get_device_name(), commit=commit, date=datetime.date.today().isoformat(),
        command=f"python -m bench.tune --shapes {args.shapes} --ranks {args.ranks} --tokens {args.tokens}")
    with open(args.table, "w") as handle:
        json.dump(table, handle, indent=1, sort_keys=True)
        handle.write("\n")
    print(f"wrote {args.table}")


if __name__ == "__main__":
    main()
