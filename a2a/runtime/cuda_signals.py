"""Rank streams on CUDA, and the STREAM_MEMOPS flag protocol (stream memory operations).

By default (`SignalMode.KERNEL`) the barrier of a phase runs inside its last kernel and the stream
only orders launches. With `A2A_SIGNALS=stream` the barrier is stream memory operations instead:
`set_flags` is one `cuStreamBatchMemOp` of 32-bit writes with the default memory barrier (all
earlier writes of the stream, kernels included, are visible system-wide before each flag).
`wait_flags` is one batch of `WAIT_VALUE_32 EQ FLAG_SET`, then one batch of FLAG_CLEAR writes,
stream-ordered after every wait. (On H100 / driver 580 the driver answers CUDA_ERROR_INVALID_VALUE
to waits and writes mixed in one batch, and to batched writes flagged NO_MEMORY_BARRIER.) Both capture into CUDA graphs (the
values are constants).

The parameter arrays cost ~15 us each to build in Python, so they are built once per
(kind, addresses) and reused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from a2a.runtime.driver import check, driver
from a2a import envs
from a2a.runtime.streams import FLAG_CLEAR, FLAG_SET, FlagWait, SignalMode, SignalStream

_params_cache: dict[tuple[str, tuple[int, ...]], list] = {}


def _write_op(address: int, value: int):
    cu = driver()
    op = cu.CUstreamBatchMemOpParams()
    op.writeValue.operation = cu.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WRITE_VALUE_32
    op.writeValue.address = cu.CUdeviceptr(address)
    op.writeValue.value = value
    op.writeValue.flags = cu.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT
    return op


def _wait_op(address: int, value: int):
    cu = driver()
    op = cu.CUstreamBatchMemOpParams()
    op.waitValue.operation = cu.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WAIT_VALUE_32
    op.waitValue.address = cu.CUdeviceptr(address)
    op.waitValue.value = value
    op.waitValue.flags = cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ
    return op


def _params(kind: str, addresses: tuple[int, ...]) -> list:
    key = (kind, addresses)
    params = _params_cache.get(key)
    if params is None:
        if kind == "set":
            params = [_write_op(a, FLAG_SET) for a in addresses]
        elif kind == "wait":
            params = [_wait_op(a, FLAG_SET) for a in addresses]
        else:
            params = [_write_op(a, FLAG_CLEAR) for a in addresses]
        _params_cache[key] = params
    return params


def new_cuda_stream(device: torch.device) -> torch.cuda.ExternalStream:
    """A new non-blocking driver stream on `device`, owned by the process (never destroyed: rank
    streams live as long as their world, and a world usually as long as the process)."""
    cu = driver()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)  # make sure the primary context is current
        handle = check("cuStreamCreate", cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value))
    return torch.cuda.ExternalStream(int(handle), device=device)


class CudaSignalStream(SignalStream):
    """A rank stream backed by a torch CUDA stream."""

    _wrapped: dict[int, CudaSignalStream] = {}

    def __init__(self, stream: torch.cuda.Stream):
        self.signal_mode = SignalMode.STREAM_MEMOPS if envs.signal_mode() == "stream" else SignalMode.KERNEL
        self.stream = stream
        self.device = stream.device
        self._handle = driver().CUstream(stream.cuda_stream)

    @classmethod
    def wrap(cls, stream: torch.cuda.Stream) -> CudaSignalStream:
        wrapped = cls._wrapped.get(stream.cuda_stream)
        if wrapped is None:
            wrapped = cls._wrapped[stream.cuda_stream] = cls(stream)
        return wrapped

    def submit(self, work) -> None:
        with torch.cuda.stream(self.stream):
            work()

    def set_flags(self, addresses: Sequence[int]) -> None:
        self._batch(_params("set", tuple(addresses)))

    def wait_flags(self, addresses: Sequence[int], wait: FlagWait) -> None:
        addresses = tuple(addresses)
        self._batch(_params("wait", addresses))
        self._batch(_params("clear", addresses))

    def _batch(self, params: list) -> None:
        check("cuStreamBatchMemOp", driver().cuStreamBatchMemOp(self._handle, len(params), params, 0))

    def synchronize(self) -> None:
        self.stream.synchronize()

    @contextmanager
    def activate(self) -> Iterator[CudaSignalStream]:
        """Also make the torch stream current, so allocations and launches land on it."""
        with torch.cuda.stream(self.stream), SignalStream.activate(self):
            yield self
