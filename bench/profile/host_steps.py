"""Host time of each step of a functional dispatch and combine on the GPU, medians per step.

    python -m bench.profile.host_steps [tokens ...]

The rounds of bench/profile/host_per_call.py (8 simulated ranks, DeepSeek bf16, the GPU kept asleep
ahead of the host), every call made of the steps of `moe_a2a_dispatch` / `moe_a2a_combine` (their
CUDA path, in their order, the same functions) with a clock read between two steps; the combine
takes its payload in the workspace. The whole op is timed in the same batches for comparison (the
clock reads add about 0.1 us a step). Each batch ends with a checked round, so the steps did
what the ops do. If an op's body changes, this file must follow it (it says which steps it times).
"""

from __future__ import annotations

import statistics
import sys
import time

from a2a import envs

envs.set_simulation_env()

import torch  # noqa: E402

from a2a.ops import combine as combine_ops, dispatch as dispatch_ops, validation  # noqa: E402
from a2a.ops.context import resolve_context  # noqa: E402
from bench.profile import host_per_call  # noqa: E402
from bench.profile.host_split import _asleep, _in_workspace_planes  # noqa: E402

BATCHES, ROUNDS_PER_BATCH = 20, 10


class Steps:
    """Per-step host ns of the calls made through `dispatch` / `combine`."""

    def __init__(self):
        self.ns: dict[str, list[int]] = {}

    def mark(self, name: str, begin: int) -> int:
        now = time.perf_counter_ns()
        self.ns.setdefault(name, []).append(now - begin)
        return time.perf_counter_ns()

    def dispatch(self, experts, payloads, workspace, metainfo, rt, ep_rank, ep_size, top_k, num_experts):
        """moe_a2a_dispatch's CUDA path with the defaults of its optional arguments."""
        t = time.perf_counter_ns()
        validation.check_backend("trtllm")
        validation.check_enable_pdl(None)
        mask = validation.rank_mask_argument(None, False, ep_size)
        t = self.mark("d: argument checks", t)
        rank_workspace = resolve_context(workspace, metainfo, ep_rank)
        t = self.mark("d: resolve_context", t)
        rank_workspace.raise_if_faulted()
        rank_workspace.check_no_live_round("moe_a2a_dispatch", 0)
        t = self.mark("d: fault and live-round checks", t)
        key, rows = dispatch_ops._plan_key(experts, payloads, None, rt, ep_size, top_k, num_experts, mask, None, None)
        t = self.mark("d: plan key", t)
        plan = rank_workspace.find_plan(key)
        num_tokens = rows if plan is not None and 0 <= rows <= rt else None
        rank_workspace.check_returning_ranks(plan.active_rank_mask)
        t = self.mark("d: find plan, token count, returning ranks", t)
        plan.launch(experts, payloads, None, num_tokens, None)
        t = self.mark("d: plan.launch (bound launches)", t)
        rank_workspace.begin_round("moe_a2a_dispatch", 0, num_tokens, rt, plan.combine_offset, plan.active_rank_mask)
        self.mark("d: begin_round", t)
        return plan.recv, plan.combine_offset

    def combine(self, payload, local_num_tokens, workspace, metainfo, rt, ep_rank, ep_size, top_k, offset,
                payload_in_workspace=True):  # fmt: skip
        """moe_a2a_combine's CUDA path, payload in the workspace, other arguments at their defaults."""
        assert payload_in_workspace, "host_steps times the in-workspace combine"
        t = time.perf_counter_ns()
        validation.check_backend("trtllm")
        validation.check_enable_pdl(None)
        validation.check_combine_output_format(None, None, combine_ops.SfLayout.layout_linear)
        mask = validation.rank_mask_argument(None, False, ep_size)
        t = self.mark("c: argument checks", t)
        rank_workspace = resolve_context(workspace, metainfo, ep_rank)
        t = self.mark("c: resolve_context", t)
        rank_workspace.raise_if_faulted()
        live = rank_workspace.live_round_for("moe_a2a_combine", 0)
        combine_ops.check_matches_dispatch(live, local_num_tokens, rt, offset)
        t = self.mark("c: fault and live-round checks", t)
        key = combine_ops._plan_key(payload, None, None, rt, ep_size, top_k, offset, payload_in_workspace, mask, None)
        t = self.mark("c: plan key", t)
        plan = rank_workspace.find_plan(key)
        if plan is None or not plan.accepts(payload, None, local_num_tokens, None):
            raise RuntimeError("host_steps: the combine's plan was not built by the warm-up round")
        t = self.mark("c: find plan, accepts", t)
        output = torch.empty((local_num_tokens, plan.hidden), dtype=plan.output_dtype, device=plan.device)
        t = self.mark("c: torch.empty (output)", t)
        plan.launch(payload, None, local_num_tokens, output)
        t = self.mark("c: plan.launch (bound launches)", t)
        rank_workspace.end_round()
        self.mark("c: end_round", t)
        return output


def _round(round_, planes, steps: Steps | None) -> tuple[list[float], list[float]]:
    """One round of functional calls, the combine in the workspace (steps timed when `steps` is given)."""
    if steps is None:
        return host_per_call.functional_round(round_, planes)
    return host_per_call.functional_round(round_, planes, steps.dispatch, steps.combine)


def measure(tokens: int) -> None:
    round_ = host_per_call.checked_round(tokens)
    planes = _in_workspace_planes(round_)
    steps = Steps()
    whole: dict[str, tuple[list, list]] = {"op": ([], []), "steps": ([], [])}
    for i in range(BATCHES + 1):  # batch 0 warms up (and builds the functional plans)
        for name in ("op", "steps") if i % 2 == 0 else ("steps", "op"):
            _asleep(round_.world)
            for _ in range(ROUNDS_PER_BATCH):
                dispatch_us, combine_us = _round(round_, planes, steps if name == "steps" and i else None)
                if i:
                    whole[name][0].extend(dispatch_us)
                    whole[name][1].extend(combine_us)
            round_.world.synchronize()
    round_.check()
    for op, label in enumerate(("dispatch", "combine, in workspace")):
        print(f"host steps {tokens:5d} tokens {label}: the op {statistics.median(whole['op'][op]):5.1f} us, its steps "
              f"timed {statistics.median(whole['steps'][op]):5.1f} us (medians of {len(whole['op'][op])} calls)")
    for name, values in steps.ns.items():
        print(f"host steps {tokens:5d} tokens   {name:44s} {statistics.median(values) / 1e3:5.2f} us")
    sys.stdout.flush()


def main() -> None:
    for tokens in [int(t) for t in sys.argv[1:]] or [1, 16]:
        measure(tokens)


if __name__ == "__main__":
    main()
