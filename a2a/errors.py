"""Typed errors of a2a.

Bad arguments raise the builtin `ValueError` / `TypeError` (messages name the argument, the rule and
the value). Everything else derives from `A2AError`. A fault recorded by a rank's wait (timeout,
failed peer, disagreeing peer; see `a2a.runtime.protocol`) is an `A2AFaultError`; once recorded it
is raised by every later call on that rank's workspace: the round is lost, drop the instances and
the world on every rank and build new ones.
"""

from __future__ import annotations

from a2a.runtime.faults import (
    A2AError,
    A2AFaultError,
    A2AMismatchError,
    A2APeerFailedError,
    A2ATimeoutError,
    fault_error,
)

__all__ = ["A2AError", "A2AFaultError", "A2AMismatchError", "A2APeerFailedError", "A2ATimeoutError", "PhaseError",
           "fault_error"]  # fmt: skip



class PhaseError(A2AError):
    """An operation was called in the wrong phase (e.g. combine before dispatch, or a second live
    round on a workspace)."""
