"""Python time of one functional dispatch + combine, with every launch and host wait stubbed (CPU).

    python -m bench.profile.host_overhead [ranks] [tokens] [hidden]
    python -m bench.profile.host_overhead [ranks] [tokens] [hidden] --against OLDER_TREE [--batches N]

A machine without a GPU still shows what the host path costs in Python: one real round builds the
plans (kernels run under the interpreter), then `BoundLaunch.__call__` and the launchers'
`run_steps` become no-ops and rank 0's functional calls are timed (medians of 2000). It leaves
out the CUDA launch calls themselves: compare trees with it, and measure on the GPU with
`bench/profile/host_split.py`.

Separate processes of one tree differ by more than a change does (19.8 vs 13.1 us a dispatch on a
2-core CPU machine, minutes apart), so `--against` imports an older tree (e.g. a `git archive` in
an ignored folder) and this one into ONE process, each with its own world (its modules swapped into
sys.modules before its batches, as bench/profile/host_ab.py does on the GPU), and alternates
batches of 200 calls (ABBA): per op, each tree's median and the median paired batch difference.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path

from bench.profile.trees import THIS_TREE, LoadedTree, own_modules

CALLS_PER_BATCH = 200


class StubbedRound:
    """One tree's CPU world after a real round, launches stubbed: time rank 0's functional calls."""

    def __init__(self, ep: int, tokens: int, hidden: int):
        import torch

        a2a = importlib.import_module("a2a")
        combine_module = importlib.import_module("a2a.ops.combine")
        dispatch_module = importlib.import_module("a2a.ops.dispatch")
        launch_module = importlib.import_module("a2a.ops.launch")
        self.a2a = a2a
        top_k, experts = 8, 8 * ep
        self.world = world = a2a.SimulatedWorld(ep, "cpu")
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
                offsets.append(a2a.moe_a2a_dispatch(ids, [x, ids, weights], workspace, metainfo[r], tokens, r, ep,
                                                    top_k, experts)[1])  # fmt: skip
        world.synchronize()
        for r in range(ep):
            with world.stream(r).activate():
                a2a.moe_a2a_combine(payload, tokens, workspace, metainfo[r], tokens, r, ep, top_k, offsets[r])
        world.synchronize()
        launch_module.BoundLaunch.__call__ = lambda self, *args, **kwargs: None
        dispatch_module.run_steps = combine_module.run_steps = lambda stream, steps: None
        self.dispatch = lambda: a2a.moe_a2a_dispatch(ids, [x, ids, weights], workspace, metainfo[0], tokens, 0, ep,
                                                     top_k, experts)  # fmt: skip
        self.combine = lambda: a2a.moe_a2a_combine(payload, tokens, workspace, metainfo[0], tokens, 0, ep, top_k,
                                                   offsets[0])  # fmt: skip

    def calls(self, count: int) -> tuple[list[float], list[float]]:
        """`count` dispatch + combine pairs of rank 0: us of each dispatch, then of each combine."""
        dispatch_us, combine_us = [], []
        with self.world.stream(0).activate():
            for _ in range(count):
                begin = time.perf_counter()
                self.dispatch()
                middle = time.perf_counter()
                self.combine()
                end = time.perf_counter()
                dispatch_us.append((middle - begin) * 1e6)
                combine_us.append((end - middle) * 1e6)
        return dispatch_us, combine_us


class Tree(LoadedTree):
    """A tree's modules (bench.profile.trees) and its stubbed round."""

    def __init__(self, root: Path, ep: int, tokens: int, hidden: int):
        super().__init__(root)
        self.round = StubbedRound(ep, tokens, hidden)
        self.modules = own_modules()
        self.check_modules()
        self.name = root.name


def compare(older_root: Path, ep: int, tokens: int, hidden: int, batches: int) -> None:
    older, this = Tree(older_root.resolve(), ep, tokens, hidden), Tree(THIS_TREE, ep, tokens, hidden)
    trees = (older, this)
    calls = {tree: ([], []) for tree in trees}
    batch_medians = {tree: ([], []) for tree in trees}
    for i in range(batches + 1):  # batch 0 of each tree warms up
        for tree in trees if i % 2 == 0 else trees[::-1]:
            tree.activate()
            measured = tree.round.calls(CALLS_PER_BATCH)
            if i == 0:
                continue
            for op, values in enumerate(measured):
                calls[tree][op].extend(values)
                batch_medians[tree][op].append(statistics.median(values))
    for op, name in enumerate(("dispatch", "combine")):
        differences = [new - old for new, old in zip(batch_medians[this][op], batch_medians[older][op])]
        print(f"host overhead, {ep} ranks, {tokens} tokens, {name:8s}: {older.name} "
              f"{statistics.median(calls[older][op]):5.1f} us, this tree {statistics.median(calls[this][op]):5.1f} us "
              f"(Python only, medians of {len(calls[this][op])} calls); paired batch difference median "
              f"{statistics.median(differences):+5.2f} us, this tree faster in {sum(d < 0 for d in differences)} of "
              f"{len(differences)} pairs", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*", help="ranks tokens hidden (8 32 1024)")
    parser.add_argument("--against", type=Path, help="an older tree to alternate with this one in one process")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    ep, tokens, hidden = (args.sizes + [8, 32, 1024][len(args.sizes):])[:3]
    if args.against is not None:
        compare(args.against, ep, tokens, hidden, args.batches)
        return
    stubbed = StubbedRound(ep, tokens, hidden)
    dispatch_us, combine_us = stubbed.calls(2000)
    print(f"{ep} ranks, {tokens} tokens, hidden {hidden}: dispatch {statistics.median(dispatch_us):.1f} us, "
          f"combine {statistics.median(combine_us):.1f} us (Python only, medians of 2000)")


if __name__ == "__main__":
    main()
