"""An engine-style MoE layer over a2a's `EpAlltoAll` with fp8 dispatch, checked against a dense MoE.

    python -m examples.moe_layer [--ranks 4] [--device cpu|cuda]        # every rank in this process
    torchrun --nproc-per-node 2 -m examples.moe_layer --distributed [--device cpu|cuda]  # a process per rank

Each rank: router (softmax over experts, top-k, renormalised) on its bf16 hidden states ->
`EpAlltoAll.dispatch` (fp8 e4m3 per-token quantization, then [fp8 values, fp32 scales, int32 expert
ids, fp32 router weights] to the ranks owning the experts; rank-major receive buffers back) -> its
own experts (SwiGLU MLPs; ownership from `ExpertPartition`) on the dequantized rows, times the
router weight, summed per row in fp32 and written into the bf16 combine input buffer in the
workspace -> `EpAlltoAll.combine` (bf16 out, one row per local token).

Every rank builds the same weights and the same global batch from the seed, so each computes the
dense MoE (no communication, all experts, full batch) alone and checks its own tokens against it.
With `scale` = the largest `sum_k |w_k * expert_k(x)|` over the rank's output elements:

- vs the dense MoE fed the same fp8-dequantized inputs, only bf16 rounding differs: each rank's
  partial sum is rounded to bf16 once (in the combine plane) and the final sum once more, each
  within bf16's unit roundoff 2^-8 of `scale` (fp32 grouping noise is ~2^-20): tolerance
  `(2^-7 + 2^-16) * scale`. This is the check that catches a lost, duplicated or misweighted row.
- vs the dense MoE fed the unquantized bf16 inputs, the fp8 input error adds on top: e4m3 keeps 3
  mantissa bits, so each input element is within 2^-4 relative (the per-token scale maps the row
  amax to 448, far above the subnormals); the experts carry that to their outputs at about the same
  relative level (seeded sweeps of this layer, 1 to 16 tokens per rank, hidden 64 to 1024: max error
  0.58 * 2^-4 * scale on average, 1.85 * 2^-4 * scale at worst). Tolerance: twice the per-element
  bound, `2^-3 * scale`, on top of the bf16 one.

(a) Simulated: `a2a.SimulatedWorld`, all ranks in this process, each rank's ops on its own stream
    (CUDA: one GPU, concurrent streams; CPU: the Triton interpreter and cooperative host streams).
(b) Distributed: one process per rank under torchrun (torch.distributed: gloo on the CPU, nccl and
    one GPU per process on CUDA), the workspace in `a2a.ProcessWorld` symmetric memory.

Prints one row per rank and a final `result:` line; exits 1 if any rank fails a check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

BF16_TOLERANCE = 2.0**-7 + 2.0**-16  # two bf16 roundings (unit roundoff 2^-8) + fp32 grouping noise
FP8_TOLERANCE = 2.0**-3  # twice e4m3's relative rounding bound of one input element (see the docstring)
INVALID_EXPERT_ID = -1


@dataclass(frozen=True)
class LayerConfig:
    hidden_size: int = 256
    intermediate_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    max_tokens_per_rank: int = 16
    seed: int = 2026

    def token_counts(self, ep_size: int) -> list[int]:
        """Unequal, deterministic token counts per rank; rank 0 has `max_tokens_per_rank`."""
        spread = self.max_tokens_per_rank // 2 + 1
        return [self.max_tokens_per_rank - (7 * rank) % spread for rank in range(ep_size)]

    def ep_params(self):
        """The group's `a2a.EpParams`: fp8 per-token dispatch, bf16 expert outputs."""
        import a2a

        return a2a.EpParams(self.num_experts, self.top_k, self.max_tokens_per_rank, self.hidden_size,
                            dtype=torch.bfloat16, dispatch_format=a2a.QuantFormat.FP8_PER_TOKEN,
                            invalid_expert_id=INVALID_EXPERT_ID)  # fmt: skip


