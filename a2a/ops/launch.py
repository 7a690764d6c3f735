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

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from a2a import envs
from a2a.runtime import driver

_prepared: set[tuple] = set()
# The Triton interpreter keeps the running program's ids in globals: kernels of ranks that run in
# threads (SimulatedWorld.run_ranks on the CPU) take turns.
_interpreter_lock = threading.RLock()
# Triton versions whose compiled-kernel launcher this module calls directly (see BoundLaunch).
_LOW_LEVEL_LAUNCH_VERSIONS = ("3.4", "3.5", "3.6")


def use_pdl(device: torch.device, enable_pdl: bool | None) -> bool:
    """Whether a plan's launches on `device` use programmatic dependent launch: on a CUDA GPU of
    compute capability 9.0 or later, unless `enable_pdl` (FlashInfer's argument) is False or
    A2A_PDL=0. A launch that uses it may start while the previous kernel on its stream finishes;
    every a2a kernel waits for that kernel (`griddepcontrol.wait`) before it loads or stores (it may prefetch
    into L2 first: a2a.kernels.signal._prefetch_l2)."""
    return enable_pdl is not False and envs.pdl_allowed() and pdl_capable(device)


def pdl_capable(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL (compiled CUDA, compute capability >= 9.0)."""
    if device.type != "cuda" or envs.use_triton_interpreter():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pdl_capable:
        _pdl_capable[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _pdl_capable[index]


_pdl_capable: dict[int, bool] = {}


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream (the one a launch on it uses) is capturing a CUDA graph."""
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def pdl_constexprs(pdl: bool) -> dict[str, Any]:
    """A kernel's `PDL` constexpr and, when set, Triton's `launch_pdl` option."""
    return dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)


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
            with _interpreter_lock:
                self.kernel[self.grid](*self.args, **self.constexprs)

    def bind(self, dynamic: Sequence[str]) -> BoundLaunch:
        """Compile and load this variant; later launches pass a grid and the parameters named in `dynamic`."""
        return BoundLaunch(self, tuple(self.kernel.arg_names.index(name) for name in dynamic))


def _address(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, tuple):
        return tuple(_address(v) for v in value)
    return value


def _argument_builder(values: list, dynamic: tuple[int, ...], converts: tuple[str, ...]) -> Any:
    """A function of the dynamic values that returns every parameter in order: the fixed values
    around them as prebuilt tuples, concatenated. Generated code, because per launch it beats
    copying a list and assigning into it in a loop (0.94 vs 1.44 us for 50 parameters, CPython 3.11)."""
    params = [f"value{i}" for i in range(len(dynamic))]
    fixed: dict[str, tuple] = {}
    pieces, start = [], 0
    for i in sorted(range(len(dynamic)), key=dynamic.__getitem__):
        fixed[f"fixed{len(fixed)}"] = tuple(values[start : dynamic[i]])
        pieces += [f"fixed{len(fixed) - 1}", "(" + converts[i].format(params[i]) + ",)"]
        start = dynamic[i] + 1
    fixed[f"fixed{len(fixed)}"] = tuple(values[start:])
    pieces.append(f"fixed{len(fixed) - 1}")
    # The fixed tuples are keyword-only defaults: fast to read, and no extra argument can replace one.
    source = (f"def arguments({', '.join(params + ['*'] + [f'{name}={name}' for name in fixed])}):\n"
              f"    return {' + '.join(pieces)}\n")  # fmt: skip
    namespace: dict[str, Any] = dict(fixed)
    exec(source, namespace)  # noqa: S102 - the source is built above from parameter positions only
    return namespace["arguments"]


# How a dynamic value becomes a launcher parameter (see BoundLaunch), as an expression.
_AS_ADDRESS, _AS_ADDRESSES, _AS_IS = "{}.data_ptr()", "tuple([t.data_ptr() for t in {}])", "{}"


class BoundLaunch:
    """A compiled, loaded kernel variant whose launches change only the grid and a few arguments
    (which must not change the variant: unspecialised ints, tensors of the same dtype and alignment).

    Under the interpreter (or an untested Triton version) a launch is the ordinary
    `kernel[grid](...)`. On CUDA (`fast`) it calls the compiled kernel's C launcher directly, every
    argument already in parameter order and pointers as plain addresses: a few us of Python
    instead of ~25 us for Triton's argument binding and specialisation check.
    """

    def __init__(self, launch: KernelLaunch, dynamic: tuple[int, ...]):
        self.dynamic = dynamic
        launch.prepare()
        # Keep no reference to the caller's tensors of the first call (they can be large).
        stand_ins = tuple(None if i in dynamic else value for i, value in enumerate(launch.args))
        self.launch = KernelLaunch(launch.kernel, launch.grid, stand_ins, launch.constexprs)
        self.fast = not envs.use_triton_interpreter() and triton.__version__.startswith(_LOW_LEVEL_LAUNCH_VERSIONS)
        self._occupancy = None  # (CUfunction, threads, shared bytes) of the loaded variant, on CUDA
        if envs.use_triton_interpreter():
            return
        kernel = launch.kernel
        compiled = kernel.warmup(*launch.args, grid=launch.grid or (1,), **launch.constexprs)
        compiled._init_handles()
        self._device = torch.cuda.current_device()
        self._occupancy = (compiled.function, 32 * compiled.metadata.num_warps, compiled.metadata.shared)
        if not self.fast:
            return
        launcher = compiled.run
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            raise RuntimeError(f"{kernel.__name__} needs scratch memory; BoundLaunch does not allocate it")
        values = [_address(v) for v in stand_ins]
        values += [launch.constexprs[name] for name in kernel.arg_names[len(launch.args) :]]
        converts = tuple(
            _AS_ADDRESS if isinstance(launch.args[i], torch.Tensor) else _AS_ADDRESSES
            if isinstance(launch.args[i], tuple) else _AS_IS
            for i in dynamic
        )  # fmt: skip
        self._arguments = _argument_builder(values, dynamic, converts)
        self._launch = launcher.launch
        # (function, cooperative grid, PDL, global scratch, profile scratch, packed metadata,
        #  launch metadata, enter hook, exit hook): the C launcher's fixed leading arguments.
        self._head = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                      compiled.packed_metadata, None, None, None)  # fmt: skip

    def resident_programs(self) -> int | None:
        """Programs of this variant the whole GPU holds at once (SMs x the occupancy API's blocks per
        SM), None under the interpreter (no GPU to hold them)."""
        if self._occupancy is None:
            return None
        function, threads, shared_bytes = self._occupancy
        sms = torch.cuda.get_device_properties(self._device).multi_processor_count
        return sms * driver.resident_blocks_per_sm(function, threads, shared_bytes)

    def __call__(self, grid: tuple[int, ...], *dynamic_values: Any) -> None:
        """Launch over `grid` with `dynamic_values[i]` as the i-th parameter named at `bind` (as the
        kernel takes it: tensors, tuples of tensors, ints). An empty grid launches nothing."""
        if not all(grid):
            return
        if not self.fast:
            args = list(self.launch.args)
            for position, value in zip(self.dynamic, dynamic_values):
                args[position] = value
            with _interpreter_lock:
                self.launch.kernel[grid](*args, **self.launch.constexprs)
            return
        stream = torch._C._cuda_getCurrentRawStream(self._device)
        self._launch(grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, *self._head, *self._arguments(*dynamic_values))
