"""The package's floors, read from its own imports (docs/architecture.md): every import points
down, and no module reaches itself through its imports (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "a2a"

# Floor of each top-level name under a2a (a folder: every module in it). Imports may stay on a
# floor or go down, never up.
FLOORS = {
    "envs": 0, "kernels": 0, "runtime": 0,
    "layout": 1, "expert_partition": 1, "errors": 1, "workspace": 1, "quantization": 1,
    "ops": 2,
    "moe_alltoall": 3, "functional": 3, "torch_ops": 3, "reference": 3, "ep_layer": 3, "mapping": 3,
    "__init__": 3,
}  # fmt: skip
# Floor 0 is three independent parts: each imports only itself (runtime may read a2a.envs).
FLOOR_ZERO_ALLOWED = {"envs": set(), "kernels": {"kernels"}, "runtime": {"runtime", "envs"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def a2a_imports(path: Path) -> set[str]:
    """Every a2a module `path` imports, anywhere in it (resolved to modules, not names)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a2a import envs` imports the module a2a.envs; `from a2a.x import name`, a2a.x.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            if name in modules and (name == "a2a" or name.startswith("a2a.")):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        edges[name] = {m for m in a2a_imports(path) if m != name}
    return edges


def top(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_has_a_floor():
    assert {top(name) for name in graph()} <= set(FLOORS), "add the new module to FLOORS (and docs/architecture.md)"


def test_imports_point_down():
    upward = []
    for name, imported in graph().items():
        for other in imported:
            if top(other) == "__init__" and top(name) != "__init__":
                upward.append(f"{name} -> {other}")
            elif FLOORS[top(other)] > FLOORS[top(name)]:
                upward.append(f"{name} -> {other}")
            elif FLOORS[top(name)] == 0 and top(other) not in FLOOR_ZERO_ALLOWED[top(name)]:
                upward.append(f"{name} -> {other}")
    assert not upward, "upward or sideways imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: a fake package with a cycle and a kernel importing the runtime."""
    fake = tmp_path / "a2a"
    (fake / "kernels").mkdir(parents=True)
    (fake / "runtime").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "runtime" / "__init__.py").write_text("")
    (fake / "kernels" / "k.py").write_text("from a2a.runtime import r\n")
    (fake / "runtime" / "r.py").write_text("import a2a.runtime.s\n")
    (fake / "runtime" / "s.py").write_text("def f():\n    from a2a.runtime import r\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert "a2a.runtime.r" in graph()["a2a.kernels.k"]
    for check in (test_imports_point_down, test_no_import_cycle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a broken package")
