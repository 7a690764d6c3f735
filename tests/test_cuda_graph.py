"""A whole simulated round captured once in a CUDA graph and replayed with new inputs.

The flags carry epoch values from device counters, so replays need nothing from the host.
"""

from __future__ import annotations

import torch

import a2a
from a2a import reference
from tests.conftest import requires_cuda
from tests.support.rounds import as_bytes, world_for

EP, TOP_K, EXPERTS, HIDDEN, RT = 4, 4, 16, 256, 32
COUNTS = [32, 0, 17, 5]


def fill_inputs(inputs, seed):
    generator = torch.Generator().manual_seed(seed)
    for (experts, hidden, plane_values), n in zip(inputs, COUNTS):
        experts.copy_(torch.rand(n, EXPERTS, generator=generator).topk(TOP_K, dim=1).indices.to(torch.int32))
        hidden.copy_(torch.randn(n, HIDDEN, generator=generator).to(torch.bfloat16))
        plane_values.copy_(torch.randn(EP, RT, HIDDEN, generator=generator).to(torch.bfloat16))


@requires_cuda
def test_round_replays_from_a_cuda_graph_with_new_inputs():
    world = world_for(EP, "cuda")
    ranks = [a2a.MoeAlltoAll(a2a.Mapping(EP, r), RT, TOP_K, EXPERTS, hidden_size=HIDDEN, world=world) for r in range(EP)]
    inputs = [
        (torch.zeros(n, TOP_K, dtype=torch.int32, device="cuda"), torch.zeros(n, HIDDEN, dtype=torch.bfloat16, device="cuda"),
         torch.zeros(EP, RT, HIDDEN, dtype=torch.bfloat16, device="cuda"))
        for n in COUNTS
    ]  # fmt: skip

    def round_():
        recv = [moe.dispatch(e, [h, e], RT, invalid_token_expert_id=-1, expert_id_payload_index=1)
                for moe, (e, h, _) in zip(ranks, inputs)]  # fmt: skip
        outs = []
        for r, moe in enumerate(ranks):
            plane = moe.get_combine_payload_tensor_in_workspace(RT, HIDDEN, torch.bfloat16)
            with world.stream(r).activate():
                plane.copy_(inputs[r][2])  # stands in for the rank's experts writing their output
            outs.append(moe.combine(plane, RT, payload_in_workspace=True))
        world.join_into_caller()
        return recv, outs

    fill_inputs(inputs, 0)
    round_()  # eager warm-up: every kernel variant compiled and loaded before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    with torch.cuda.stream(capture_stream):
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=capture_stream):
            recv, outs = round_()
    torch.cuda.synchronize()

    for seed in range(1, 6):
        fill_inputs(inputs, seed)
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        experts = [e.cpu() for e, _, _ in inputs]
        expected = reference.dispatch(experts, [[h.cpu(), e] for e, (_, h, _) in zip(experts, inputs)], EXPERTS, RT)
        combined = reference.combine([p.cpu() for _, _, p in inputs], expected.routing, COUNTS)
        for r in range(EP):
            valid = expected.valid_rows(r)
            assert torch.equal(as_bytes(recv[r][0].cpu()[valid]), as_bytes(expected.recv_payloads[r][0][valid]))
            sanitized = reference.sanitize(expected.recv_payloads[r][1], expected.recv_counts[r], -1)
            assert torch.equal(recv[r][1].cpu(), sanitized)
            assert torch.equal(as_bytes(outs[r].cpu()), as_bytes(combined[r])), (seed, r)
