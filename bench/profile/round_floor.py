"""The floor under a small round: what the benchmark's graph of 8 simulated ranks costs with
kernels that move no data, next to a2a's and the baseline's real rounds, timed the same way in
one process (bench.run's method: one CUDA graph forking into the rank streams, L2 flushed
before each replay, median of `--iterations`).

Floors, per rank on its own stream (every kernel one program of one warp, launched with PDL and
waiting for its predecessor first, as a2a's and FlashInfer's kernels are):
- `empty xN`: N kernels that do nothing: the graph's launch, fork and join.
- `barrier x2`: two cross-rank barriers, the fewest a one-shot dispatch + combine can have (each
  signals every peer with a system-scope release and spins until every peer's flag arrived,
  then acquires at system scope): no timeout, no signature, no fault record.
- `barrier x2 + empty`: that with a third launch, the shape of a2a's small graph round (the
  fused dispatch with its barrier, the combine barrier, the gather).

    python -m bench.profile.round_floor [--tokens 1,16] [--iterations 30] [--baseline fi_functional]
"""

from __future__ import annotations

import argparse

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_wait  # noqa: E402

import a2a  # noqa: E402
from a2a.kernels.signal import _fence_acquire_system  # noqa: E402
from bench import baseline as peer  # noqa: E402
from bench.harness import L2Flush, Round, capture_graph, time_region  # noqa: E402


@triton.jit
def _empty_kernel(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit(do_not_specialize=["ep_rank"])  # one variant for every rank: a later rank's load would hang
def _floor_barrier_kernel(flags_ptr, epoch_ptr, ep_rank, EP_SIZE: tl.constexpr, PDL: tl.constexpr):
    """flags `[EP_SIZE, EP_SIZE]` int32 (row r: rank r's flags, column s written by rank s), epoch
    `[EP_SIZE]` int32 (word r: rank r's phase count)."""
    if PDL:
        gdc_wait()
    value = tl.load(epoch_ptr + ep_rank) + 1
    tl.debug_barrier()
    tl.store(epoch_ptr + ep_rank, value)
    ranks = tl.arange(0, EP_SIZE)
    tl.atomic_xchg(flags_ptr + ranks * EP_SIZE + ep_rank, tl.zeros([EP_SIZE], dtype=tl.int32) + value, sem="release",
                   scope="sys")
    own = flags_ptr + ep_rank * EP_SIZE + ranks
    while tl.min((tl.load(own, volatile=True) == value).to(tl.int32), axis=0) == 0:
        pass
    _fence_acquire_system()


class Floor:
    def __init__(self, world, pdl: bool = True):
        self.world, self.pdl = world, pdl
        ep = world.ep_size
        self.flags = torch.zeros(ep, ep, dtype=torch.int32, device="cuda")
        self.epochs = torch.zeros(ep, dtype=torch.int32, device="cuda")
        self.options = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)

    def body(self, kinds: tuple[str, ...]) -> None:
        for r in range(self.world.ep_size):
            self.world.wait_for_caller(r)
            with torch.cuda.stream(self.world.stream(r).stream):
                for kind in kinds:
                    if kind == "empty":
                        _empty_kernel[(1,)](num_warps=1, **self.options)
                    else:
                        _floor_barrier_kernel[(1,)](self.flags, self.epochs, r, EP_SIZE=self.world.ep_size,
                                                    num_warps=1, **self.options)  # fmt: skip
        self.world.join_into_caller()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--baseline", default="none")
    args = parser.parse_args()
    world = a2a.SimulatedWorld(8, "cuda")
    flush = L2Flush()
    for pdl in (True, False):
        floor = Floor(world, pdl)
        for kinds in (("empty",) * 2, ("empty",) * 3, ("barrier",) * 2, ("barrier", "barrier", "empty")):
            floor.body(kinds)  # compile and load outside the capture
            torch.cuda.synchronize()
            graph = capture_graph(lambda: floor.body(kinds))
            for _ in range(5):
                graph.replay()
            us = time_region(graph.replay, args.iterations, before=flush)
            name = " + ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))
            print(f"floor pdl={int(pdl)} {name:24s} graph {us:7.1f} us", flush=True)
            del graph
    module = peer.load(args.baseline)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        round_ = Round.build(world, tokens, "deepseek", "bf16")
        round_.check()
        round_.dispatch()
        planes = round_.fill_planes()
        round_.combine(planes)
        graph = capture_graph(lambda: (round_.dispatch(), round_.combine(planes), world.join_into_caller()))
        print(f"a2a tokens={tokens:4d} round graph {time_region(graph.replay, args.iterations, before=flush):7.1f} us",
              flush=True)
        del graph
        if module is not None:
            run = peer.FunctionalBaseline(module, world, round_.experts, round_.payloads, tokens, round_.hidden,
                                          round_.num_experts)  # fmt: skip
            run.check()
            run.dispatch()
            fi_planes = run.fill_planes()
            graph = capture_graph(lambda: (run.dispatch(), run.combine(fi_planes), world.join_into_caller()))
            us = time_region(graph.replay, args.iterations, before=flush)
            print(f"{args.baseline} tokens={tokens:4d} round graph {us:7.1f} us", flush=True)
            del graph, run
        world.synchronize()


if __name__ == "__main__":
    main()