@dataclass(frozen=True)
class MoeWeights:
    """The whole layer in fp32 (every expert); each rank derives it from the seed and uses its part."""

    router: torch.Tensor  # [hidden, num_experts]
    gate: torch.Tensor  # [num_experts, hidden, intermediate]
    up: torch.Tensor  # [num_experts, hidden, intermediate]
    down: torch.Tensor  # [num_experts, intermediate, hidden]

    @classmethod
    def create(cls, config: LayerConfig, device: torch.device) -> MoeWeights:
        generator = torch.Generator().manual_seed(config.seed)
        hidden, inner, experts = config.hidden_size, config.intermediate_size, config.num_experts
        tensors = (
            torch.randn(hidden, experts, generator=generator) / hidden**0.5,
            torch.randn(experts, hidden, inner, generator=generator) / hidden**0.5,
            torch.randn(experts, hidden, inner, generator=generator) / hidden**0.5,
            torch.randn(experts, inner, hidden, generator=generator) / inner**0.5,
        )
        return cls(*(t.to(device) for t in tensors))


def global_batch(config: LayerConfig, counts: list[int], device: torch.device) -> torch.Tensor:
    """Every rank's hidden states, rank after rank: `[sum(counts), hidden]` bf16."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    return torch.randn(sum(counts), config.hidden_size, generator=generator).to(torch.bfloat16).to(device)


def route(hidden: torch.Tensor, weights: MoeWeights, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, renormalised: `[n, top_k]` int32 ids and fp32 weights."""
    probs = torch.softmax(hidden.float() @ weights.router, dim=-1)
    top, ids = probs.topk(top_k, dim=-1)
    return ids.to(torch.int32), top / top.sum(dim=-1, keepdim=True)


def expert_mlp(x: torch.Tensor, weights: MoeWeights, expert: int) -> torch.Tensor:
    """SwiGLU expert `expert` on `[m, hidden]` fp32 rows."""
    gate, up = x @ weights.gate[expert], x @ weights.up[expert]
    return (torch.nn.functional.silu(gate) * up) @ weights.down[expert]


def apply_experts(
    load_rows: Callable[[torch.Tensor], torch.Tensor],
    expert_ids: torch.Tensor,
    router_weights: torch.Tensor,
    weights: MoeWeights,
    experts: range,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped expert compute: for each expert in `experts`, the rows that chose it, weighted.

    `expert_ids` / `router_weights`: `[num_rows, top_k]`; `load_rows(rows)` returns those rows as
    fp32 `[m, hidden]`. Returns the fp32 sum over the chosen experts in `experts` and the sum of
    the terms' magnitudes (the scale of rounding errors), both `[num_rows, hidden]`.
    """
    hidden = weights.down.shape[-1]
    out = torch.zeros(num_rows, hidden, device=expert_ids.device)
    magnitude = torch.zeros_like(out)
    for expert in experts:
        rows, slots = torch.nonzero(expert_ids == expert, as_tuple=True)  # top-k ids of a row are distinct
        if rows.numel() == 0:
            continue
        term = expert_mlp(load_rows(rows), weights, expert) * router_weights[rows, slots, None]
        out.index_add_(0, rows, term)
        magnitude.index_add_(0, rows, term.abs())
    return out, magnitude


class RankLayer:
    """One rank of the MoE layer: its `EpAlltoAll` and its experts; call the steps in order."""

    def __init__(self, ep, weights: MoeWeights, config: LayerConfig):
        from a2a.expert_partition import ExpertPartition

        self.ep, self.weights, self.config = ep, weights, config
        self.experts = ExpertPartition(config.num_experts, ep.ep_size).experts_of(ep.ep_rank)

    def prepare(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route the local tokens: (hidden states, int32 expert ids, fp32 router weights)."""
        expert_ids, router_weights = route(hidden, self.weights, self.config.top_k)
        return hidden, expert_ids, router_weights

    def dispatch(self, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], runtime_max_tokens: int):
        """Rank-major receive buffers (an `a2a.EpDispatchResult`); stale rows' ids are INVALID_EXPERT_ID."""
        hidden, expert_ids, router_weights = prepared
        return self.ep.dispatch(hidden, expert_ids, router_weights, runtime_max_tokens_per_rank=runtime_max_tokens)

    def run_experts(self, received, runtime_max_tokens: int) -> torch.Tensor:
        """This rank's experts on every received row, written into the bf16 combine input buffer."""
        tokens = received.quantized()  # fp8 values + per-token scales, [ep_size * rt, ...]
        out, _ = apply_experts(
            lambda rows: tokens.gather_rows(rows).dequantize(), received.topk_ids, received.topk_weights,
            self.weights, self.experts, self.ep.ep_size * runtime_max_tokens,
        )  # fmt: skip
        buffer = self.ep.get_combine_input_buffer()
        buffer.copy_(out)  # one bf16 rounding of the partial sum
        return buffer

    def combine(self, buffer: torch.Tensor, runtime_max_tokens: int) -> torch.Tensor:
        return self.ep.combine(buffer)


