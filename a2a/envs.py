"""Every environment variable a2a reads, in one place.

| variable | type | default | effect |
|---|---|---|---|
| `A2A_SIGNAL_TIMEOUT_S` | float > 0 | 300 | a wait for a peer's flag gives up after this many seconds: the waiting rank records the missing ranks, poisons its flags so its peers stop too, and raises `A2ATimeoutError` (on CUDA at its next a2a call or `MoeAlltoAll.synchronize()`). Read when a call signature is first seen on a workspace (a launch plan is built); a CUDA graph keeps the value it was captured with |
| `A2A_HOST_POLL_S` | float | 0.0005 | sleep between two polls of a flag in a blocking host wait |
| `A2A_PDL` | 0 or 1 | 1 | 0 turns programmatic dependent launch off everywhere; 1 uses it on GPUs that have it (compute capability 9.0 and later) unless a call passes `enable_pdl=False`. Read when a launch plan is built |
| `A2A_FUSED_COMBINE` | 0 or 1 | 1 | 1 runs the combine barrier and gather of a small round called eagerly (not under CUDA-graph capture) as one launch when its grid fits on the GPU beside every peer's (see `a2a.ops.combine`); 0 always launches them apart. Read when a launch plan is built |
| `A2A_FUSED_DISPATCH` | 0 or 1 | 1 | 1 routes and copies a round of at most one routing block (64 tokens) as one launch when its grid fits on the GPU beside every peer's and top_k <= 8 (on the CPU, rounds up to 16 tokens; see `a2a.ops.dispatch`); 0 always launches routing and copy apart. Read when a launch plan is built |
| `TRITON_INTERPRET` | bool | set to 1 by a2a when no CUDA device exists | run the Triton kernels under the Triton interpreter on the CPU (read by Triton itself) |
| `CUDA_DEVICE_MAX_CONNECTIONS` | int | set to 32 by `SimulatedWorld` on CUDA if CUDA is not initialised yet | hardware queues per device; a simulated world needs one per rank stream, or a parked wait blocks another rank's work |
| `CUDA_MODULE_LOADING` | str | set to EAGER by `SimulatedWorld` on CUDA if CUDA is not initialised yet | lazy loading of a kernel while a stream is parked in a wait (or a kernel spins on a flag) can deadlock a single-thread simulation |
"""

from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def signal_timeout_s() -> float:
    """Seconds a wait for a peer flag may take before it records a timeout (> 0)."""
    seconds = _float("A2A_SIGNAL_TIMEOUT_S", 300.0)
    if not seconds > 0:  # also NaN
        raise ValueError(f"environment variable A2A_SIGNAL_TIMEOUT_S must be a number of seconds > 0, got {seconds!r}")
    return seconds


def host_poll_s() -> float:
    """Seconds between two polls of a flag in a blocking host wait."""
    return _float("A2A_HOST_POLL_S", 0.0005)


def _switch(name: str) -> bool:
    """An on/off variable: 0 or 1 (unset or empty: 1)."""
    raw = os.environ.get(name, "1")
    if raw not in ("0", "1", ""):
        raise ValueError(f"environment variable {name} must be 0 or 1, got {raw!r}")
    return raw != "0"


def pdl_allowed() -> bool:
    """Whether launches may use programmatic dependent launch (A2A_PDL, 0 or 1)."""
    return _switch("A2A_PDL")


def fused_combine_allowed() -> bool:
    """Whether a small round's combine may run its barrier and gather as one launch (A2A_FUSED_COMBINE, 0 or 1)."""
    return _switch("A2A_FUSED_COMBINE")


def fused_dispatch_allowed() -> bool:
    """Whether a small round's dispatch may route and copy in one launch (A2A_FUSED_DISPATCH, 0 or 1)."""
    return _switch("A2A_FUSED_DISPATCH")


def use_triton_interpreter() -> bool:
    """Whether Triton kernels run under the interpreter (decided before any kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configure_triton_for_host() -> None:
    """Select the Triton interpreter when this machine has no CUDA device.

    Must run before `a2a.kernels` is imported: Triton decides between compiling and interpreting
    when a kernel is decorated. An explicit `TRITON_INTERPRET` from the user always wins. The
    device check goes through NVML, so it does not initialise the CUDA driver (CUDA_MODULE_LOADING
    and CUDA_DEVICE_MAX_CONNECTIONS can still be set afterwards).
    """
    if "TRITON_INTERPRET" in os.environ:
        return
    if not cuda_device_present():
        os.environ["TRITON_INTERPRET"] = "1"


def cuda_device_present() -> bool:
    """Whether torch sees a CUDA device, asked through NVML (no cuInit)."""
    import torch

    if torch.version.cuda is None:
        return False
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.is_available()
    finally:
        if previous is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


SIMULATION_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "32", "CUDA_MODULE_LOADING": "EAGER"}


def set_simulation_env() -> None:
    """Set what a one-process simulated world on CUDA needs; call before torch touches CUDA."""
    for name, value in SIMULATION_ENV.items():
        os.environ.setdefault(name, value)
