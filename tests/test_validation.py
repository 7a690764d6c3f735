"""Bad input gets a clear exception naming the argument and the rule: one case per rule.

Every case starts from a valid call and breaks exactly one thing; the valid call itself is also run,
so a rule that fires on good input fails here too. Checks happen on the host before any launch, so
the CPU is enough.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import a2a
from a2a.layout import MAX_PAYLOADS
from a2a.ops.validation import row_major as validation_row_major
from tests.conftest import requires_interpreter

EP, RANK, TOP_K, EXPERTS, RT, CAPACITY, HIDDEN = 2, 0, 2, 4, 3, 4, 8


def make_call():
    """The arguments of a valid dispatch, combine and sanitize on rank 0 of a 1-rank-wide check."""
    size = a2a.moe_a2a_get_workspace_size_per_rank(EP, CAPACITY, [HIDDEN * 2], HIDDEN * 4)
    workspace = torch.zeros(EP, size, dtype=torch.uint8)
    metainfo = a2a.moe_a2a_initialize(workspace, RANK, EP, CAPACITY)
    dispatch = dict(
        token_selected_experts=torch.zeros(2, TOP_K, dtype=torch.int32),
        input_payloads=[torch.zeros(2, HIDDEN, dtype=torch.bfloat16)],
        workspace=workspace,
        metainfo=metainfo,
        runtime_max_tokens_per_rank=RT,
        ep_rank=RANK,
        ep_size=EP,
        top_k=TOP_K,
        num_experts=EXPERTS,
    )
    layout = a2a.WorkspaceLayout.from_metainfo(metainfo)
    combine_offset = layout.round_layout(RT, [HIDDEN * 2]).combine_offset
    combine = dict(
        payload=torch.zeros(EP, RT, HIDDEN, dtype=torch.float32),
        local_num_tokens=2,
        workspace=workspace,
        metainfo=metainfo,
        runtime_max_tokens_per_rank=RT,
        ep_rank=RANK,
        ep_size=EP,
        top_k=TOP_K,
        combine_payload_offset=combine_offset,
    )
    sanitize = dict(
        expert_ids=torch.zeros(EP, RT, TOP_K, dtype=torch.int32),
        workspace=workspace,
        metainfo=metainfo,
        ep_rank=RANK,
        invalid_expert_id=-1,
    )
    return dispatch, combine, sanitize


Mutation = Callable[[dict], None]

DISPATCH_RULES: list[tuple[str, Mutation, type, str]] = [
    ("experts not a tensor", lambda a: a.update(token_selected_experts=[[0, 1]]), TypeError, "token_selected_experts must be a torch.Tensor"),
    ("experts int64", lambda a: a.update(token_selected_experts=a["token_selected_experts"].long()), TypeError, "token_selected_experts must be int32, got torch.int64"),
    ("experts 1-D", lambda a: a.update(token_selected_experts=torch.zeros(4, dtype=torch.int32)), ValueError, "token_selected_experts must be 2-D"),
    ("experts width != top_k", lambda a: a.update(token_selected_experts=torch.zeros(2, 3, dtype=torch.int32)), ValueError, r"\[num_tokens, top_k=2\]"),
    ("experts strided", lambda a: a.update(token_selected_experts=torch.zeros(2, 4, dtype=torch.int32)[:, ::2]), ValueError, "token_selected_experts must be contiguous"),
    ("experts elsewhere", lambda a: a.update(token_selected_experts=torch.zeros(2, 2, dtype=torch.int32, device="meta")), ValueError, "token_selected_experts must be on cpu"),
    ("payloads not a list", lambda a: a.update(input_payloads=torch.zeros(2, HIDDEN)), TypeError, "input_payloads must be a list"),
    ("no payload", lambda a: a.update(input_payloads=[]), ValueError, "input_payloads must hold 1 to 8"),
    ("too many payloads", lambda a: a.update(input_payloads=[torch.zeros(2, 1)] * (MAX_PAYLOADS + 1)), ValueError, "input_payloads must hold 1 to 8"),
    ("payload 1-D", lambda a: a.update(input_payloads=[torch.zeros(2)]), ValueError, r"input_payloads\[0\] must be 2-D"),
    ("payload rows != tokens", lambda a: a.update(input_payloads=[torch.zeros(3, HIDDEN)]), ValueError, r"input_payloads\[0\] first dim must equal the local token count 2"),
    # Rows are no part of a plan's key: the same dtypes and widths as the valid call, so after a valid
    # round only the per-call checks a found plan leaves open can refuse these two.
    ("payload rows != tokens, same dtype", lambda a: a.update(input_payloads=[torch.zeros(3, HIDDEN, dtype=torch.bfloat16)]), ValueError, r"input_payloads\[0\] first dim must equal the local token count 2"),
    ("payload width 0", lambda a: a.update(input_payloads=[torch.zeros(2, 0)]), ValueError, "at least one element per token"),
    ("payload strided", lambda a: a.update(input_payloads=[torch.zeros(HIDDEN, 2).t()]), ValueError, r"input_payloads\[0\] must be contiguous"),
    ("payload conjugate view", lambda a: a.update(input_payloads=[torch.zeros(2, HIDDEN, dtype=torch.complex64).conj()]), ValueError, r"input_payloads\[0\] is a lazy conjugate or negative view"),
    ("payload negative view", lambda a: a.update(input_payloads=[torch._neg_view(torch.zeros(2, HIDDEN, dtype=torch.bfloat16))]), ValueError, r"input_payloads\[0\] is a lazy conjugate or negative view"),
    ("experts sparse", lambda a: a.update(token_selected_experts=torch.zeros(2, TOP_K, dtype=torch.int32).to_sparse()), ValueError, "token_selected_experts must be a dense"),
    ("top_k 0", lambda a: a.update(top_k=0), ValueError, r"top_k must be in \[1, 22\], got 0"),
    ("top_k 23", lambda a: a.update(top_k=23), ValueError, r"top_k must be in \[1, 22\], got 23"),
    ("top_k float", lambda a: a.update(top_k=2.0), TypeError, "top_k must be an int"),
    ("ep_rank out of range", lambda a: a.update(ep_rank=2), ValueError, r"ep_rank must be in \[0, 1\], got 2"),
    ("ep_size beyond limit", lambda a: a.update(ep_size=65), ValueError, r"ep_size must be in \[1, 64\], got 65"),
    ("ep_size != layout", lambda a: a.update(ep_size=3), ValueError, "must equal the workspace layout's ep_size"),
    ("num_experts < ep_size", lambda a: a.update(num_experts=1), ValueError, "num_experts must be in >= 2, got 1"),
    ("rt 0", lambda a: a.update(runtime_max_tokens_per_rank=0), ValueError, r"runtime_max_tokens_per_rank must be in \[1, 4\], got 0"),
    ("rt over capacity", lambda a: a.update(runtime_max_tokens_per_rank=CAPACITY + 1), ValueError, r"runtime_max_tokens_per_rank must be in \[1, 4\]"),
    ("tokens over rt", lambda a: a.update(runtime_max_tokens_per_rank=1), ValueError, r"local token count \(2\) must be <= runtime_max_tokens_per_rank \(1\)"),
    ("tokens over rt, same rt", lambda a: a.update(token_selected_experts=torch.zeros(RT + 1, TOP_K, dtype=torch.int32), input_payloads=[torch.zeros(RT + 1, HIDDEN, dtype=torch.bfloat16)]), ValueError, r"local token count \(4\) must be <= runtime_max_tokens_per_rank \(3\)"),
    ("workspace dtype", lambda a: a.update(workspace=a["workspace"].view(torch.int8)), TypeError, "workspace must be uint8"),
    ("workspace 1-D", lambda a: a.update(workspace=a["workspace"][0]), ValueError, "workspace must be 2-D"),
    ("workspace rows != ep_size", lambda a: a.update(workspace=a["workspace"][:1]), ValueError, "workspace first dim must equal ep_size=2"),
    ("workspace too small", lambda a: a.update(workspace=a["workspace"][:, : a2a.WorkspaceLayout.compute(EP, CAPACITY).aux_size + 8]), ValueError, "workspace size per rank insufficient for the dispatch receive planes"),
    ("metainfo not a tensor", lambda a: a.update(metainfo=[0] * 13), TypeError, "metainfo must be a torch.Tensor"),
    ("metainfo wrong shape", lambda a: a.update(metainfo=torch.zeros(9, dtype=torch.int64)), ValueError, "metainfo must be a CPU int64 tensor"),
]

COMBINE_RULES: list[tuple[str, Mutation, type, str]] = [
    ("payload int32", lambda a: a.update(payload=torch.zeros(EP, RT, HIDDEN, dtype=torch.int32)), TypeError, "payload must be float16 or bfloat16 or float32 or float8_e4m3fn, got torch.int32"),
    ("payload 2-D", lambda a: a.update(payload=torch.zeros(EP * RT, HIDDEN)), ValueError, "payload must be 3-D"),
    ("payload rt mismatch", lambda a: a.update(payload=torch.zeros(EP, RT + 1, HIDDEN)), ValueError, r"payload must have shape \[2, 3, 8\]"),
    ("payload ep mismatch", lambda a: a.update(payload=torch.zeros(EP + 1, RT, HIDDEN)), ValueError, r"payload must have shape \[2, 3, 8\]"),
    ("local tokens over rt", lambda a: a.update(local_num_tokens=RT + 1), ValueError, r"local_num_tokens must be in \[0, 3\]"),
    ("local tokens negative", lambda a: a.update(local_num_tokens=-1), ValueError, r"local_num_tokens must be in \[0, 3\]"),
    ("offset inside aux", lambda a: a.update(combine_payload_offset=0), ValueError, "combine_payload_offset must be in >="),
    ("offset misaligned", lambda a: a.update(combine_payload_offset=a["combine_payload_offset"] + 4), ValueError, "combine_payload_offset must be a multiple of 16"),
    ("plane does not fit", lambda a: a.update(payload=torch.zeros(EP, RT, 100 * HIDDEN)), ValueError, "insufficient for the combine plane"),
    ("in-workspace pointer", lambda a: a.update(payload_in_workspace=True), ValueError, "payload_in_workspace is True but payload is not this rank's combine plane"),
    ("output shape", lambda a: a.update(output=torch.zeros(3, HIDDEN)), ValueError, r"output must have shape \[2, 8\]"),
    ("payload negative view", lambda a: a.update(payload=torch._neg_view(torch.zeros(EP, RT, HIDDEN))), ValueError, "payload is a lazy conjugate or negative view"),
    ("output dtype", lambda a: a.update(output=torch.zeros(2, HIDDEN, dtype=torch.float16)), TypeError, "output must be float32"),
]

SANITIZE_RULES: list[tuple[str, Mutation, type, str]] = [
    ("ids int64", lambda a: a.update(expert_ids=torch.zeros(EP, RT, TOP_K, dtype=torch.int64)), TypeError, "expert_ids must be int32"),
    ("ids 2-D", lambda a: a.update(expert_ids=torch.zeros(EP * RT, TOP_K, dtype=torch.int32)), ValueError, "expert_ids must be 3-D"),
    ("ids ep mismatch", lambda a: a.update(expert_ids=torch.zeros(EP + 1, RT, TOP_K, dtype=torch.int32)), ValueError, r"expert_ids must be \[ep_size=2"),
    ("ids rt over capacity", lambda a: a.update(expert_ids=torch.zeros(EP, CAPACITY + 1, TOP_K, dtype=torch.int32)), ValueError, "runtime_max_tokens_per_rank must be in"),
    ("invalid id not int", lambda a: a.update(invalid_expert_id=-1.5), TypeError, "invalid_expert_id must be an int"),
    ("ep_rank out of range", lambda a: a.update(ep_rank=-1), ValueError, r"ep_rank must be in \[0, 1\], got -1"),
]


@requires_interpreter
def test_valid_calls_pass_validation():
    """The unbroken calls get past every check (they then wait for rank 1, which never comes)."""
    dispatch, combine, sanitize = make_call()
    a2a.moe_a2a_sanitize_expert_ids(**sanitize)  # local: completes
    world = a2a.SimulatedWorld(EP, "cpu")  # a parked stream: the waits never block this test
    with world.stream(RANK).activate():
        a2a.moe_a2a_dispatch(**dispatch)
        a2a.moe_a2a_combine(**combine)


@pytest.mark.parametrize("name, mutate, error, message", DISPATCH_RULES, ids=[r[0] for r in DISPATCH_RULES])
def test_dispatch_rule(name, mutate, error, message):
    args, _, _ = make_call()
    mutate(args)
    with pytest.raises(error, match=message):
        a2a.moe_a2a_dispatch(**args)


@pytest.mark.parametrize("name, mutate, error, message", COMBINE_RULES, ids=[r[0] for r in COMBINE_RULES])
def test_combine_rule(name, mutate, error, message):
    _, args, _ = make_call()
    mutate(args)
    with pytest.raises(error, match=message):
        a2a.moe_a2a_combine(**args)


@pytest.mark.parametrize("name, mutate, error, message", SANITIZE_RULES, ids=[r[0] for r in SANITIZE_RULES])
def test_sanitize_rule(name, mutate, error, message):
    _, _, args = make_call()
    mutate(args)
    with pytest.raises(error, match=message):
        a2a.moe_a2a_sanitize_expert_ids(**args)


@requires_interpreter
@pytest.mark.parametrize("op, name, mutate, error, message",
                         [("dispatch", *rule) for rule in DISPATCH_RULES] + [("combine", *rule) for rule in COMBINE_RULES],
                         ids=[f"dispatch: {r[0]}" for r in DISPATCH_RULES] + [f"combine: {r[0]}" for r in COMBINE_RULES])
def test_rule_holds_after_a_valid_round_built_the_plans(op, name, mutate, error, message):
    """A rank's plans are found by a key of the call's signature (a2a.ops.context); a broken call
    must not match the key of the valid call that built a plan before it, or it would skip the
    checks: each rule is broken after one valid round on the same workspace."""
    dispatch, combine, _ = make_call()
    world = a2a.SimulatedWorld(EP, "cpu")  # a parked stream: nothing runs, the host's round state advances
    with world.stream(RANK).activate():
        a2a.moe_a2a_dispatch(**dispatch)
        a2a.moe_a2a_combine(**combine)
        if op == "combine":
            a2a.moe_a2a_dispatch(**dispatch)  # the combine's own round
        args = dispatch if op == "dispatch" else combine
        mutate(args)
        # A combine's count and offset now meet the live round's check first, which names them too.
        with pytest.raises(error, match=f"(?:{message})|(?:must be the dispatch's)"):
            getattr(a2a, f"moe_a2a_{op}")(**args)


@requires_interpreter
def test_a_contiguous_payload_with_other_strides_on_a_size_one_dimension_is_taken():
    """torch calls a one-row tensor contiguous whatever its row stride; the plan (which views the
    payload's bytes as copy units) takes it as it takes the same row with row-major strides."""
    dispatch, _, _ = make_call()
    buffer = torch.arange(99 + HIDDEN, dtype=torch.float32).to(torch.bfloat16)
    row = buffer.as_strided((1, HIDDEN), (99, 1))
    assert row.is_contiguous() and row.stride() != (HIDDEN, 1)
    dispatch.update(token_selected_experts=torch.zeros(1, TOP_K, dtype=torch.int32), input_payloads=[row])
    world = a2a.SimulatedWorld(EP, "cpu")  # a parked stream: validation and planning only
    with world.stream(RANK).activate():
        a2a.moe_a2a_dispatch(**dispatch)
    assert validation_row_major(row).stride() == (HIDDEN, 1)
    assert torch.equal(validation_row_major(row), row)


def world_of(ep_size: int) -> a2a.SimulatedWorld:
    return a2a.SimulatedWorld(ep_size, "cpu")


CLASS_RULES: list[tuple[str, Callable[[], object], type, str]] = [
    ("top_k 0", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 0, 4, hidden_size=8, world=world_of(2)), ValueError, "top_k must be a positive int"),
    ("num_experts 0", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 0, hidden_size=8, world=world_of(2)), ValueError, "num_experts must be a positive int"),
    ("max tokens 0", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 0, 2, 4, hidden_size=8, world=world_of(2)), ValueError, "max_num_tokens must be a positive int"),
    ("no size, no hidden", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, world=world_of(2)), ValueError, "hidden_size is required"),
    ("no world", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, hidden_size=8), ValueError, "needs a world"),
    ("world size mismatch", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, hidden_size=8, world=world_of(3)), ValueError, "world has 3 ranks"),
    ("workspace too small", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, workspace_size_per_rank=64, world=world_of(2)), ValueError, "insufficient for the aux region"),
    ("mnnvl_config without comm_backend", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, hidden_size=8, mnnvl_config=object()), TypeError, "must have a comm_backend"),
    ("mnnvl_config and world", lambda: a2a.MoeAlltoAll(a2a.Mapping(2, 0), 4, 2, 4, hidden_size=8, mnnvl_config=a2a.MnnvlConfig(), world=world_of(2)), ValueError, "either world= or mnnvl_config="),
]


