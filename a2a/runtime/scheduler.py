"""The order of a round's launches and signals on each rank's stream.

Two ranks, time flowing down; `set` and `wait` are the flag operations of `SignalStream`:

    rank 0 stream                         rank 1 stream
    route (prepare: counters, slots)      route
    dispatch copy  --rows, recv_counters-->  (into rank 1's planes)   and the reverse
    set dispatch_flags[0] @ 0, @ 1        set dispatch_flags[1] @ 0, @ 1
    wait own dispatch_flags[0..1] ----    wait own dispatch_flags[0..1]
      (every peer's rows and counters into my planes have landed; clear flags)
    sanitize (reads recv_counters)        sanitize
    ... caller's MoE on the receive planes, writing the combine plane ...
    stage combine plane (optional)        stage
    set combine_flags[0] @ 0, @ 1         set combine_flags[1] @ 0, @ 1
    wait own combine_flags[0..1] -----    wait own combine_flags[0..1]
      (every peer's combine plane is complete; clear flags)
    combine gather-reduce                 combine gather-reduce

Why each wait is enough:
- dispatch wait: a peer sets my flag only after its copy kernel (and its routing, which wrote my
  recv_counters) finished; the set carries a system-scope fence.
- combine wait: a peer's combine plane is complete before it sets; the peer cannot overwrite it
  (next round's MoE) before its next dispatch wait, which needs my next dispatch signal, which my
  stream issues only after my gather.
- a peer's next dispatch writes my receive planes only after its combine wait, which needs my
  combine signal, issued after my sanitize / MoE reads of those planes.
- clearing a flag right after its wait is safe: a peer sets it again only one phase later, and
  that phase waits for a signal I send after the clear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from a2a.runtime.streams import FlagWait, SignalStream

Launch = Callable[[], None]


def schedule_dispatch(
    stream: SignalStream,
    launches: Sequence[Launch],
    signal_addresses: Sequence[int],
    wait_addresses: Sequence[int],
    ep_rank: int,
) -> None:
    """Routing + copy launches, then signal every peer and wait for every peer's signal."""
    for launch in launches:
        stream.submit(launch)
    stream.set_flags(signal_addresses)
    stream.wait_flags(wait_addresses, FlagWait("dispatch", ep_rank, tuple(range(len(wait_addresses)))))


def schedule_combine(
    stream: SignalStream,
    stage: Launch | None,
    gather: Launch | None,
    signal_addresses: Sequence[int],
    wait_addresses: Sequence[int],
    ep_rank: int,
) -> None:
    """Optional staging copy, readiness signal and wait, then the gather-reduce."""
    if stage is not None:
        stream.submit(stage)
    stream.set_flags(signal_addresses)
    stream.wait_flags(wait_addresses, FlagWait("combine", ep_rank, tuple(range(len(wait_addresses)))))
    if gather is not None:
        stream.submit(gather)


def schedule_local(stream: SignalStream, launch: Launch) -> None:
    """A launch that only reads and writes this rank's own segment (sanitize)."""
    stream.submit(launch)
