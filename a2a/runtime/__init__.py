"""Process-level machinery: rank streams and their waits, the signalling protocol's vocabulary,
driver calls, simulated worlds, and the one-process-per-rank world (bootstrap, fd exchange,
symmetric memory).

Ground floor (docs/architecture.md): knows nothing of tensor math, imports only itself and
`a2a.envs`; `world.World` is what the API needs from a world. Import the modules themselves
(`a2a.runtime.process_world`, ...): this package imports nothing eagerly, so any module of a2a can
import `a2a.runtime.protocol` without pulling in the rest.
"""