@pytest.mark.parametrize("name, build, error, message", CLASS_RULES, ids=[r[0] for r in CLASS_RULES])
def test_class_rule(name, build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_sanitize_request_needs_the_payload_index(device):
    moe = a2a.MoeAlltoAll(a2a.Mapping(1, 0), 4, 2, 4, hidden_size=8, world=a2a.SimulatedWorld(1, device))
    experts = torch.zeros(1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="expert_id_payload_index is required"):
        moe.dispatch(experts, [experts], 1, invalid_token_expert_id=-1)
    with pytest.raises(ValueError, match=r"expert_id_payload_index must be in \[0, 0\], got 1"):
        moe.dispatch(experts, [experts], 1, invalid_token_expert_id=-1, expert_id_payload_index=1)


def test_dispatch_keys_each_tensor_as_tensor_key_does():
    """Dispatch builds its tensors' keys with `rows_and_key` (one shape read), combine and the rest
    with `tensor_key`: a property one of them misses would let a cached plan skip a check."""
    from a2a.ops.context import rows_and_key, tensor_key

    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    complex_base = torch.randn(4, 3, dtype=torch.complex64)
    tensors = [base, base[:, 1:], base.t(), base.view(torch.uint8)[:, 1:9], base.to(torch.bfloat16), base[0],
               torch._neg_view(base), complex_base,
               complex_base.conj(), torch.empty(4, 6, device="meta"), torch.zeros(0, 6), base.expand(2, 4, 6)]
    for tensor in tensors:
        rows, key = rows_and_key(tensor)
        assert rows == tensor.shape[0] and key == tensor_key(tensor, rows=False), tensor
    assert rows_and_key(complex_base.conj())[1] != rows_and_key(complex_base)[1]  # the lazy bit is keyed
