"""Process-level machinery: rank streams and their waits, the signalling protocol's vocabulary,
driver calls, simulated worlds, and the one-process-per-rank world (bootstrap, fd exchange,
symmetric memory).

Knows nothing of tensor math and never imports `a2a.kernels`. Import the modules themselves
(`a2a.runtime.process_world`, ...): this package imports nothing eagerly, so any module of a2a can
import `a2a.runtime.protocol` without pulling in the rest.
"""
