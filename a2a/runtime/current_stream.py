"""The rank stream an a2a op runs on: the one activated in this thread, else the device's own."""

from __future__ import annotations

import torch

from a2a.runtime.cuda_signals import CudaSignalStream
from a2a.runtime.host_signals import default_host_stream
from a2a.runtime.streams import SignalStream, _active


def current_stream(device: torch.device) -> SignalStream:
    """The stream an op on `device` runs on: the activated one, else the device's current stream."""
    stack = _active()
    if stack and stack[-1].device.type == device.type:
        return stack[-1]
    if device.type == "cuda":
        return CudaSignalStream.wrap(torch.cuda.current_stream(device))
    return default_host_stream()
