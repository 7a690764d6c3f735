"""Process-level machinery: rank streams and their flag signalling, driver calls, simulated worlds,
and the one-process-per-rank world (bootstrap, fd exchange, symmetric memory).

Knows nothing of tensor math and never imports `a2a.kernels`.
"""

from a2a.runtime.bootstrap import (
    Bootstrap,
    MpiBootstrap,
    SingleProcessBootstrap,
    TorchDistributedBootstrap,
    bootstrap_from,
)
from a2a.runtime.process_world import ProcessWorld
from a2a.runtime.simulated import SimulatedWorld
from a2a.runtime.streams import FLAG_CLEAR, FLAG_SET, FlagWait, SignalStream, current_stream

__all__ = [
    "FLAG_CLEAR",
    "FLAG_SET",
    "Bootstrap",
    "FlagWait",
    "MpiBootstrap",
    "ProcessWorld",
    "SignalStream",
    "SimulatedWorld",
    "SingleProcessBootstrap",
    "TorchDistributedBootstrap",
    "bootstrap_from",
    "current_stream",
]
