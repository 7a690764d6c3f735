"""One checker for every CUDA driver call made through `cuda.bindings.driver`."""

from __future__ import annotations

from typing import Any

from a2a.runtime.faults import A2AError


class CudaDriverError(A2AError):
    """A driver call failed; carries the call's name and the driver's explanation."""

    def __init__(self, call: str, code: Any, explanation: str):
        self.call = call
        self.code = code
        self.explanation = explanation
        super().__init__(f"{call} failed: {getattr(code, 'name', code)} ({explanation})")


def driver():
    """The `cuda.bindings.driver` module (imported on first use: CPU-only machines never need it)."""
    from cuda.bindings import driver as cu

    return cu


def check(call: str, result: Any) -> Any:
    """Unpack a `cuda.bindings` result tuple `(CUresult, *values)`; raise `CudaDriverError` on failure.

    Returns None, the single value, or the tuple of values.
    """
    cu = driver()
    if isinstance(result, tuple):
        code, values = result[0], result[1:]
    else:
        code, values = result, ()
    if code != cu.CUresult.CUDA_SUCCESS:
        name_result, text = cu.cuGetErrorString(code)
        explanation = text.decode() if name_result == cu.CUresult.CUDA_SUCCESS and text else "unknown error"
        raise CudaDriverError(call, code, explanation)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def resident_blocks_per_sm(function: int, threads: int, shared_bytes: int) -> int:
    """How many blocks of the loaded kernel `function` (a CUfunction handle as an int) with `threads`
    threads and `shared_bytes` of dynamic shared memory one SM holds at once (the occupancy API)."""
    cu = driver()
    return int(check("cuOccupancyMaxActiveBlocksPerMultiprocessor",
                     cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(cu.CUfunction(function), threads, shared_bytes)))
