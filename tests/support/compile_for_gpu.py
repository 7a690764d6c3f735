"""Compile every a2a kernel variant for a GPU target on a machine without one (the CPU in CI).

The interpreter never runs the GPU-only branches (the in-kernel waits, the host-mapped fault
record), so this builds each launcher's real arguments on a CPU workspace and compiles the
kernels for sm_90 through Triton's full pipeline (ptxas included), with a stand-in driver that
only names the target. Run as a script (TRITON_INTERPRET must be 0 before Triton is imported):

    TRITON_INTERPRET=0 python -m tests.support.compile_for_gpu

Prints one line per compiled kernel; exits non-zero on the first compile error.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

HOST_RECORD_STAND_IN = 1 << 40  # any 64-bit address: the kernels take it as an int64


class _TargetOnlyDriver:
    """What Triton asks of a driver to compile (not to launch)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _gpu_variant(launch):
    """The launch as CUDA runs it on sm_90: waits in the kernel, a host-mapped fault record,
    programmatic dependent launch (griddepcontrol)."""
    args = tuple(HOST_RECORD_STAND_IN if name == "host_record_ptr" else value
                 for name, value in zip(launch.kernel.arg_names, launch.args))  # fmt: skip
    constexprs = dict(launch.constexprs)
    for name in ("WAIT", "HAS_HOST_RECORD", "PDL"):
        if name in constexprs:
            constexprs[name] = True
    if constexprs.get("PDL"):
        constexprs["launch_pdl"] = True
    return args, constexprs


# PTX instructions that touch global memory (parameter loads, `ld.param`, do not; nor does
# `prefetch.global.L2`, a2a.kernels.signal._prefetch_l2: it returns no data, so it may come first).
_MEMORY_OPS = ("ld.global", "st.global", "atom.", "red.", "ld.volatile", "st.volatile", "ld.relaxed", "st.relaxed",
               "ld.acquire", "st.release", "cp.async")  # fmt: skip


def _waits_before_memory(ptx: str) -> str:
    """Launched with PDL, a kernel that touches memory before `griddepcontrol.wait` races the
    previous kernel: the wait must come before every global load, store and atomic."""
    at = ptx.find("griddepcontrol.wait")
    if at < 0:
        return "NO griddepcontrol.wait"
    early = [op for op in _MEMORY_OPS if op in ptx[:at]]
    return f"touches memory ({', '.join(early)}) before griddepcontrol.wait" if early else "waits for the previous kernel"


def compile_all() -> list[str]:
    driver.set_active(_TargetOnlyDriver())
    import a2a
    from a2a.ops.barrier import signature_tensor
    from a2a.ops.combine import _fused_launch, _gather_launch, _stage_launch, barrier_launch
    from a2a.ops.dispatch import _copy_launch, _fused_launch as _fused_dispatch_launch, _route_launch, _share_stats_launch
    from a2a.layout import WorkspaceLayout
    from a2a.ops.sanitize import expert_id_sanitize_launch
    from a2a.workspace import RankWorkspace

    ep_size, max_tokens, top_k, num_experts, hidden = 8, 64, 8, 64, 7168
    payloads = [torch.zeros(16, hidden, dtype=torch.bfloat16), torch.zeros(16, top_k, dtype=torch.int32),
                torch.zeros(16, top_k, dtype=torch.float32)]  # fmt: skip
    row_bytes = [p.shape[1] * p.element_size() for p in payloads]
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, max_tokens, row_bytes, hidden * 2, 16)
    workspace = torch.zeros(ep_size, size, dtype=torch.uint8)
    layout = WorkspaceLayout.compute(ep_size, max_tokens, 16)
    rank_workspace = RankWorkspace(workspace, layout, 1)
    round_layout = layout.round_layout(32, row_bytes)
    mask = (1 << ep_size) - 1
    signature = signature_tensor([], workspace.device)
    experts = payloads[1]
    count = rank_workspace.round_state
    plane = torch.zeros(ep_size, 32, hidden, dtype=torch.bfloat16)
    output = torch.zeros(16, hidden, dtype=torch.bfloat16)
    copy = _copy_launch(rank_workspace, payloads, count, False, round_layout, top_k, signature, mask, True)[0]
    launches = [
        ("route (one block)", _route_launch(rank_workspace, experts, count, False, top_k, num_experts, mask, True,
                                            True)),
        ("route (blocks)", _route_launch(rank_workspace, experts, count, False, top_k, num_experts, mask, True, False)),
        ("route (device count)", _route_launch(rank_workspace, experts, count, True, top_k, num_experts, mask, True,
                                               False)),
        ("dispatch copy", copy),
        ("fused dispatch (16-token block)", _fused_dispatch_launch(copy, rank_workspace, experts, top_k, num_experts,
                                                                   mask, 16)),
        ("fused dispatch (64-token block)", _fused_dispatch_launch(copy, rank_workspace, experts, top_k, num_experts,
                                                                   mask, 64)),
        ("combine barrier", barrier_launch(rank_workspace, signature, mask, 32, top_k, True, gate=True)),
        ("combine barrier (comparing)", barrier_launch(rank_workspace, signature, mask, 32, top_k, True, gate=True,
                                                       compare=True)),
        ("stage", _stage_launch(rank_workspace, plane, round_layout.combine_offset)),
        ("gather", _gather_launch(rank_workspace, plane, round_layout.combine_offset, output, top_k, None, mask,
                                  signature, True)),
        ("gather (the barrier compared)", _gather_launch(rank_workspace, plane, round_layout.combine_offset, output,
                                                         top_k, None, mask, signature, True, compare=False)),
        ("gather (fp8 with scales)", _gather_launch(rank_workspace, plane.to(torch.float8_e4m3fn),
                                                    round_layout.combine_offset, output, top_k,
                                                    round_layout.combine_offset + 16 * 1024 * 1024, mask, signature,
                                                    True)),
        ("fused combine", _fused_launch(rank_workspace, plane, round_layout.combine_offset, output, top_k, None, mask,
                                        signature, 32, True)),
        ("fused combine (fp8 with scales)", _fused_launch(rank_workspace, plane.to(torch.float8_e4m3fn),
                                                          round_layout.combine_offset, output, top_k,
                                                          round_layout.combine_offset + 16 * 1024 * 1024, mask,
                                                          signature, 32, True)),
        ("sanitize", expert_id_sanitize_launch(rank_workspace, 32, top_k)),
        ("share EPLB stats", _share_stats_launch(rank_workspace, mask)),
    ]  # fmt: skip
    done = []
    for name, launch in launches:
        args, constexprs = _gpu_variant(launch)
        compiled = launch.kernel.warmup(*args, grid=launch.grid, **constexprs)
        waits = _waits_before_memory(compiled.asm["ptx"])
        done.append(f"{name}: {launch.kernel.__name__} compiled for sm_90 ({len(compiled.asm['cubin'])} bytes of cubin, "
                    f"{waits})")
    return done


if __name__ == "__main__":
    for line in compile_all():
        print(line)
