"""Process-level machinery: rank streams and their flag signalling, driver calls, simulated worlds.

Knows nothing of tensor math and never imports `a2a.kernels`.
"""

from a2a.runtime.simulated import SimulatedWorld
from a2a.runtime.streams import FLAG_CLEAR, FLAG_SET, FlagWait, SignalStream, current_stream

__all__ = ["FLAG_CLEAR", "FLAG_SET", "FlagWait", "SignalStream", "SimulatedWorld", "current_stream"]