def make_ep(mapping, world, config: LayerConfig):
    """The group's `EpAlltoAll` (its workspace sized exactly for this layer's payloads)."""
    import a2a

    return a2a.EpAlltoAll(config.ep_params(), mapping, world=world)


@dataclass(frozen=True)
class DenseReference:
    """The dense MoE on the full batch: routing, outputs for fp8-dequantized and bf16 inputs, scale."""

    expert_ids: torch.Tensor  # [N, top_k] int32
    out_fp8_input: torch.Tensor  # [N, hidden] fp32
    out_bf16_input: torch.Tensor  # [N, hidden] fp32
    magnitude: torch.Tensor  # [N, hidden] fp32: sum_k |w_k * expert_k(x)|

    @classmethod
    def compute(cls, batch: torch.Tensor, weights: MoeWeights, config: LayerConfig) -> DenseReference:
        from a2a.quantization import quantize_fp8_per_token

        ids, router_weights = route(batch, weights, config.top_k)
        every_expert, num_rows = range(config.num_experts), batch.shape[0]
        dequantized = quantize_fp8_per_token(batch).dequantize()
        original = batch.float()
        routed = (ids, router_weights, weights, every_expert, num_rows)
        out_fp8, magnitude = apply_experts(lambda rows: dequantized[rows], *routed)
        out_bf16, _ = apply_experts(lambda rows: original[rows], *routed)
        return cls(ids, out_fp8, out_bf16, magnitude)


@dataclass(frozen=True)
class RankReport:
    rank: int
    tokens: int
    received: int  # rows this rank received (tokens of any source with an expert here)
    routing_matches: bool  # the rank's router chose the same experts as the dense one
    error_fp8_input: float  # max |out - dense MoE on the same fp8-dequantized inputs|
    tolerance_fp8_input: float
    error_bf16_input: float  # max |out - dense MoE on the unquantized bf16 inputs|
    tolerance_bf16_input: float
    elapsed_ms: float

    @property
    def passed(self) -> bool:
        return (
            self.routing_matches
            and self.error_fp8_input <= self.tolerance_fp8_input
            and self.error_bf16_input <= self.tolerance_bf16_input
        )


