"""Where one functional call's host time goes on the GPU: the whole call, the bound launches in it
(Python of `BoundLaunch.__call__` plus the compiled launcher) and the compiled launcher alone
(argument parsing and cuLaunchKernelEx). Same rounds as bench/profile/host_per_call.py (8 simulated
ranks, DeepSeek bf16, the GPU kept asleep ahead of the host), medians per call. Runs on an older
tree too (its launch module is `a2a.launch` there):

    python -m bench.profile.host_breakdown [tokens ...]
    (cd .base && PYTHONPATH=$PWD python ../bench/profile/host_breakdown.py 16)

`--profile` adds a cProfile of rank 0's calls (top functions by own time; cProfile slows Python
calls, not the launcher, so read it for where, not for how much).
"""

import cProfile
import importlib
import importlib.util
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

from a2a import envs

envs.set_simulation_env()

# host_per_call beside this file (an older tree on PYTHONPATH may have no bench/profile/).
_spec = importlib.util.spec_from_file_location("host_per_call", Path(__file__).with_name("host_per_call.py"))
host_per_call = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_per_call)
functional_round = host_per_call.functional_round

launch_module = importlib.import_module("a2a.ops.launch" if importlib.util.find_spec("a2a.ops") else "a2a.launch")
ROUNDS = 200
_spent = {"bound": 0, "launcher": 0, "launches": 0}


def _instrument() -> None:
    """Count the time of every bound launch and of its compiled launcher call (perf_counter_ns)."""
    bound_class = launch_module.BoundLaunch
    call, init = bound_class.__call__, bound_class.__init__

    def timed_call(self, *args, **kwargs):
        begin = time.perf_counter_ns()
        call(self, *args, **kwargs)
        _spent["bound"] += time.perf_counter_ns() - begin
        _spent["launches"] += 1

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        launcher = getattr(self, "_launch", None)
        if launcher is None:
            return

        def timed_launcher(*values):
            begin = time.perf_counter_ns()
            launcher(*values)
            _spent["launcher"] += time.perf_counter_ns() - begin

        self._launch = timed_launcher

    bound_class.__call__, bound_class.__init__ = timed_call, timed_init


def measure(tokens: int, profile: bool) -> None:
    round_ = host_per_call.checked_round(tokens)
    world = round_.world
    rounds = []  # (dispatch us, combine us, then per call: launches, us in bound launches, us in the launcher)
    for i in range(ROUNDS + host_per_call.WARM_UP_ROUNDS):
        host_per_call.keep_the_gpu_ahead(world, i)
        before = dict(_spent)
        dispatch, combine = functional_round(round_)
        if i >= host_per_call.WARM_UP_ROUNDS:  # a round is 16 calls (8 ranks, two ops)
            rounds.append((statistics.median(dispatch), statistics.median(combine),
                           (_spent["launches"] - before["launches"]) / 16, (_spent["bound"] - before["bound"]) / 16e3,
                           (_spent["launcher"] - before["launcher"]) / 16e3))  # fmt: skip
    world.synchronize()
    dispatch, combine, launches, bound, launcher = (statistics.median(column) for column in zip(*rounds))
    print(f"host {tokens:5d} tokens: dispatch {dispatch:5.1f} us, combine {combine:5.1f} us a call; per call "
          f"{launches:.2f} launches, {bound:4.1f} us in bound launches, {launcher:4.1f} us of it in the compiled "
          f"launcher ({launcher / max(launches, 1e-9):.2f} us a launch); medians of {len(rounds)} rounds", flush=True)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(100):
            functional_round(round_)
        profiler.disable()
        world.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--profile"]
    _instrument()
    for tokens in [int(t) for t in args] or [16]:
        measure(tokens, "--profile" in sys.argv)


if __name__ == "__main__":
    main()
