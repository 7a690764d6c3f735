"""One process per rank on CUDA: VMM symmetric memory, every rank process sharing ONE GPU.

Each rank is its own process with its own context on GPU 0; segments are exported (POSIX fds, or
FABRIC handles where every rank can use them) and imported by every peer. Checked: rounds against
the reference for 2 and 4 processes, bitwise equality with a one-process `SimulatedWorld`, and
100 allocate/free cycles that leave no device memory, fd or mapping behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_cuda
from tests.support.process_launcher import run_mpi_round, run_ranks
from tests.support.process_rounds import PLANS, RoundInputs, moe_rounds_rank, simulated_rounds

pytestmark = requires_cuda

REPO_ROOT = Path(__file__).resolve().parent.parent
# Set before the children initialise CUDA: eager loading avoids loading a module while a stream
# of the context is parked in a flag wait (see a2a.ops.launch).
GPU_CHILD_ENV = {"CUDA_MODULE_LOADING": "EAGER", "A2A_SIGNAL_TIMEOUT_S": "60"}
GPU = "cuda:0"  # every rank process on the same GPU


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda n: f"{n}ranks")
def test_vmm_rounds_across_processes_on_one_gpu(world_size, tmp_path):
    results = run_ranks(moe_rounds_rank, world_size, tmp_path, GPU, env=GPU_CHILD_ENV, timeout_s=300)
    assert [len(per_rank) for per_rank in results] == [len(PLANS[world_size])] * world_size


@pytest.mark.parametrize("world_size", [2, 4, 8], ids=lambda n: f"{n}ranks")
def test_vmm_rounds_with_one_gpu_per_rank(world_size, tmp_path):
    """The same rounds with every rank on its own GPU: peers' segments reached over NVLink / P2P."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    results = run_ranks(moe_rounds_rank, world_size, tmp_path, "cuda:per-rank", env=GPU_CHILD_ENV, timeout_s=300)
    assert [len(per_rank) for per_rank in results] == [len(PLANS[world_size])] * world_size


def test_vmm_matches_the_simulated_world_bitwise(tmp_path):
    processes = run_ranks(moe_rounds_rank, 2, tmp_path, GPU, env=GPU_CHILD_ENV, timeout_s=300)
    simulated = simulated_rounds(2, "cuda")
    for seed, (counts, rt) in enumerate(PLANS[2]):
        inputs = RoundInputs.draw(counts, rt, seed)
        for rank in range(2):
            got, want = processes[rank][seed], simulated[rank][seed]
            valid = inputs.expected.valid_rows(rank)
            for p, (plane, plane_simulated) in enumerate(zip(got["recv"], want["recv"])):
                assert torch.equal(plane[valid].view(torch.uint8), plane_simulated[valid].view(torch.uint8)), (
                    f"round {seed}, rank {rank}, payload {p}"
                )
            assert torch.equal(got["recv"][1], want["recv"][1]), f"sanitized ids, round {seed}, rank {rank}"
            assert torch.equal(got["combined"].view(torch.uint8), want["combined"].view(torch.uint8)), (
                f"combine output, round {seed}, rank {rank}"
            )


def _count_lines(path: str) -> int:
    return len(Path(path).read_text().splitlines())


def _check_sharing(memory, bootstrap, rank: int, world_size: int, what: str) -> None:
    """Zero-initialised, then every rank's write visible to every rank (device ops of every cycle)."""
    assert not memory.tensor.any().item(), f"{what}: not zero-initialised"
    bootstrap.barrier()  # every rank saw zeros before anyone writes
    memory.tensor[rank, -4:].fill_(rank + 1)
    torch.cuda.synchronize(memory.device)
    bootstrap.barrier()
    seen = memory.tensor[:, -4:].cpu()
    assert seen.tolist() == [[r + 1] * 4 for r in range(world_size)], (what, seen)
    bootstrap.barrier()  # no peer reads this rank's segment any more


def _vmm_cycles(rank: int, world_size: int, num_cycles: int) -> dict[str, object]:
    from a2a.runtime.bootstrap import bootstrap_from
    from a2a.runtime.driver import check, driver
    from a2a.runtime.symmetric_memory import CudaSymmetricMemory

    device = torch.device(GPU)
    torch.cuda.set_device(device)
    bootstrap = bootstrap_from(None)
    cu = driver()
    # Warm-up with the same operations: the first cycle creates lazily made state (the fabric
    # probe, torch's caching-allocator block for the small temporaries, loaded kernels).
    with CudaSymmetricMemory(bootstrap, 1 << 20, device) as memory:
        _check_sharing(memory, bootstrap, rank, world_size, "warm-up")
        handle_type = memory.handle_type.name
    bootstrap.barrier()
    free_before, _ = check("cuMemGetInfo", cu.cuMemGetInfo())
    fds_before, maps_before = len(os.listdir("/proc/self/fd")), _count_lines("/proc/self/maps")
    for cycle in range(num_cycles):
        size = (1 << 20) + 4096 * cycle
        memory = CudaSymmetricMemory(bootstrap, size, device)
        assert memory.tensor.shape == (world_size, size) and memory.tensor.stride() == (memory.stride, 1)
        _check_sharing(memory, bootstrap, rank, world_size, f"cycle {cycle}")
        memory.close()
    bootstrap.barrier()
    free_after, _ = check("cuMemGetInfo", cu.cuMemGetInfo())
    return {
        "handle_type": handle_type,
        "device_memory_lost": int(free_before) - int(free_after),
        "new_fds": len(os.listdir("/proc/self/fd")) - fds_before,
        "new_maps": _count_lines("/proc/self/maps") - maps_before,
    }


