"""examples/moe_layer.py: the simulated layer in this process, and the same layer under torchrun.

The example checks itself (every rank against a dense single-device MoE) and exits non-zero on a
mismatch; these tests run it, read its verdict and its table, and make sure a corrupted expert
output is caught.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from examples import moe_layer
from tests.conftest import requires_interpreter_in_children

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {"TRITON_INTERPRET": "1", "A2A_SIGNAL_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}


def rank_rows(output: str) -> list[list[str]]:
    """The per-rank rows of the example's table (lines starting with a rank number)."""
    return [line.split() for line in output.splitlines() if line.split() and line.split()[0].isdigit()]


def test_simulated_layer_matches_the_dense_moe(device, capsys):
    assert moe_layer.main(["--ranks", "4", "--device", device]) == 0
    out = capsys.readouterr().out
    assert f"4 ranks simulated in one process on {device}" in out
    assert out.rstrip().endswith("result: PASS, all 4 ranks match the dense MoE"), out
    rows = rank_rows(out)
    counts = moe_layer.LayerConfig().token_counts(4)
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3] and [int(row[1]) for row in rows] == counts, out
    assert all(row[-1] == "PASS" for row in rows)
    # Each token reaches 1..top_k ranks: the received rows add up to between sum(counts) and 2x that.
    received = sum(int(row[2]) for row in rows)
    assert sum(counts) <= received <= 2 * sum(counts), out
    for row in rows:  # errors within tolerances, and the fp8 one visibly non-zero
        error_fp8, tol_fp8, error_bf16, tol_bf16 = map(float, row[3:7])
        assert error_fp8 <= tol_fp8 and 0 < error_bf16 <= tol_bf16


def test_simulated_layer_with_uneven_expert_ownership(device, capsys):
    # 7 experts on 3 ranks (3, 2, 2), top_k 3, 5 / 4 / 3 tokens per rank, hidden 128.
    argv = ["--ranks", "3", "--experts", "7", "--top-k", "3", "--tokens", "5", "--hidden", "128", "--device", device]
    assert moe_layer.main(argv) == 0
    out = capsys.readouterr().out
    assert "result: PASS, all 3 ranks match the dense MoE" in out, out


def test_a_corrupted_expert_output_fails_the_layer(device, capsys, monkeypatch):
    """2% too much on one rank's combine plane: within fp8's budget, but not within bf16 rounding."""
    original = moe_layer.RankLayer.run_experts

    def run_experts_two_percent_high(self, recv, runtime_max_tokens):
        plane = original(self, recv, runtime_max_tokens)
        if self.ep.ep_rank == 1:
            plane.mul_(1.02)
        return plane

    monkeypatch.setattr(moe_layer.RankLayer, "run_experts", run_experts_two_percent_high)
    assert moe_layer.main(["--ranks", "4", "--device", device]) == 1
    out = capsys.readouterr().out
    assert "result: FAIL on ranks" in out, out
    assert any(row[-1] == "FAIL" for row in rank_rows(out)), out


@requires_interpreter_in_children
def test_layer_under_torchrun_with_two_cpu_processes():
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "examples.moe_layer", "--distributed", "--device", "cpu",
    ]  # fmt: skip
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": python_path}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    report = f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert "2 ranks, one process each (torch.distributed gloo) on cpu" in done.stdout, report
    assert done.stdout.rstrip().endswith("result: PASS, all 2 ranks match the dense MoE"), report
    rows = rank_rows(done.stdout)
    assert [row[0] for row in rows] == ["0", "1"] and all(row[-1] == "PASS" for row in rows), report
    assert [int(row[1]) for row in rows] == moe_layer.LayerConfig().token_counts(2), report
