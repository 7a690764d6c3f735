"""Demo: a simulated 4-rank round (dispatch -> toy experts -> combine) checked against the reference.

    python -m examples.demo [--ranks 4] [--tokens 6,0,9,4] [--hidden 128] [--top-k 4] [--experts 16] [--device cpu]

Runs on the GPU when there is one (all ranks on one GPU, one stream each), else on the CPU under
the Triton interpreter. Prints one row per rank and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

from a2a import envs

envs.set_simulation_env()  # before torch initialises CUDA: N ranks share this process's GPU

import torch  # noqa: E402

import a2a  # noqa: E402
from a2a import reference  # noqa: E402
from a2a.expert_partition import ExpertPartition  # noqa: E402
from examples import toy_moe  # noqa: E402


def run(num_ranks: int, tokens: list[int], hidden: int, top_k: int, num_experts: int, device: str) -> bool:
    generator = torch.Generator().manual_seed(2026)
    world = a2a.SimulatedWorld(num_ranks, device)
    max_tokens = max(max(tokens), 1)
    ranks = [
        a2a.MoeAlltoAll(a2a.Mapping(num_ranks, r), max_tokens, top_k, num_experts, hidden_size=hidden, world=world)
        for r in range(num_ranks)
    ]
    experts, hiddens, weights = [], [], []
    for n in tokens:
        scores = torch.rand(n, num_experts, generator=generator)
        experts.append(scores.topk(top_k, dim=1).indices.to(torch.int32))
        hiddens.append(torch.randn(n, hidden, generator=generator).to(torch.bfloat16))
        weights.append(torch.rand(n, top_k, generator=generator))
    on_device = lambda ts: [t.to(world.device) for t in ts]  # noqa: E731
    experts_d, hiddens_d, weights_d = on_device(experts), on_device(hiddens), on_device(weights)

    start = time.perf_counter()
    recv = [
        ranks[r].dispatch(experts_d[r], [hiddens_d[r], experts_d[r], weights_d[r]], max_tokens,
                          invalid_token_expert_id=-1, expert_id_payload_index=1)
        for r in range(num_ranks)
    ]  # fmt: skip
    world.synchronize()
    partition = ExpertPartition(num_experts, num_ranks)
    expert_outputs = []
    for r in range(num_ranks):
        plane = ranks[r].get_combine_payload_tensor_in_workspace(max_tokens, hidden, torch.bfloat16)
        with world.stream(r).activate():  # each rank's "MoE" runs on its own stream
            plane.copy_(toy_moe.toy_moe_rank(*recv[r], partition.experts_of(r), num_experts, torch.bfloat16))
        expert_outputs.append(plane)
    outputs = [ranks[r].combine(expert_outputs[r], max_tokens, payload_in_workspace=True) for r in range(num_ranks)]
    world.synchronize()
    elapsed_ms = (time.perf_counter() - start) * 1e3

    ref = reference.dispatch(experts, [[hiddens[r], experts[r], weights[r]] for r in range(num_ranks)], num_experts, max_tokens)
    ref_combined = reference.combine([e.cpu() for e in expert_outputs], ref.routing, tokens)
    print(f"a2a demo: {num_ranks} ranks simulated on {world.device}, hidden {hidden} bf16, top_k {top_k}, "
          f"{num_experts} experts, {elapsed_ms:.1f} ms for dispatch + toy experts + combine")  # fmt: skip
    print(f"{'rank':>4} {'tokens':>6} {'received':>8} {'dispatch':>8} {'combine':>8} {'max |out - dense MoE|':>22}")
    all_ok = True
    for r in range(num_ranks):
        valid = ref.valid_rows(r)
        dispatch_ok = all(
            torch.equal(got.cpu()[valid].view(torch.uint8), want[valid].view(torch.uint8))
            for got, want in zip(recv[r][::2], ref.recv_payloads[r][::2])
        ) and torch.equal(recv[r][1].cpu(), reference.sanitize(ref.recv_payloads[r][1], ref.recv_counts[r], -1))
        combine_ok = torch.equal(outputs[r].cpu(), ref_combined[r])
        dense = toy_moe.toy_moe_dense(hiddens[r], experts[r], weights[r], num_experts)
        error = (outputs[r].cpu().float() - dense).abs().max().item() if tokens[r] else 0.0
        scale = dense.abs().max().item() if tokens[r] else 1.0
        # Each rank's partial sum is rounded to bf16 before the final sum: allow a few bf16 ulps.
        all_ok &= dispatch_ok and combine_ok and error <= 2e-2 * scale
        print(f"{r:>4} {tokens[r]:>6} {int(ref.recv_counts[r].sum()):>8} {'exact' if dispatch_ok else 'WRONG':>8} "
              f"{'exact' if combine_ok else 'WRONG':>8} {error:>22.4f}")  # fmt: skip
    print("result:", "all ranks match the reference" if all_ok else "MISMATCH")
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", default="6,0,9,4", help="tokens per rank, comma separated (one per rank)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if len(tokens) != args.ranks:
        parser.error(f"--tokens needs {args.ranks} values, got {len(tokens)}")
    return 0 if run(args.ranks, tokens, args.hidden, args.top_k, args.experts, args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