def test_vmm_cycles_leave_nothing_behind(tmp_path):
    results = run_ranks(_vmm_cycles, 2, tmp_path, 100, env=GPU_CHILD_ENV, timeout_s=300)
    for rank, result in enumerate(results):
        assert result["handle_type"] in ("CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR", "CU_MEM_HANDLE_TYPE_FABRIC")
        # One leaked cycle would be >= 2 MiB per rank (the granularity); 100 cycles far more.
        assert result["device_memory_lost"] < 8 << 20, (rank, result)
        assert result["new_fds"] <= 0, (rank, result)
        assert result["new_maps"] < 10, (rank, result)


def _checkpoint_rank(rank: int, world_size: int) -> dict[str, object]:
    """FlashInfer's checkpoint across processes: an eager round, a CUDA graph of a round captured
    and replayed, the workspace released (checkpoint_prepare) and mapped again over a rebuilt
    gloo group (checkpoint_restore), the same graph replayed on the fresh memory, then eager
    rounds again. Every output is checked; returns what the parent asserts on."""
    import torch.distributed as dist

    import a2a
    from a2a.runtime.process_world import ProcessWorld
    from tests.support.process_rounds import HIDDEN, MAX_NUM_TOKENS, NUM_EXPERTS, TOP_K, RoundInputs, run_round

    torch.cuda.set_device(torch.device(GPU))
    world = ProcessWorld(None, GPU)
    try:
        moe = a2a.MoeAlltoAll(a2a.Mapping(world_size, rank), MAX_NUM_TOKENS, TOP_K, NUM_EXPERTS, hidden_size=HIDDEN,
                              world=world)  # fmt: skip
        counts, rt = PLANS[world_size][0]
        inputs = RoundInputs.draw(counts, rt, 0)
        run_round(world, moe, inputs, in_workspace=True)
        device = world.device
        experts, hidden = inputs.experts[rank].to(device), inputs.hiddens[rank].to(device)
        # Identity experts: each rank sends back the hidden rows it received, so every token
        # comes back once per distinct rank its top-k reached (sums of equal bf16 values in fp32).
        reached = (inputs.expected.routing[rank].topk_target_ranks >= 0).sum(dim=1)
        want = (inputs.hiddens[rank].float() * reached[:, None].float()).to(torch.bfloat16)
        out = torch.empty(counts[rank], HIDDEN, dtype=torch.bfloat16, device=device)

        def round_() -> None:
            recv = moe.dispatch(experts, [hidden], rt)
            plane = moe.get_combine_payload_tensor_in_workspace(rt, HIDDEN, torch.bfloat16)
            plane.copy_(recv[0])
            moe.combine(plane, rt, payload_in_workspace=True, output=out)

        def replayed(graph: torch.cuda.CUDAGraph) -> bool:
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            moe.synchronize()
            return torch.equal(out.cpu().view(torch.uint8), want.view(torch.uint8))

        round_()  # the graph's signature, eagerly once (kernels loaded outside the capture)
        world.synchronize()
        eager_ok = torch.equal(out.cpu().view(torch.uint8), want.view(torch.uint8))
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            round_()
        before = replayed(graph)
        address = moe.workspace.data_ptr()
        moe.checkpoint_prepare()
        group = dist.new_group(backend="gloo")  # the "rebuilt" communicator
        moe.checkpoint_restore(group)
        zeroed = not moe.workspace[rank].any().item()
        # Before any rank's next round: a fast peer's replay writes into this rank's segment at once.
        dist.barrier(group)
        after = replayed(graph)
        for seed, (counts_after, rt_after) in enumerate(PLANS[world_size][1:3], start=1):
            run_round(world, moe, RoundInputs.draw(counts_after, rt_after, seed), in_workspace=seed % 2 == 0)
        same_address = moe.workspace.data_ptr() == address
        del graph
        moe = None  # its views of the workspace go before the world frees it
    finally:
        world.close()
    return {"eager": eager_ok, "replay_before": before, "zeroed": zeroed, "replay_after": after,
            "same_address": same_address}  # fmt: skip


def test_checkpoint_across_processes_keeps_addresses_and_graphs(tmp_path):
    """checkpoint_prepare / checkpoint_restore with one process per rank (VMM): same addresses,
    fresh zeroed memory, a graph captured before replays exactly after, eager rounds go on."""
    results = run_ranks(_checkpoint_rank, 2, tmp_path, env=GPU_CHILD_ENV, timeout_s=300)
    for rank, result in enumerate(results):
        assert result == {"eager": True, "replay_before": True, "zeroed": True, "replay_after": True,
                          "same_address": True}, (rank, result)  # fmt: skip


def test_vmm_rounds_through_mpi():
    run_mpi_round("cuda", GPU_CHILD_ENV, timeout_s=300)
