"""What the project says about itself: CI runs the README's test command, verbatim."""

from pathlib import Path

from tests.conftest import requires_interpreter

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, commands
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_has_a_demo_command():
    assert any("python -m examples.demo" in c for c in readme_commands())


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.split("```")[0] for block in text.split("```python\n")[1:]]


def test_the_readme_per_rank_example_runs_as_written(capsys):
    """The "API in brief" block, executed literally: a per-rank program run for every rank, its
    own assertions against the toy experts' closed form."""
    block = next(b for b in readme_python_blocks() if "world.run_ranks(rank_program)" in b)
    namespace: dict = {}
    exec(compile(block, "README.md (API in brief)", "exec"), namespace)
    assert "every rank's combined output" in capsys.readouterr().out
    for moe in namespace["moe"]:
        moe._reset_workspace()


@requires_interpreter
def test_a_serial_per_rank_loop_on_the_cpu_raises_instead_of_reading_empty_views():
    """The same program called rank after rank from one thread (not run_ranks): rank 0 would read
    its receive views before its peers dispatched. On the CPU that is refused before rank 0's
    combine runs (on CUDA the views are stream-ordered, so the loop is correct there)."""
    import pytest
    import torch

    import a2a

    world = a2a.SimulatedWorld(2, "cpu")
    moe = [a2a.MoeAlltoAll(a2a.Mapping(2, r), 4, 1, 2, hidden_size=8, world=world) for r in range(2)]
    experts = torch.zeros(2, 1, dtype=torch.int32)
    recv = moe[0].dispatch(experts, [torch.ones(2, 8, dtype=torch.bfloat16)], 2)  # rank 1 has not dispatched
    with pytest.raises(a2a.PhaseError, match=r"rank\(s\) \[1\] have not dispatched yet"):
        moe[0].get_combine_payload_tensor_in_workspace(2, 8, torch.bfloat16)
    del recv
    moe[1].dispatch(experts, [torch.ones(2, 8, dtype=torch.bfloat16)], 2)  # now rank 0's views are complete
    plane = moe[0].get_combine_payload_tensor_in_workspace(2, 8, torch.bfloat16)
    assert plane.shape == (2, 2, 8)
    for m in moe:
        m._reset_workspace()
