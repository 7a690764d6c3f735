"""Several a2a trees in one process (e.g. `.base`, a `git archive` of an older commit, and this
one): each imported under the names `a2a`, `bench` and `tests`, its own modules swapped into
sys.modules while it runs, so lazy imports resolve to that tree. Used by host_ab, host_overhead and
graph_ab, whose A/B differences are smaller than what separate processes of one tree differ by."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

THIS_TREE = Path(__file__).resolve().parents[2]
# tests: bench.harness draws its inputs with tests.support.round_inputs, which older trees may lack or differ in.
_OWN_PREFIXES = ("a2a", "bench", "tests")


def own_modules() -> dict:
    return {name: module for name, module in sys.modules.items() if name.split(".")[0] in _OWN_PREFIXES}


class LoadedTree:
    """One tree's modules (`a2a`, `bench.harness`), imported from `root`, and the environment
    variables (`env`) set while it is active (plans read switches such as A2A_PDL when built)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        self.env = dict(env or {})
        for name in own_modules():
            del sys.modules[name]
        sys.path.insert(0, str(self.root))
        try:
            self.a2a = importlib.import_module("a2a")
            self.harness = importlib.import_module("bench.harness")
        finally:
            sys.path.remove(str(self.root))
        self.modules = own_modules()
        self.check_modules()

    def check_modules(self) -> None:
        """Every module under the own names must come from this tree: an editable install of another
        checkout can serve a module the tree lacks (a2a.ops of this checkout in a tree without it)."""
        for name, module in own_modules().items():
            path = getattr(module, "__file__", None)
            if path is not None and not str(Path(path).resolve()).startswith(str(self.root)):
                raise RuntimeError(f"{name} was imported from {path}, not from the tree at {self.root}")

    def activate(self) -> None:
        """Swap this tree's modules in (its environment is set only inside `active`)."""
        for name in own_modules():
            del sys.modules[name]
        sys.modules.update(self.modules)

    @contextmanager
    def active(self):
        """This tree's modules and environment variables, the previous values restored after."""
        self.activate()
        with mock.patch.dict(os.environ, self.env):
            yield self

    def __str__(self) -> str:
        name = "this tree" if self.root == THIS_TREE else self.root.name
        return name + "".join(f" {k}={v}" for k, v in self.env.items())
