"""A bound kernel launch that can be compiled and loaded ahead of time.

Why ahead of time: loading a CUDA module (what Triton does on a variant's first launch) blocks
while any stream of the context is parked in a stream wait, even with CUDA_MODULE_LOADING=EAGER
(seen on H100, driver 580). In a one-process simulated world the parked stream waits for a signal
that only this host thread can enqueue, so a first launch after a wait would hang forever. Each
launcher therefore prepares every kernel variant of its phase (also the ones a zero-token rank
skips) before it enqueues the phase's signal and wait; ranks launch identical variants, so only
the first rank to reach a phase ever loads anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from a2a import envs

_prepared: set[tuple] = set()


@dataclass
class KernelLaunch:
    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any] = field(default_factory=dict)

    def _variant_key(self) -> tuple:
        def describe(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(describe(v) for v in value)
            if hasattr(value, "data_ptr"):
                return (str(value.dtype), value.data_ptr() % 16 == 0, value.device.type)
            return type(value).__name__
        return (id(self.kernel), describe(self.args), tuple(sorted(self.constexprs.items())))

    def prepare(self) -> None:
        """Compile this variant and load it onto the device, without launching (once per variant)."""
        if envs.use_triton_interpreter():
            return
        key = self._variant_key()
        if key in _prepared:
            return
        compiled = self.kernel.warmup(*self.args, grid=self.grid or (1,), **self.constexprs)
        compiled._init_handles()
        _prepared.add(key)

    def __call__(self) -> None:
        if all(self.grid):
            self.kernel[self.grid](*self.args, **self.constexprs)
