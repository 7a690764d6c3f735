"""Tile / warp choices of the dispatch copy or the gather-reduce, timed the way bench.run times a
phase (one CUDA graph of every rank's dispatch, or of every rank's in-workspace combine; 8 simulated
ranks, DeepSeek bf16), each variant checked against the reference once, then timed interleaved
(variant after variant, PASSES times) so drift hits all variants alike.

    python -m bench.profile.tile_choices dispatch|combine TOKENS[,TOKENS...] tile:warps [tile:warps ...]
    python -m bench.profile.tile_choices --record LOG [LOG ...]

Prints one line per (tokens, variant): the median of the passes' medians, and each pass's median (us).
bench.tune times each kernel alone on one rank, where candidates often tie within 1 %; with every
rank busy they can differ by 5 % (bench/RESULTS.md). `--record` reads such printed lines (a log kept
in bench/results/) into the tuned table: the entry's `busy_us`, and as its stored choice the tied
candidate (a2a.ops.configs.tie_break) with the least total time over the logged sizes above
SMALL_ROUND_TOKENS; the gather's small-round choice is made from the sizes up to it when a plan is built.
"""

import json
import re
import statistics
import sys
from collections import defaultdict

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

import a2a  # noqa: E402
from a2a.ops import configs  # noqa: E402
from bench.harness import L2Flush, Round, capture_graph, time_region  # noqa: E402

PASSES = 5
ITERATIONS = 20
CHOOSERS = {"dispatch": "dispatch_copy_config", "combine": "combine_config"}  # read when a plan is built


def build(phase: str, tokens: int, variant: configs.TileConfig):
    setattr(configs, CHOOSERS[phase], lambda *_: variant)
    world = a2a.SimulatedWorld(8, "cuda")
    round_ = Round.build(world, tokens, "deepseek", "bf16")
    round_.check()
    if phase == "dispatch":
        body = round_.dispatch
    else:
        round_.dispatch()  # the captured combine is this dispatch's (replays repeat the same combine)
        planes = round_.fill_planes()
        body = lambda: round_.combine(planes)  # noqa: E731
    world.synchronize()
    return capture_graph(lambda: (body(), world.join_into_caller())), (world, round_)


SHAPE_KEY = configs.table_key(7168 * 2, 8, 8)  # DeepSeek bf16, top-8, 8 ranks: what build() times
KERNELS = {"dispatch": "dispatch_copy", "combine": "combine"}
LINE = re.compile(r"^(dispatch|combine) tokens +(\d+) tile +(\d+) warps (\d+): +([\d.]+) us")


def record(logs: list[str]) -> None:
    """Write the logged busy-world timings into the tuned table and re-choose each entry."""
    busy = defaultdict(lambda: defaultdict(dict))  # phase -> "tile=T,warps=W" -> {tokens: us}
    sources = defaultdict(list)
    for log in logs:
        for line in open(log):
            match = LINE.match(line)
            if match:
                phase, tokens, tile, warps, us = match.groups()
                busy[phase][f"tile={tile},warps={warps}"][tokens] = float(us)
                if log not in sources[phase]:
                    sources[phase].append(log)
    table = json.loads(configs.TUNED_TABLE.read_text())
    arch = "sm90"  # the H100 / H200 entries
    for phase, timings in busy.items():
        entry = table["configs"][arch][KERNELS[phase]][SHAPE_KEY]
        entry["busy_us"] = {name: dict(sorted(by_tokens.items(), key=lambda kv: int(kv[0])))
                            for name, by_tokens in sorted(timings.items())}  # fmt: skip
        entry["busy_source"] = sources[phase]
        choice = configs.tie_break(entry)
        entry["tile"], entry["num_warps"] = choice.tile, choice.num_warps
        print(f"{arch} {KERNELS[phase]} {SHAPE_KEY}: tile={choice.tile},warps={choice.num_warps}")
    configs.TUNED_TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def main() -> None:
    if sys.argv[1] == "--record":
        record(sys.argv[2:])
        return
    phase = sys.argv[1]
    sizes = [int(t) for t in sys.argv[2].split(",")]
    variants = [configs.TileConfig(*(int(v) for v in arg.split(":"))) for arg in sys.argv[3:]]
    flush = L2Flush()
    for tokens in sizes:
        graphs = [build(phase, tokens, variant) for variant in variants]
        samples = [[] for _ in variants]
        for _ in range(PASSES):
            for i, (graph, _) in enumerate(graphs):
                samples[i].append(time_region(graph.replay, ITERATIONS, before=flush))
        for variant, values in zip(variants, samples):
            print(f"{phase} tokens {tokens:5d} tile {variant.tile:5d} warps {variant.num_warps}: "
                  f"{statistics.median(values):8.1f} us  passes {' '.join(f'{v:.1f}' for v in values)}", flush=True)
        del graphs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
