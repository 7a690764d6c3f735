"""Launchers: from a validated call to launched kernels, one plan per call signature.

Floor 2 of a2a (docs/architecture.md): builds on the data model (`a2a.layout`, `a2a.workspace`),
the kernels and the runtime; the API (`a2a.moe_alltoall`, `a2a.functional`, `a2a.torch_ops`) is
a thin adapter over it. `context.RankContext` holds a rank's views and plans.
"""