def check_rank(
    rank: int, tokens: slice, output: torch.Tensor, expert_ids: torch.Tensor, recv_ids: torch.Tensor,
    dense: DenseReference, elapsed_ms: float,
) -> RankReport:  # fmt: skip
    """Compare rank `rank`'s combine output (its tokens are rows `tokens` of the batch) with the dense MoE."""
    num_tokens = output.shape[0]
    received = int((recv_ids[..., 0] != INVALID_EXPERT_ID).sum())
    if num_tokens == 0:
        return RankReport(rank, 0, received, True, 0.0, 0.0, 0.0, 0.0, elapsed_ms)
    out = output.float()
    scale = dense.magnitude[tokens].max().item()
    error_fp8 = (out - dense.out_fp8_input[tokens]).abs().max().item()  # NaN (an unwritten row) fails
    error_bf16 = (out - dense.out_bf16_input[tokens]).abs().max().item()
    return RankReport(
        rank, num_tokens, received, torch.equal(expert_ids, dense.expert_ids[tokens]),
        error_fp8, BF16_TOLERANCE * scale, error_bf16, (BF16_TOLERANCE + FP8_TOLERANCE) * scale, elapsed_ms,
    )  # fmt: skip


def print_reports(reports: list[RankReport], title: str, config: LayerConfig) -> bool:
    print(f"{title}, {max(r.elapsed_ms for r in reports):.1f} ms for route + quantize + dispatch + experts + combine")
    print(
        f"layer: hidden {config.hidden_size}, {config.num_experts} SwiGLU experts (intermediate "
        f"{config.intermediate_size}), top_k {config.top_k}, fp8 e4m3 per-token dispatch, bf16 combine"
    )
    print(f"{'rank':>4} {'tokens':>6} {'received':>8} {'err vs fp8-in dense':>19} {'tol':>7} "
          f"{'err vs bf16-in dense':>20} {'tol':>7}  result")  # fmt: skip
    for r in reports:
        verdict = "PASS" if r.passed else ("FAIL (routing differs)" if not r.routing_matches else "FAIL")
        print(f"{r.rank:>4} {r.tokens:>6} {r.received:>8} {r.error_fp8_input:>19.5f} {r.tolerance_fp8_input:>7.5f} "
              f"{r.error_bf16_input:>20.5f} {r.tolerance_bf16_input:>7.5f}  {verdict}")  # fmt: skip
    passed = all(r.passed for r in reports)
    failed = [r.rank for r in reports if not r.passed]
    print("result:", f"PASS, all {len(reports)} ranks match the dense MoE" if passed else f"FAIL on ranks {failed}")
    return passed


def run_simulated(config: LayerConfig, num_ranks: int, device: str) -> bool:
    """All ranks in this process: a SimulatedWorld, each rank's ops on its own stream."""
    import a2a

    world = a2a.SimulatedWorld(num_ranks, device)
    counts = config.token_counts(num_ranks)
    starts = [sum(counts[:r]) for r in range(num_ranks + 1)]
    weights = MoeWeights.create(config, world.device)
    batch = global_batch(config, counts, world.device)
    runtime_max_tokens = max(max(counts), 1)
    layers = [RankLayer(make_ep(a2a.Mapping(num_ranks, r), world, config), weights, config) for r in range(num_ranks)]

    start = time.perf_counter()
    payloads = []
    for rank, layer in enumerate(layers):
        world.wait_for_caller(rank)  # the batch was written on the caller's stream
        with world.stream(rank).activate():
            payloads.append(layer.prepare(batch[starts[rank] : starts[rank + 1]]))
    recv = [layer.dispatch(p, runtime_max_tokens) for layer, p in zip(layers, payloads)]
    if world.device.type == "cpu":
        # Host rank streams: the torch ops below run when called, so let every receive land first
        # (on CUDA the rank stream orders them after the dispatch's wait).
        world.synchronize()
    planes = []
    for rank, layer in enumerate(layers):
        with world.stream(rank).activate():
            planes.append(layer.run_experts(recv[rank], runtime_max_tokens))
    outputs = [layer.combine(plane, runtime_max_tokens) for layer, plane in zip(layers, planes)]
    world.synchronize()
    elapsed_ms = (time.perf_counter() - start) * 1e3

    dense = DenseReference.compute(batch, weights, config)
    reports = [
        check_rank(r, slice(starts[r], starts[r + 1]), outputs[r], payloads[r][1], recv[r].topk_ids, dense, elapsed_ms)
        for r in range(num_ranks)
    ]
    return print_reports(reports, f"moe_layer: {num_ranks} ranks simulated in one process on {world.device}", config)


