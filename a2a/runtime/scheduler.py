"""The order of a round's launches and barriers on each rank's stream.

Two ranks, time flowing down (default `SignalMode.KERNEL`; `v` is the rank's flag value, bumped by
the signalling program, equal on every rank because all ranks run the same phases):

    rank 0 stream                              rank 1 stream
    route (prepare: slots, counters;           route
      recv_counters[0] -> rank 1's segment)
    dispatch copy: rows -> rank 1's planes     dispatch copy
      last program: v += 1, release,             last program: v += 1, release,
      dispatch_flags[0] := v @ 0, @ 1  ----->    dispatch_flags[1] := v @ 0, @ 1
      spin until own dispatch_flags == v  <---   spin until own dispatch_flags == v
    sanitize (reads recv_counters)             sanitize
    ... caller's MoE on the receive planes, writing the combine plane ...
    stage combine plane (optional)             stage
    combine barrier (one program):             combine barrier
      v += 1, combine_flags[0] := v @ 0, @ 1 ->  combine_flags[1] := v @ 0, @ 1
      spin until own combine_flags == v   <---   spin
    combine gather-reduce (peers' planes)      combine gather-reduce

Why each wait is enough:
- dispatch wait: a peer stores my flag only after all its copy programs (and its routing, which
  wrote my recv_counters) finished; the store is a system-scope release.
- combine wait: a peer's combine plane is complete before it signals; the peer cannot overwrite it
  (next round's MoE) before its next dispatch wait, which needs my next dispatch signal, which my
  stream issues only after my gather.
- a peer's next dispatch writes my receive planes only after its combine wait, which needs my
  combine signal, issued after my sanitize / MoE reads of those planes.
- flags are never reset: a flag equals v only once this round's signal arrived, and a peer
  cannot store the next value (v + 2) into it before this rank signalled v + 1.

`SignalMode.HOST_WAIT` (CPU): the same kernels signal, the host stream does the waits.
`SignalMode.STREAM_MEMOPS`: no signal in the kernels; stream memory operations set the flags to 1,
wait for 1 and reset them to 0 (a peer sets the word again only one phase later, behind a wait
for a signal this rank sends after the reset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from a2a.runtime.streams import FlagWait, SignalMode, SignalStream

Launch = Callable[[], None]


@dataclass(frozen=True)
class PhaseSignals:
    """The flag words of one phase as seen from one rank (raw addresses)."""

    what: str  # "dispatch" or "combine": named in timeout errors
    ep_rank: int
    peer_ranks: tuple[int, ...]  # the active ranks (this one included)
    signal_addresses: tuple[int, ...]  # flags[ep_rank] in the segment of every active rank
    wait_addresses: tuple[int, ...]  # own flags[s] for every active rank s
    flag_value_address: int  # own u32 flag value (KERNEL / HOST_WAIT modes)
    phase_code: int  # recorded on a timeout
    timeout_record_address: int  # own timeout record (see FlagWait)

    @property
    def flag_wait(self) -> FlagWait:
        return FlagWait(self.what, self.ep_rank, self.peer_ranks, self.phase_code, self.timeout_record_address)


def schedule_phase(
    stream: SignalStream, launches: Sequence[Launch], signals: PhaseSignals, after_wait: Sequence[Launch] = ()
) -> None:
    """`launches` (in KERNEL / HOST_WAIT mode the last one signals, in KERNEL mode it also waits),
    the barrier's stream part for the stream's mode, then `after_wait`."""
    for launch in launches:
        stream.submit(launch)
    if stream.signal_mode is SignalMode.HOST_WAIT:
        stream.wait_for_value(signals.wait_addresses, signals.flag_value_address, signals.flag_wait)
    elif stream.signal_mode is SignalMode.STREAM_MEMOPS:
        stream.set_flags(signals.signal_addresses)
        stream.wait_flags(signals.wait_addresses, signals.flag_wait)
    for launch in after_wait:
        stream.submit(launch)


def schedule_local(stream: SignalStream, launch: Launch) -> None:
    """A launch that only reads and writes this rank's own segment (sanitize)."""
    stream.submit(launch)
