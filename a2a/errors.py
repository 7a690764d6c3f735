"""Typed errors of a2a.

Bad arguments raise the builtin `ValueError` / `TypeError` (messages name the argument, the rule and
the value). Everything else derives from `A2AError`.
"""

from __future__ import annotations

from collections.abc import Sequence


class A2AError(RuntimeError):
    """Base class of a2a's runtime errors."""


class PhaseError(A2AError):
    """An operation was called in the wrong phase (e.g. combine before dispatch)."""


class A2ATimeoutError(A2AError):
    """A wait for peer signals did not complete; `missing_ranks` never signalled."""

    def __init__(self, what: str, waiting_rank: int, missing_ranks: Sequence[int], timeout_s: float | None):
        self.what = what
        self.waiting_rank = waiting_rank
        self.missing_ranks = tuple(missing_ranks)
        self.timeout_s = timeout_s
        after = f" within {timeout_s:g} s" if timeout_s is not None else ""
        super().__init__(
            f"{what}: rank {waiting_rank} got no signal{after} from rank(s) {list(self.missing_ranks)}"
        )
