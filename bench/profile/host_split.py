"""Where a functional call's host time goes on the GPU, split by subtraction in ONE process.

    python -m bench.profile.host_split [tokens ...] [--batches N] [--profile]

The rounds of bench/profile/host_per_call.py (8 simulated ranks, DeepSeek bf16, the GPU kept asleep
ahead of the host), in batches whose every bound launch's compiled launcher is
  launch: called as usual;
  parse:  called with an empty grid (it parses every argument, then skips cuLaunchKernelEx);
  python: not called at all (the op's Python and torch calls only).
Batches of the three modes are alternated (ABC, CBA, ...); every rank skips the same rounds, so
the device state stays consistent and the last round is checked against the reference. So
launch - parse is the driver's launch call, parse - python the launcher's argument parsing.

Then the floor of one launch through the same path: an empty Triton kernel with 1 and with 40 int
parameters, with and without PDL, launched 2000 times (median per launch), and torch's own empty
kernel (`torch.cuda._sleep(0)`). `--profile` adds a cProfile of rank 0's calls in launch mode
(read it for where, not for how much: cProfile slows Python calls, not C ones).
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

from a2a.ops import launch as launch_module  # noqa: E402
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


def _batch(round_, mode: str) -> tuple[list[float], list[float]]:
    world = round_.world
    world.synchronize()
    for r in range(world.ep_size):
        with world.stream(r).activate():
            torch.cuda._sleep(host_per_call.SLEEP_CYCLES)
    _set_mode(mode)
    dispatch_us, combine_us = [], []
    for _ in range(ROUNDS_PER_BATCH):
        dispatch, combine = host_per_call.functional_round(round_)
        dispatch_us += dispatch
        combine_us += combine
    _set_mode("launch")
    world.synchronize()
    return dispatch_us, combine_us


def split(tokens: int, batches: int, profile: bool) -> None:
    round_ = host_per_call.checked_round(tokens)
    calls = {mode: ([], []) for mode in MODES}
    for i in range(batches + 1):  # batch 0 of each mode warms up
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            dispatch, combine = _batch(round_, mode)
            if i:
                calls[mode][0].extend(dispatch)
                calls[mode][1].extend(combine)
    round_.check()  # the rounds that launched left every rank's state consistent
    for op, name in enumerate(("dispatch", "combine")):
        medians = {mode: statistics.median(calls[mode][op]) for mode in MODES}
        print(f"host split {tokens:5d} tokens {name:8s}: whole call {medians['launch']:5.1f} us = Python and torch "
              f"{medians['python']:5.1f} + launcher parsing {medians['parse'] - medians['python']:4.1f} + "
              f"cuLaunchKernelEx {medians['launch'] - medians['parse']:4.1f} (medians of {len(calls['launch'][op])} "
              f"calls a mode)", flush=True)  # fmt: skip
    if profile:
        profiler = cProfile.Profile()
        world = round_.world
        for _ in range(5):
            world.synchronize()
            for r in range(world.ep_size):
                with world.stream(r).activate():
                    torch.cuda._sleep(host_per_call.SLEEP_CYCLES)
            profiler.enable()
            for _ in range(ROUNDS_PER_BATCH):
                host_per_call.functional_round(round_)
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
    args = parser.parse_args()
    _register_bound_launches()
    for tokens in args.tokens:
        split(tokens, args.batches, args.profile)
    launch_floor()


if __name__ == "__main__":
    main()