def run_distributed(config: LayerConfig, device_type: str) -> bool:
    """This process is one rank of a torchrun job; rank 0 prints every rank's report."""
    import torch.distributed as dist

    import a2a

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "--distributed needs a launcher: torchrun --nproc-per-node N -m examples.moe_layer --distributed"
        )
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # before nccl: one GPU per process
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        rank, ep_size = dist.get_rank(), dist.get_world_size()
        world = a2a.ProcessWorld(dist.group.WORLD, device)  # MoeAlltoAll(world=dist.group.WORLD) also works
        try:
            counts = config.token_counts(ep_size)
            tokens = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
            weights = MoeWeights.create(config, device)
            batch = global_batch(config, counts, device)
            hidden = batch[tokens]
            # Every rank must pass the same runtime_max_tokens_per_rank: an engine agrees on it with a
            # collective (here it also follows from the seed).
            local_count = torch.tensor([hidden.shape[0]], device=device)
            dist.all_reduce(local_count, op=dist.ReduceOp.MAX)
            runtime_max_tokens = max(int(local_count.item()), 1)
            layer = RankLayer(make_ep(a2a.Mapping(ep_size, rank), world, config), weights, config)

            start = time.perf_counter()
            payloads = layer.prepare(hidden)
            recv = layer.dispatch(payloads, runtime_max_tokens)
            output = layer.combine(layer.run_experts(recv, runtime_max_tokens), runtime_max_tokens)
            world.synchronize()
            elapsed_ms = (time.perf_counter() - start) * 1e3

            dense = DenseReference.compute(batch, weights, config)
            report = check_rank(rank, tokens, output, payloads[1], recv.topk_ids, dense, elapsed_ms)
            reports: list[RankReport | None] = [None] * ep_size
            dist.all_gather_object(reports, report)
            del layer, recv, output
        finally:
            world.close()
    finally:
        dist.destroy_process_group()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if rank == 0:
        title = f"moe_layer: {ep_size} ranks, one process each (torch.distributed {backend}) on {device_type}"
        return print_reports(reports, title, config)
    return all(r.passed for r in reports)


def _import_a2a_for(device: str | None):
    """Import a2a once the device is known: Triton chooses between compiling (CUDA) and the
    interpreter (CPU) when a2a's kernels are defined, so `--device cpu` on a GPU machine sets
    TRITON_INTERPRET=1 first. Returns the device to use ("cuda" or "cpu")."""
    if device == "cpu" and "a2a" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import a2a

    a2a.envs.set_simulation_env()  # before CUDA starts: N simulated ranks share this process's GPU
    if device is None:
        device = "cuda" if a2a.envs.cuda_device_present() else "cpu"
    if (device == "cpu") != a2a.envs.use_triton_interpreter():
        raise SystemExit(
            f"--device {device} needs TRITON_INTERPRET={'1' if device == 'cpu' else '0'} before a2a is imported "
            "(this process already imported it the other way)"
        )
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distributed", action="store_true", help="one process per rank (launch with torchrun)")
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks (ignored with --distributed)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    defaults = LayerConfig()
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate_size)
    parser.add_argument("--experts", type=int, default=defaults.num_experts)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--tokens", type=int, default=defaults.max_tokens_per_rank, help="max tokens per rank")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    for name in ("ranks", "hidden", "intermediate", "experts", "top_k", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        parser.error(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    if not args.distributed and args.experts < args.ranks:
        parser.error(f"--experts ({args.experts}) must be >= --ranks ({args.ranks}): every rank owns an expert")
    config = LayerConfig(args.hidden, args.intermediate, args.experts, args.top_k, args.tokens, args.seed)
    device = _import_a2a_for(args.device)
    if args.distributed:
        passed = run_distributed(config, device)
    else:
        passed = run_simulated(config, args.ranks, device)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
