"""GPU time of a phase's CUDA graph in several trees, measured in ONE process, batches alternated.

bench.run times each tree in its own process; two processes of one tree differed by up to 1.5 %
at 1024 tokens (bench/RESULTS.md, pair 10b), as much as the differences looked for. Here every
tree (bench.profile.trees: `.base`, a `git archive` of an older commit; `.` for this tree;
`TREE:NAME=VALUE,...` sets environment variables while that tree builds its plans and captures,
e.g. `.:A2A_PDL=0`) builds bench.harness's 8-rank DeepSeek-like round on the same GPU, checks it
against the reference, and captures the graphs bench.run times (dispatch; combine with the payload
in the workspace; the whole round). Batches of each phase's replays, L2 flushed before each as
bench.run does, then go tree after tree in alternating order. Prints each tree's median and the
median of the per-batch differences to the first tree, with how many batches were faster.

    python -m bench.profile.graph_ab TREE [TREE ...] [--tokens 1024] [--phases dispatch,round]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench.profile.trees import LoadedTree

PHASES = ("dispatch", "combine_in_workspace", "round")


class TreeRound(LoadedTree):
    """One tree's checked round and its captured phase graphs."""

    def __init__(self, spec: str, tokens: int, phases: list[str]):
        root, _, env = spec.partition(":")
        super().__init__(Path(root), dict(item.split("=", 1) for item in env.split(",") if item))
        with self.active():
            import torch

            harness = self.harness
            world = self.a2a.SimulatedWorld(8, "cuda")
            round_ = harness.Round.build(world, tokens, "deepseek", "bf16")
            round_.check()

            def capture(body):
                return harness.capture_graph(lambda: (body(), world.join_into_caller()))

            # In bench.run's order (a capture advances each rank's phase as a call would), all three
            # captured; only `phases` are timed.
            graphs = {"dispatch": capture(round_.dispatch)}
            planes = round_.fill_planes()
            graphs["combine_in_workspace"] = capture(lambda: round_.combine(planes))
            graphs["round"] = capture(lambda: (round_.dispatch(), round_.combine(planes)))
            self.graphs = {phase: graphs[phase] for phase in phases}
            # A graph holds addresses, not tensors: the round (inputs, workspace, world) and the planes
            # must live as long as the graphs, or the next tree's allocations reuse their memory (a
            # first version dropped them; its first tree's 1024-token dispatch timed 113 us, faster
            # than the GPU's memory allows, against 230 in bench.run).
            self.round, self.planes = round_, planes
            # Bytes each phase reads and writes, as bench.run counts them: a median that moves them
            # faster than the GPU's memory can is no measurement of the phase (printed as GB/s).
            ep, pairs = world.ep_size, round_.unique_pairs
            dispatch_bytes = (ep * tokens + pairs) * harness.dispatch_row_bytes(round_)
            combine_bytes = (pairs + ep * tokens) * round_.hidden * 2
            self.bytes = {"dispatch": dispatch_bytes, "combine_in_workspace": combine_bytes,
                          "round": dispatch_bytes + combine_bytes}  # fmt: skip
            world.synchronize()
            torch.cuda.synchronize()
        self.time_region = harness.time_region
        self.samples = {phase: [] for phase in self.graphs}
        self.batch_medians = {phase: [] for phase in self.graphs}

    def batch(self, phase: str, replays: int, flush) -> None:
        with self.active():
            for _ in range(2):  # unrecorded: the other tree's graphs ran last
                self.graphs[phase].replay()
            values = [self.time_region(self.graphs[phase].replay, 1, before=flush) for _ in range(replays)]
        self.samples[phase] += values
        self.batch_medians[phase].append(statistics.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--phases", default="dispatch,combine_in_workspace,round")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--replays", type=int, default=5, help="timed replays a batch")
    args = parser.parse_args()
    phases = [phase for phase in args.phases.split(",") if phase]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    # What a one-process simulated world on CUDA needs (a2a.envs.SIMULATION_ENV), before torch starts CUDA.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    trees = [TreeRound(spec, args.tokens, phases) for spec in args.trees]
    flush = trees[-1].harness.L2Flush()
    for i in range(args.batches):
        for phase in phases:
            for tree in trees if i % 2 == 0 else trees[::-1]:  # neither end always goes first
                tree.batch(phase, args.replays, flush)
    first = trees[0]
    for phase in phases:
        for tree in trees:
            us = statistics.median(tree.samples[phase])
            line = (f"graph ab {args.tokens:5d} tokens {phase:21s} {str(tree):28s} {us:8.1f} us "
                    f"{tree.bytes[phase] / us / 1e3:7.1f} GB/s (median of {len(tree.samples[phase])})")
            if tree is not first:
                differences = [b - a for a, b in zip(first.batch_medians[phase], tree.batch_medians[phase])]
                faster = sum(d < 0 for d in differences)
                line += (f"; batch difference to {first}: median {statistics.median(differences):+6.2f} us, "
                         f"faster in {faster} of {len(differences)}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
