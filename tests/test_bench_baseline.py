"""bench/baseline.py: a library with FlashInfer's functional API driven next to a2a. a2a exposes the
same API, so it stands in for FlashInfer here: its round passes the baseline's checks, and the
checks catch a wrong row or a wrong sum while accepting rows in another order (FlashInfer's)."""

from __future__ import annotations

import types

import pytest
import torch

import a2a
from tests.conftest import requires_cuda
from a2a import reference
from bench.baseline import FunctionalBaseline, _row_set, load

EP, TOKENS, HIDDEN, TOP_K, NUM_EXPERTS = 3, 5, 16, 2, 6


def inputs(seed: int = 1, tokens: int = TOKENS):
    generator = torch.Generator().manual_seed(seed)
    experts = [torch.randint(0, NUM_EXPERTS, (tokens, TOP_K), generator=generator, dtype=torch.int32)
               for _ in range(EP)]  # fmt: skip
    payloads = [[torch.randn(tokens, HIDDEN, generator=generator).to(torch.bfloat16), ids,
                 torch.rand(tokens, TOP_K, generator=generator)] for ids in experts]  # fmt: skip
    return experts, payloads


def as_module(**overrides) -> types.SimpleNamespace:
    names = ("moe_a2a_get_workspace_size_per_rank", "moe_a2a_initialize", "moe_a2a_dispatch", "moe_a2a_combine",
             "moe_a2a_wrap_payload_tensor_in_workspace")  # fmt: skip
    return types.SimpleNamespace(**{**{name: getattr(a2a, name) for name in names}, **overrides})


def baseline(module, device: str, tokens: int = TOKENS) -> FunctionalBaseline:
    world = a2a.SimulatedWorld(EP, device)
    experts, payloads = inputs(tokens=tokens)
    experts = [e.to(world.device) for e in experts]
    payloads = [[p.to(world.device) for p in ps] for ps in payloads]
    return FunctionalBaseline(module, world, experts, payloads, tokens, HIDDEN, NUM_EXPERTS)


def test_a2a_as_the_baseline_passes_its_checks(device):
    run = baseline(as_module(), device)
    run.check()
    assert all(len(recv) == 3 for recv in run.recv)


def test_sources_that_send_a_rank_nothing(device):
    """One token per rank and top-2 of 3 ranks: some rank receives no row from some source (the
    first H200 run with 1 token per rank failed on the empty row set)."""
    run = baseline(as_module(), device, tokens=1)
    expected = reference.dispatch([e.cpu() for e in run.experts], [[p.cpu() for p in ps] for ps in run.payloads],
                                  NUM_EXPERTS, 1)  # fmt: skip
    assert any(int(n) == 0 for counts in expected.recv_counts for n in counts)
    run.check()


def test_a_wrong_combine_is_caught(device):
    def doubled(*args, **kwargs):
        return a2a.moe_a2a_combine(*args, **kwargs) * 2

    with pytest.raises(AssertionError, match="baseline combine"):
        baseline(as_module(moe_a2a_combine=doubled), device).check()


def test_a_wrong_received_row_is_caught(device):
    def corrupting(experts, payloads, *args, **kwargs):
        if args[3] == 0:  # rank 0 sends its token 0's hidden state with one bit flipped
            hidden = payloads[0].clone()
            hidden.view(torch.uint8)[0, 0] ^= 1
            payloads = [hidden, *payloads[1:]]
        return a2a.moe_a2a_dispatch(experts, payloads, *args, **kwargs)

    with pytest.raises(AssertionError, match="baseline dispatch: payload 0 from rank 0"):
        baseline(as_module(moe_a2a_dispatch=corrupting), device).check()


def test_row_sets_ignore_order_but_not_content():
    rows = torch.randn(6, 8).to(torch.bfloat16)
    assert _row_set(rows) == _row_set(rows[torch.tensor([3, 1, 5, 0, 2, 4])])
    changed = rows.clone()
    changed.view(torch.uint8)[2, 5] ^= 1
    assert _row_set(rows) != _row_set(changed)


def test_load():
    assert load("none") is None
    assert load("a2a") is a2a


@requires_cuda
def test_the_baseline_round_captures_into_one_graph():
    """bench.run times the baseline from CUDA graphs forked into the rank streams; a baseline that
    did not fork (wait for the caller) before its calls broke every capture on an H200."""
    from bench.run import capture

    run = baseline(as_module(), "cuda")
    run.check()
    graph = capture(run.world, run.dispatch)
    graph.replay()
    run.world.synchronize()
    torch.cuda.synchronize()
