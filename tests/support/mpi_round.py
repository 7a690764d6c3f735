"""MoE rounds over MPI: `mpiexec -n N python tests/support/mpi_round.py [cpu|cuda]` (N in tests.support.process_rounds.PLANS).

Each rank builds a `ProcessWorld` over `MPI.COMM_WORLD`, runs and checks every round of its plan
(tests/support/process_rounds.py), prints "mpi_round rank R of N: ok" and exits 0. A failing rank prints
its traceback and aborts the whole job, so no peer waits forever.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from mpi4py import MPI

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        from tests.support.process_rounds import moe_rounds_rank

        if device == "cuda":
            import torch

            torch.cuda.set_device(rank % torch.cuda.device_count())
        moe_rounds_rank(rank, size, device, bootstrap=comm)
    except BaseException:  # noqa: BLE001 - report, then take the whole job down
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    print(f"mpi_round rank {rank} of {size}: ok", flush=True)


if __name__ == "__main__":
    main()
