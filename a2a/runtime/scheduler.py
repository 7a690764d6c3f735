"""The order of a round's launches and waits on each rank's stream.

Two ranks, time flowing down (on CUDA every wait runs inside the kernel named with it; on the CPU
the host waits at the same points). `v` is the rank's epoch (equal on every rank: all run the same
phases), `g` its gather count:

    rank 0 stream                                   rank 1 stream
    route: slots, counters; last program waits      route
      until own gather_flags == g (every peer
      finished gathering the previous round),
      then recv_counters[0] -> rank 1's segment
    dispatch copy: rows -> rank 1's planes          dispatch copy
      last program: v += 1, signature, release,       last program: v += 1, ...
      dispatch_flags[0] := v @ 0, @ 1  ---------->    dispatch_flags[1] := v @ 0, @ 1
      spin until own dispatch_flags == v  <-------    spin; compare signatures
      compare the peers' signatures with its own
    sanitize (reads recv_counters)                  sanitize
    ... caller's MoE on the receive planes, writing the combine plane ...
    stage combine plane (optional)                  stage
    combine barrier (one program): v += 1,          combine barrier
      signature, combine_flags[0] := v @ 0, @ 1 ->
      spin until own combine_flags == v        <-
      (rounds over 32 rows: compare signatures)
    gather-reduce (peers' planes; up to 32 rows     gather-reduce
      every program compares the signatures
      before its stores);
      last program: g += 1, gather_flags[0] :=
      g @ 0, @ 1 (or, on a disagreement, records
      it and poisons instead) ---->

Why each wait is enough:
- dispatch wait: a peer stores my flag only after all its copy programs (and its routing, which
  wrote my recv_counters) finished; the store is a system-scope release.
- combine wait: a peer's combine plane is complete before it signals; the peer rewrites it (next
  round's MoE) only after its next dispatch wait, which needs my next dispatch signal, which my
  stream issues only after my gather.
- gather wait (start of dispatch): where a round's receive planes lie depends on its rt and
  payloads, so this round's rows may land where the previous round's combine plane was. A peer may
  still be gathering from it (my combine signal only said my plane was ready), so my copy writes
  only once every peer has finished that gather.
- a peer's next dispatch writes my receive planes only after its combine wait, which needs my
  combine signal, issued after my sanitize / MoE reads of those planes.
- flags are never reset: a flag equals v only once this round's signal arrived, and a peer
  cannot store the next value into it before this rank signalled.
- faults: a wait that sees a poisoned peer, times out or (dispatch; combine over 32 rows) sees a
  different signature, or a gather that sees a different combine signature, records a fault;
  from then on the rank makes no remote store and its flags read FLAG_POISON in every peer, so
  the fault spreads to every rank that waits on it (a2a.runtime.protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from a2a.runtime.streams import FlagWait, SignalStream

Launch = Callable[[], None]


def run_steps(stream: SignalStream, steps: Sequence[Launch | FlagWait]) -> None:
    """Submit a phase's steps in order: launches as work, `FlagWait`s as host waits (HOST_WAIT mode).
    On CUDA (KERNEL mode) the kernels wait themselves: callers launch directly instead."""
    for step in steps:
        if isinstance(step, FlagWait):
            stream.wait(step)
        else:
            stream.submit(step)
