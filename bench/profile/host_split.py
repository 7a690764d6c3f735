"""Where a functional call's host time goes on the GPU, split by subtraction in ONE process.

    python -m bench.profile.host_split [tokens ...] [--batches N] [--profile]

The rounds of bench/profile/host_per_call.py (8 simulated ranks, DeepSeek bf16, the GPU kept asleep
ahead of the host; every other round's combine takes its payload in the workspace instead of
staging it), in batches whose every bound launch's compiled launcher is
  launch: called as usual;
  parse:  called with an empty grid (it parses every argument, then skips cuLaunchKernelEx);
  python: not called at all (the op's Python and torch calls only).
Batches of the three modes are alternated (ABC, CBA, ...); every rank skips the same rounds, so
the device state stays consistent and the last round is checked against the reference. So
launch - parse is the driver's launch call, parse - python the launcher's argument parsing.

Then the floor of one launch through the same path: an empty Triton kernel with 1 and with 40 int
parameters, with and without PDL, launched 2000 times (median per launch), and torch's own empty
kernel (`torch.cuda._sleep(0)`). `--profile` adds a cProfile of the calls in launch mode (read
it for where, not for how much: cProfile slows Python calls, not C ones). `--baseline MODULE`
(e.g. fi_functional) times that library's functional calls on the same inputs in batches of
their own, alternated with a2a's (its combine with the payload in the workspace; at most
bench.baseline.MAX_CONCURRENT_COMBINE_ROWS rows, else its dispatch only).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import a2a  # noqa: E402
from a2a.ops import launch as launch_module  # noqa: E402
from a2a.workspace import segment_view  # noqa: E402
from bench import baseline as peer  # noqa: E402
from bench.profile import host_per_call  # noqa: E402

MODES = ("launch", "parse", "python")
ROUNDS_PER_BATCH = 10
_bound: list = []


def _register_bound_launches() -> None:
    """Keep every BoundLaunch built from now on, with its real compiled launcher."""
    init = launch_module.BoundLaunch.__init__

    def registering_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if getattr(self, "_launch", None) is not None:
            self._real_launch = self._launch
            _bound.append(self)

    launch_module.BoundLaunch.__init__ = registering_init


def _set_mode(mode: str) -> None:
    for bound in _bound:
        real = bound._real_launch
        if mode == "launch":
            bound._launch = real
        elif mode == "parse":
            bound._launch = lambda grid_x, *rest, _real=real: _real(0, *rest)
        else:
            bound._launch = lambda *values: None


def _in_workspace_planes(round_) -> list:
    """Each rank's combine plane for the round's geometry, at the offset its dispatch returns."""
    planes = []
    for r, moe in enumerate(round_.ranks):
        row_bytes = [p.shape[1] * p.element_size() for p in round_.payloads[r]]
        offset = a2a.WorkspaceLayout.from_metainfo(moe.metainfo).round_layout(round_.tokens, row_bytes).combine_offset
        planes.append(segment_view(moe.workspace, r, offset, torch.bfloat16,
                                   (round_.world.ep_size, round_.tokens, round_.hidden)))  # fmt: skip
    return planes


def _baseline_round(run) -> tuple[list[float], list[float]]:
    """The baseline library's functional calls, each rank's on its own stream: host us per call."""
    world, ep, tokens = run.world, run.ep_size, run.tokens
    dispatch_us, combine_us = [], []
    for r in range(ep):
        with world.stream(r).activate():
            begin = time.perf_counter()
            recv, run.offsets[r], _ = run.module.moe_a2a_dispatch(run.experts[r], run.payloads[r], run.workspace,
                                                                  run.metainfo[r], tokens, r, ep, run.top_k,
                                                                  run.num_experts)  # fmt: skip
            dispatch_us.append((time.perf_counter() - begin) * 1e6)
    if not run.combine_runs_concurrently:
        return dispatch_us, combine_us
    planes = run.planes()
    for r in range(ep):
        with world.stream(r).activate():
            begin = time.perf_counter()
            run.module.moe_a2a_combine(planes[r], tokens, run.workspace, run.metainfo[r], tokens, r, ep, run.top_k,
                                       run.offsets[r], payload_in_workspace=True)  # fmt: skip
            combine_us.append((time.perf_counter() - begin) * 1e6)
    return dispatch_us, combine_us


def _asleep(world) -> None:
    world.synchronize()
    for r in range(world.ep_size):
        with world.stream(r).activate():
            torch.cuda._sleep(host_per_call.SLEEP_CYCLES)


def _batch(round_, planes, mode: str) -> tuple[list[float], list[float], list[float]]:
    """ROUNDS_PER_BATCH rounds in `mode`: host us of each dispatch, staged combine, in-workspace combine."""
    world = round_.world
    _asleep(world)
    _set_mode(mode)
    dispatch_us, staged_us, in_workspace_us = [], [], []
    for i in range(ROUNDS_PER_BATCH):
        dispatch, combine = host_per_call.functional_round(round_, planes if i % 2 else None)
        dispatch_us += dispatch
        (in_workspace_us if i % 2 else staged_us).extend(combine)
    _set_mode("launch")
    world.synchronize()
    return dispatch_us, staged_us, in_workspace_us


def _baseline_batch(run) -> tuple[list[float], list[float]]:
    _asleep(run.world)
    dispatch_us, combine_us = [], []
    for _ in range(ROUNDS_PER_BATCH):
        dispatch, combine = _baseline_round(run)
        dispatch_us += dispatch
        combine_us += combine
    run.world.synchronize()
    return dispatch_us, combine_us


def split(tokens: int, batches: int, profile: bool, baseline_module=None) -> None:
    round_ = host_per_call.checked_round(tokens)
    planes = _in_workspace_planes(round_)
    run = None
    if baseline_module is not None:
        run = peer.FunctionalBaseline(baseline_module, round_.world, round_.experts, round_.payloads, tokens,
                                      round_.hidden, round_.num_experts)  # fmt: skip
        run.check()
    ops = ("dispatch", "combine, staged", "combine, in workspace")
    calls = {mode: ([], [], []) for mode in MODES}
    peer_calls: tuple[list, list] = ([], [])
    for i in range(batches + 1):  # batch 0 of each mode warms up
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            measured = _batch(round_, planes, mode)
            if i:
                for op, values in enumerate(measured):
                    calls[mode][op].extend(values)
        if run is not None:
            measured = _baseline_batch(run)
            if i:
                for op, values in enumerate(measured):
                    peer_calls[op].extend(values)
    round_.check()  # the rounds that launched left every rank's state consistent
    for op, name in enumerate(ops):
        medians = {mode: statistics.median(calls[mode][op]) for mode in MODES}
        print(f"host split {tokens:5d} tokens {name:22s}: whole call {medians['launch']:5.1f} us = Python and torch "
              f"{medians['python']:5.1f} + launcher parsing {medians['parse'] - medians['python']:4.1f} + "
              f"cuLaunchKernelEx {medians['launch'] - medians['parse']:4.1f} (medians of {len(calls['launch'][op])} "
              f"calls a mode)", flush=True)  # fmt: skip
    if run is not None:
        for op, name in enumerate(("dispatch", "combine, in workspace")):
            if peer_calls[op]:
                print(f"host split {tokens:5d} tokens {name:22s}: baseline {baseline_module.__name__} "
                      f"{statistics.median(peer_calls[op]):5.1f} us a call (medians of {len(peer_calls[op])})", flush=True)
    if profile:
        profiler = cProfile.Profile()
        world = round_.world
        for _ in range(5):
            _asleep(world)
            profiler.enable()
            for i in range(ROUNDS_PER_BATCH):
                host_per_call.functional_round(round_, planes if i % 2 else None)
            profiler.disable()
        world.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue(), flush=True)


@triton.jit
def _empty_kernel(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                  a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39,
                  PDL: tl.constexpr):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _empty_kernel_1(a0, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


def launch_floor(launches: int = 2000) -> None:
    """Median host us of one launch of an empty kernel through BoundLaunch, and of torch's."""
    for kernel, count in ((_empty_kernel_1, 1), (_empty_kernel, 40)):
        for pdl in (False, True):
            args = tuple(range(1000, 1000 + count))  # ints above 16 and not 1: no specialisation
            bound = launch_module.KernelLaunch(kernel, (1,), args, launch_module.pdl_constexprs(pdl)).bind(
                dynamic=("a0",))
            times = []
            for i in range(launches):
                begin = time.perf_counter_ns()
                bound((1,), 1000 + i % 7)
                times.append(time.perf_counter_ns() - begin)
            torch.cuda.synchronize()
            print(f"launch floor: empty kernel, {count:2d} int parameters, PDL {pdl!s:5}: "
                  f"{statistics.median(times) / 1e3:4.1f} us a BoundLaunch call (median of {launches})", flush=True)
    times = []
    for _ in range(launches):
        begin = time.perf_counter_ns()
        torch.cuda._sleep(0)
        times.append(time.perf_counter_ns() - begin)
    torch.cuda.synchronize()
    print(f"launch floor: torch.cuda._sleep(0): {statistics.median(times) / 1e3:4.1f} us a call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--baseline", default="none", help="a module with FlashInfer's functional API (bench.baseline)")
    args = parser.parse_args()
    _register_bound_launches()
    baseline_module = peer.load(args.baseline)
    for tokens in args.tokens:
        split(tokens, args.batches, args.profile, baseline_module)
    launch_floor()


if __name__ == "__main__":
    main()
