"""Host time of a functional call in two trees, measured in ONE process: an older tree (e.g. .pre12,
a `git archive` of an earlier commit) and this one, each with its own 8-rank simulated world, called
in alternating batches. Separate processes of the same tree differed by up to 28 us a call on the
H200 (bench/RESULTS.md), more than the difference looked for; batches alternated within a process
share the clock, the core and the driver state, so their paired differences compare the trees.

    python -m bench.profile.host_ab OLDER_TREE [tokens ...] [--batches N]

Each tree is imported under the names `a2a` and `bench` (its own modules swapped into sys.modules
before each of its batches, so lazy imports resolve to that tree), its round checked against the
reference once, then BATCHES batches of ROUNDS_PER_BATCH rounds per tree (the GPU kept ahead of
the host, as in host_per_call). Prints, per op, each tree's median call and the median of the
per-batch-pair differences (this - older) with the count of pairs where this tree was faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
from pathlib import Path

from bench.profile.trees import THIS_TREE, LoadedTree, own_modules

ROUNDS_PER_BATCH = 10
SLEEP_CYCLES = 50_000_000  # ~25 ms on an H200: longer than a batch's host time


class Tree(LoadedTree):
    """One tree's modules (bench.profile.trees) and its checked round."""

    def __init__(self, root: Path, tokens: int):
        super().__init__(root)
        self.round = self.harness.Round.build(self.a2a.SimulatedWorld(8, "cuda"), tokens, "deepseek", "bf16")
        self.round.check()
        # This tree's host_per_call, bound to the tree just imported (it uses only the functional
        # API and bench.harness's Round, so it measures an older tree too).
        spec = importlib.util.spec_from_file_location(f"host_per_call_{id(self)}",
                                                      Path(__file__).with_name("host_per_call.py"))  # fmt: skip
        host_per_call = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(host_per_call)
        self.functional_round = host_per_call.functional_round
        self.modules = own_modules()
        self.check_modules()

    def batch(self, rounds: int) -> tuple[list[float], list[float]]:
        """`rounds` rounds of functional calls, each rank's call on its own stream: host us per call."""
        import torch

        round_ = self.round
        world = round_.world
        world.synchronize()
        for r in range(world.ep_size):
            with world.stream(r).activate():
                torch.cuda._sleep(SLEEP_CYCLES)
        dispatch_us, combine_us = [], []
        for _ in range(rounds):
            dispatch, combine = self.functional_round(round_)
            dispatch_us += dispatch
            combine_us += combine
        world.synchronize()
        return dispatch_us, combine_us


def compare(older_root: Path, tokens: int, batches: int) -> None:
    older = Tree(older_root, tokens)
    this = Tree(THIS_TREE, tokens)
    trees = (older, this)
    calls = {tree: ([], []) for tree in trees}
    batch_medians = {tree: ([], []) for tree in trees}
    for i in range(batches + 1):  # batch 0 of each tree warms up and is not counted
        for tree in trees if i % 2 == 0 else trees[::-1]:  # ABBA order: neither tree always goes first
            tree.activate()
            dispatch, combine = tree.batch(ROUNDS_PER_BATCH)
            if i == 0:
                continue
            for op, values in enumerate((dispatch, combine)):
                calls[tree][op].extend(values)
                batch_medians[tree][op].append(statistics.median(values))
    for op, name in enumerate(("dispatch", "combine")):
        differences = [new - old for new, old in zip(batch_medians[this][op], batch_medians[older][op])]
        faster = sum(d < 0 for d in differences)
        print(f"host ab {tokens:5d} tokens {name:8s}: {older_root.name or older_root} "
              f"{statistics.median(calls[older][op]):6.1f} us, this tree {statistics.median(calls[this][op]):6.1f} us "
              f"(medians of {len(calls[this][op])} calls); paired batch difference median "
              f"{statistics.median(differences):+5.1f} us, this tree faster in {faster} of {len(differences)} pairs",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("older_tree", type=Path)
    parser.add_argument("tokens", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    # What a one-process simulated world on CUDA needs (a2a.envs.SIMULATION_ENV), before torch starts CUDA.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    for tokens in args.tokens:
        compare(args.older_tree.resolve(), tokens, args.batches)


if __name__ == "__main__":
    main()
