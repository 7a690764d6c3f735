"""Which dispatches and combines run fused on this GPU: for the benchmark's round (8 simulated
ranks, DeepSeek bf16), each fused variant's programs the GPU holds at once (occupancy API), its
tiles, and the largest token count per rank that fuses (`a2a.ops.configs.fused_dispatch_max_tokens`,
`fused_combine_max_tokens`).

    python -m bench.profile.fused_limit [tokens ...]
"""

import sys

from a2a import envs

envs.set_simulation_env()

import a2a  # noqa: E402
from bench.harness import Round  # noqa: E402


def main() -> None:
    for tokens in [int(t) for t in sys.argv[1:]] or [16]:
        round_ = Round.build(a2a.SimulatedWorld(8, "cuda"), tokens, "deepseek", "bf16")
        round_.check()  # builds every plan
        plans = [plan for plan in round_.ranks[0]._context.plans.values() if hasattr(plan, "fused_max_tokens")]
        for plan in plans:
            fused = getattr(plan, "fused", None)
            if isinstance(fused, dict):  # dispatch: a variant per routing block
                resident = {block: launch.resident_programs() for block, launch in fused.items()}
                print(f"fused dispatch limit, round of {tokens} tokens: programs resident on the GPU per block "
                      f"{resident}, {plan.num_tiles} tiles a token, fused up to {plan.fused_max_tokens} tokens a rank",
                      flush=True)  # fmt: skip
                continue
            resident = fused.resident_programs() if fused is not None else None
            print(f"fused limit, round of {tokens} tokens: {resident} fused programs resident on the GPU, "
                  f"{getattr(plan, 'fused_tiles', None)} tiles a token, fused up to {plan.fused_max_tokens} tokens "
                  f"a rank (in_workspace={plan.in_workspace})", flush=True)


if __name__ == "__main__":
    main()
