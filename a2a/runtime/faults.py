"""The errors a rank's recorded fault turns into, and the decoder of a fault record.

`fault_error` reads the words of `a2a.runtime.protocol.FaultRecord` (written by the kernels'
waits, or by the host waits on the CPU) and returns the typed error they describe. `a2a.errors`
re-exports every class here with the rest of a2a's typed errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from a2a.runtime import protocol
from a2a.runtime.protocol import FaultKind, FaultRecord, Phase


class A2AError(RuntimeError):
    """Base class of a2a's runtime errors."""


class A2AFaultError(A2AError):
    """A rank's round failed: `what` names the wait, `waiting_rank` the rank that recorded it and
    `ranks` the peers responsible. Subclasses say how."""

    def __init__(self, what: str, waiting_rank: int, ranks: Sequence[int], message: str):
        self.what = what
        self.waiting_rank = waiting_rank
        self.ranks = tuple(ranks)
        super().__init__(message)


class A2ATimeoutError(A2AFaultError):
    """A wait for peer signals did not complete; `missing_ranks` never signalled."""

    def __init__(self, what: str, waiting_rank: int, missing_ranks: Sequence[int], timeout_s: float | None,
                 detail: str = ""):  # fmt: skip
        self.missing_ranks = tuple(missing_ranks)
        self.timeout_s = timeout_s
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        super().__init__(what, waiting_rank, missing_ranks,
                         f"{what}: rank {waiting_rank} got no signal{within} from rank(s) {list(missing_ranks)}{detail}")  # fmt: skip


class A2APeerFailedError(A2AFaultError):
    """A peer recorded a fault first and poisoned its flags; this rank consumed none of its data."""

    def __init__(self, what: str, waiting_rank: int, failed_ranks: Sequence[int], missing_ranks: Sequence[int] = ()):
        self.failed_ranks = tuple(failed_ranks)
        self.missing_ranks = tuple(missing_ranks)
        still = f"; rank(s) {list(missing_ranks)} had not signalled either" if missing_ranks else ""
        super().__init__(what, waiting_rank, failed_ranks,
                         f"{what}: rank {waiting_rank} stopped: rank(s) {list(failed_ranks)} failed earlier "
                         f"(timed out, saw a failed peer or a disagreeing round) and poisoned their signals{still}")  # fmt: skip


class A2AMismatchError(A2AFaultError):
    """Peers disagree with this rank on the round's geometry (`fields`); no data of theirs was used."""

    def __init__(self, what: str, waiting_rank: int, ranks: Sequence[int], fields: Sequence[str], detail: str,
                 message: str | None = None):  # fmt: skip
        self.fields = tuple(fields)
        super().__init__(what, waiting_rank, ranks, message or (
            f"{what}: rank {waiting_rank}'s round disagrees with rank(s) {list(ranks)} on {', '.join(fields)} "
            f"({detail}); every rank must call with the same values"))  # fmt: skip


def fault_error(record: Sequence[int], waiting_rank: int) -> A2AFaultError | None:
    """The error a fault record (`protocol.FaultRecord` words) describes, or None if none is recorded."""
    phase_code = record[FaultRecord.PHASE]
    if phase_code == 0:
        return None
    try:
        phase = Phase(phase_code)
        what = protocol.PHASE_NAMES[phase]
    except ValueError:
        phase, what = None, f"phase {phase_code}"
    ranks = protocol.ranks_of(record[FaultRecord.RANKS_LOW], record[FaultRecord.RANKS_HIGH])
    kind = record[FaultRecord.KIND]
    if kind == FaultKind.PEER_FAILED:
        missing = protocol.ranks_of(record[FaultRecord.MISSING_LOW], record[FaultRecord.MISSING_HIGH])
        return A2APeerFailedError(what, waiting_rank, ranks, missing)
    if kind == FaultKind.ROUND_MISMATCH:
        word = record[FaultRecord.FIRST_FIELD]
        name = protocol.COMBINE_CHECK_FIELDS[word] if 0 <= word < len(protocol.COMBINE_CHECK_FIELDS) else "geometry"
        detail = f"{record[FaultRecord.OWN_VALUE]} in the combine, {record[FaultRecord.PEER_VALUE]} in the dispatch"
        return A2AMismatchError(what, waiting_rank, [waiting_rank], [name], detail,
                                f"{what}: rank {waiting_rank}'s combine does not match its own dispatch on {name} "
                                f"({detail}); it read nothing and wrote NaN")  # fmt: skip
    if kind == FaultKind.MISMATCH:
        names = protocol.SIGNATURE_FIELDS.get(phase, ())
        bits = record[FaultRecord.FIELDS] & 0xFFFFFFFF
        fields = [names[w] if w < len(names) else f"signature word {w}" for w in range(32) if bits >> w & 1]
        word = record[FaultRecord.FIRST_FIELD]
        detail = "values not recorded"
        if 0 <= word < 32 and bits >> word & 1:
            name = names[word] if word < len(names) else f"signature word {word}"
            own = protocol.describe_value(name, record[FaultRecord.OWN_VALUE])
            peer = protocol.describe_value(name, record[FaultRecord.PEER_VALUE])
            detail = f"e.g. {name}: {own} here, {peer} on rank {record[FaultRecord.FIRST_RANK]}"
        return A2AMismatchError(what, waiting_rank, ranks, fields, detail)
    timeout_ms = record[FaultRecord.TIMEOUT_MS]
    return A2ATimeoutError(what, waiting_rank, ranks, timeout_ms / 1e3 if timeout_ms > 0 else None)
