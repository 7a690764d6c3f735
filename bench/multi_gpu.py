"""One process per GPU: the P2P roofline, a2a dispatch / combine, and NCCL all_to_all_single moving
the same tokens, side by side in one run.

    python -m bench.multi_gpu --gpus 2 --tokens 1,16,128,4096 --shape deepseek --out bench/out

Every rank checks its own dispatch and combine against a2a.reference (inputs are derived from a
seed, so each rank computes the global reference alone) before anything is timed. Each phase is
captured in a CUDA graph; the graphs are replayed alternately (dispatch, combine, ...) and each
phase is timed with events between replays; the table shows the median over ranks of each rank's
median. The NCCL baseline sends the
same unique (token, rank) rows with all_to_all_single, split sizes computed on the GPU and copied
to the host each call (as users pay them), timed eagerly. NVLink multicast stays off (the machine's
NCCL_NVLS_ENABLE=0 is kept).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import capture_graph

SHAPES = {"deepseek": (7168, 8, 256), "qwen3": (4096, 8, 128), "mixtral": (4096, 2, 8), "gptoss": (2880, 4, 128)}


def _inputs(rank: int, tokens: int, hidden: int, top_k: int, num_experts: int, seed: int, device):
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    ids = torch.rand(tokens, num_experts, generator=generator).topk(top_k, dim=1).indices.to(torch.int32)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    w = torch.rand(tokens, top_k, generator=generator)
    return ids.to(device), x.to(device), w.to(device)


def _replay_phases_us(dispatch_graph, combine_graph, iterations: int, group) -> tuple[float, float]:
    """Median µs of each phase over alternating replays (dispatch, combine, dispatch, ...): the flag
    protocol needs the phases to alternate, as in a real MoE layer; events between the replays."""
    dist.barrier(group=group)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * iterations + 1)]
    events[0].record()
    for i in range(iterations):
        dispatch_graph.replay()
        events[2 * i + 1].record()
        combine_graph.replay()
        events[2 * i + 2].record()
    events[-1].synchronize()
    dispatch = [events[2 * i].elapsed_time(events[2 * i + 1]) * 1e3 for i in range(iterations)]
    combine = [events[2 * i + 1].elapsed_time(events[2 * i + 2]) * 1e3 for i in range(iterations)]
    return statistics.median(dispatch), statistics.median(combine)


def _p2p_gbps(workspace: torch.Tensor, rank: int, world_size: int, group) -> float:
    """Write 256 MiB from this GPU into the next rank's segment; bytes written / time."""
    size = min(256 << 20, workspace.shape[1])
    peer = (rank + 1) % world_size
    source = torch.empty(size, dtype=torch.uint8, device=workspace.device).fill_(1)
    target = workspace[peer, :size]
    samples = []
    for _ in range(10):
        dist.barrier(group=group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    dist.barrier(group=group)
    return size / statistics.median(samples) / 1e3


def _worker(rank: int, world_size: int, args, port: int, results) -> None:
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    import a2a
    from a2a import reference

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300), device_id=device)  # fmt: skip
    gloo = dist.new_group(backend="gloo")
    world = a2a.ProcessWorld(gloo, device)
    hidden, top_k, num_experts = SHAPES[args.shape]
    rows = []
    try:
        # The roofline on a scratch symmetric allocation of its own (never on a MoE workspace:
        # the copy would overwrite a peer's flags and counters).
        p2p = _p2p_gbps(world.workspace(("p2p-roofline",), 256 << 20), rank, world_size, gloo)
        world.release_workspace(("p2p-roofline",))
        for tokens in args.tokens:
            ids, x, w = _inputs(rank, tokens, hidden, top_k, num_experts, 0, device)
            payloads = [x, ids, w]
            size = a2a.moe_a2a_get_workspace_size_per_rank(world_size, tokens, [hidden * 2, top_k * 4, top_k * 4], hidden * 2)
            moe = a2a.MoeAlltoAll(a2a.Mapping(world_size, rank), tokens, top_k, num_experts,
                                  workspace_size_per_rank=size, world=world)  # fmt: skip
            generator = torch.Generator().manual_seed(rank + 7)
            expert_output = torch.randn(world_size, tokens, hidden, generator=generator).to(torch.bfloat16).to(device)

            # Correctness gate (exact) against the global reference.
            recv = moe.dispatch(ids, payloads, tokens)
            plane = moe.get_combine_payload_tensor_in_workspace(tokens, hidden, torch.bfloat16)
            plane.copy_(expert_output)
            out = moe.combine(plane, tokens, payload_in_workspace=True)
            torch.cuda.synchronize()
            everyone = [_inputs(r, tokens, hidden, top_k, num_experts, 0, "cpu") for r in range(world_size)]
            expected = reference.dispatch([e[0] for e in everyone], [[e[1], e[0], e[2]] for e in everyone], num_experts, tokens)
            valid = expected.valid_rows(rank)
            for got, want in zip(recv, expected.recv_payloads[rank]):
                assert torch.equal(got.cpu()[valid].view(torch.uint8), want[valid].view(torch.uint8)), "dispatch"
            outputs_all = [torch.randn(world_size, tokens, hidden, generator=torch.Generator().manual_seed(r + 7)).to(torch.bfloat16)
                           for r in range(world_size)]  # fmt: skip
            want = reference.combine(outputs_all, expected.routing, [tokens] * world_size)[rank]
            assert torch.equal(out.cpu().view(torch.uint8), want.view(torch.uint8)), "combine"
            pairs_here = int(expected.routing[rank].send_counts.sum())
            remote_here = pairs_here - int(expected.routing[rank].send_counts[rank])
            pairs_total = sum(int(r.send_counts.sum()) for r in expected.routing)

            graph_dispatch = capture_graph(lambda: moe.dispatch(ids, payloads, tokens))
            graph_combine = capture_graph(lambda: moe.combine(plane, tokens, payload_in_workspace=True))
            dispatch_us, combine_us = _replay_phases_us(graph_dispatch, graph_combine, args.iterations, gloo)
            del graph_dispatch, graph_combine

            # NCCL all_to_all_single moving the same unique (token, rank) rows, split sizes on the host.
            route = expected.routing[rank]
            order_target, order_token = [], []
            for target in range(world_size):
                tokens_to_t = torch.nonzero((route.topk_target_ranks == target).any(dim=1)).flatten()
                order_target.append(torch.full_like(tokens_to_t, target))
                order_token.append(tokens_to_t)
            send_rows = torch.cat(order_token).to(device)
            send_targets = torch.cat(order_target).to(device)
            received = torch.empty(int(expected.recv_counts[rank].sum()), hidden, dtype=torch.bfloat16, device=device)

            def nccl_dispatch():
                send_counts = torch.bincount(send_targets, minlength=world_size)
                recv_counts = torch.empty_like(send_counts)
                dist.all_to_all_single(recv_counts, send_counts)
                dist.all_to_all_single(received, x.index_select(0, send_rows), recv_counts.tolist(), send_counts.tolist())

            samples = []
            for _ in range(args.iterations):
                dist.barrier(group=gloo)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                nccl_dispatch()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
            nccl_us = statistics.median(samples)
            row_bytes = hidden * 2 + 8 * top_k
            rows.append(dict(rank=rank, tokens=tokens, p2p_gbps=p2p, dispatch_us=dispatch_us, combine_us=combine_us,
                             nccl_us=nccl_us, dispatch_bytes_rank=(tokens + pairs_here) * row_bytes,
                             combine_bytes_rank=(pairs_here + tokens) * hidden * 2, pairs_total=pairs_total,
                             remote_dispatch_bytes_rank=remote_here * row_bytes,
                             remote_combine_bytes_rank=remote_here * hidden * 2))  # fmt: skip
            moe._reset_workspace()
        results.put((rank, rows, None))
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
        import traceback

        results.put((rank, None, traceback.format_exc()))
        raise
    finally:
        world.close()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--tokens", default="1,16,128,4096")
    parser.add_argument("--shape", default="deepseek")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    os.makedirs(args.out, exist_ok=True)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(r, args.gpus, args, port, results)) for r in range(args.gpus)]
    for process in processes:
        process.start()
    by_rank = {}
    for _ in processes:
        rank, rows, error = results.get(timeout=900)
        if error:
            for process in processes:
                process.kill()
            raise SystemExit(f"rank {rank} failed:\n{error}")
        by_rank[rank] = rows
    for process in processes:
        process.join(timeout=60)
    table = []
    print(f"{args.gpus} GPUs ({torch.cuda.get_device_name()}), {args.shape} bf16, one process per GPU; dedup GB/s = "
          "per-rank de-duplicated bytes / median phase time; remote GB/s counts only rows that cross to a peer")  # fmt: skip
    for index, tokens in enumerate(args.tokens):
        per_rank = [by_rank[r][index] for r in range(args.gpus)]
        row = dict(gpus=args.gpus, gpu=torch.cuda.get_device_name(), shape=args.shape, tokens=tokens,
                   p2p_gbps=statistics.median(r["p2p_gbps"] for r in per_rank),
                   dispatch_us=statistics.median(r["dispatch_us"] for r in per_rank),
                   combine_us=statistics.median(r["combine_us"] for r in per_rank),
                   nccl_all_to_all_us=statistics.median(r["nccl_us"] for r in per_rank),
                   dispatch_bytes_per_rank=statistics.median(r["dispatch_bytes_rank"] for r in per_rank),
                   combine_bytes_per_rank=statistics.median(r["combine_bytes_rank"] for r in per_rank),
                   remote_dispatch_bytes_per_rank=statistics.median(r["remote_dispatch_bytes_rank"] for r in per_rank),
                   remote_combine_bytes_per_rank=statistics.median(r["remote_combine_bytes_rank"] for r in per_rank))  # fmt: skip
        row["dispatch_gbps_per_rank"] = row["dispatch_bytes_per_rank"] / row["dispatch_us"] / 1e3
        row["combine_gbps_per_rank"] = row["combine_bytes_per_rank"] / row["combine_us"] / 1e3
        # Only bytes that cross to a peer use the link: the P2P comparison counts those alone.
        row["dispatch_remote_gbps"] = row["remote_dispatch_bytes_per_rank"] / row["dispatch_us"] / 1e3
        row["combine_remote_gbps"] = row["remote_combine_bytes_per_rank"] / row["combine_us"] / 1e3
        row["dispatch_vs_p2p"] = row["dispatch_remote_gbps"] / row["p2p_gbps"]
        row["combine_vs_p2p"] = row["combine_remote_gbps"] / row["p2p_gbps"]
        row["nccl_over_dispatch"] = row["nccl_all_to_all_us"] / row["dispatch_us"]
        table.append(row)
        print(f"tokens {tokens:5d}: dispatch {row['dispatch_us']:7.1f} us ({row['dispatch_gbps_per_rank']:6.1f} GB/s dedup, "
              f"remote {row['dispatch_remote_gbps']:6.1f} GB/s = {100 * row['dispatch_vs_p2p']:5.1f}% of P2P {row['p2p_gbps']:.0f}) "
              f"combine {row['combine_us']:7.1f} us ({row['combine_gbps_per_rank']:6.1f} dedup, remote {row['combine_remote_gbps']:6.1f} = "
              f"{100 * row['combine_vs_p2p']:5.1f}%)  NCCL a2a {row['nccl_all_to_all_us']:7.1f} us (x{row['nccl_over_dispatch']:.2f})",
              flush=True)  # fmt: skip
    with open(os.path.join(args.out, f"multi_gpu_{args.gpus}.json"), "w") as handle:
        json.dump(table, handle, indent=1)
    with open(os.path.join(args.out, f"multi_gpu_{args.gpus}.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    main()
