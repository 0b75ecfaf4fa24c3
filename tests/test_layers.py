"""pr1's imports point down the layers (DESIGN.md, "Layers"), with no cycle and no private names.

An AST walk over pr1/ (nothing is imported, so a module that fails to import still gets checked)
builds the import graph of every module: `import a.b`, `from a import b` (b a module or a name),
relative imports, and imports inside functions or `if TYPE_CHECKING:` blocks alike, since each is a
dependency the reader has to follow. The graph is then checked for

- a cycle between files (`pr1.eval.problems` <-> `pr1.eval.release_files`),
- a cycle between nodes: each subpackage (`pr1.models`, `pr1.data`, ...) is one node, each top-level
  module (`pr1/chat.py`, `pr1/sharding.py`, ...) is its own, and so is each `__main__` (a CLI),
- an edge that points up or sideways in `LAYERS`,
- an import of another module's underscore name, by `from m import _x` or by `m._x`.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

PR1 = pathlib.Path(__file__).resolve().parents[1] / "pr1"

# Bottom to top. A node may import nodes of lower layers; nodes of one layer may import each other
# only where `peers` says so (the acyclicity check still applies). `__main__` modules are CLIs and
# sit on top wherever their package is.
LAYERS: tuple[tuple[str, frozenset[str], bool], ...] = (
    # Self-contained helpers that know nothing of the model: meshes, multi-host, image decoding,
    # the HTTP retry policy and URL check, the OpenAI-compatible chat client, statistics, CLI errors.
    (
        "foundation",
        frozenset({"sharding", "distributed", "images", "http_policy", "chat", "stats", "cli"}),
        True,
    ),
    ("models", frozenset({"models"}), False),
    # The four components of a step are independent of one another (DESIGN.md's data flow).
    ("components", frozenset({"data", "rollout", "rewards", "rl"}), False),
    ("train", frozenset({"train"}), False),
    (
        "applications",
        frozenset(
            {"eval", "annotate", "analyze", "bench", "export", "plot", "debug_ablation", "pr1", "__main__"}
        ),
        True,
    ),
)

# Private names some module may still import from another (none: keep it that way).
ALLOWED_PRIVATE_IMPORTS = frozenset()


@dataclasses.dataclass
class ImportGraph:
    edges: dict[str, set[str]]  # module -> the pr1 modules it imports
    private: list[tuple[str, str, str, int]]  # (importer, module, underscore name, line)


def module_name(path: pathlib.Path, root: pathlib.Path) -> tuple[str, bool]:
    """("pr1.a.b", is_package) of a file under `root` (pr1/)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def build_graph(root: pathlib.Path = PR1) -> ImportGraph:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = {name for name, _ in files}
    edges: dict[str, set[str]] = {}
    private: list[tuple[str, str, str, int]] = []
    for (name, is_package), path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        aliases: dict[str, str] = {}  # a local name bound to a pr1 module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "pr1":
                        continue
                    targets.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["pr1"] = "pr1"
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.add(sub)
                        aliases[alias.asname or alias.name] = sub
                    else:
                        targets.add(base)
                    if _is_private(alias.name) and base != name:
                        private.append((name, base, alias.name, node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = _dotted(node.value, aliases)
                if owner in modules and owner != name:
                    private.append((name, owner, node.attr, node.lineno))
        edges[name] = {t for t in targets if t != name}
    return ImportGraph(edges, private)


def _absolute(name: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        module = node.module or ""
        return module if module.split(".")[0] == "pr1" else None
    package = name.split(".") if is_package else name.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The pr1 module an expression like `loop` or `pr1.train.loop` names, else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value, aliases)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def node_of(module: str) -> str:
    """The package-graph node of a module: its subpackage, its own name if top-level, or __main__."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__" if len(parts) == 2 else f"{parts[1]}.__main__"
    return parts[1] if len(parts) > 1 else "pr1"


def layer_of(node: str) -> int:
    key = "__main__" if node.endswith("__main__") else node
    for rank, (_, members, _) in enumerate(LAYERS):
        if key in members:
            return rank
    raise AssertionError(f"pr1 node {node!r} is in no layer; add it to LAYERS in {__file__}")


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in edges.items():
        a = node_of(module)
        out.setdefault(a, set())
        for t in targets:
            if node_of(t) != a:
                out[a].add(node_of(t))
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def layer_violations(pkg_edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in sorted(pkg_edges.items()):
        for b in sorted(targets):
            ra, rb = layer_of(a), layer_of(b)
            if rb > ra or (rb == ra and not LAYERS[ra][2]):
                bad.append(f"{a} ({LAYERS[ra][0]}) imports {b} ({LAYERS[rb][0]})")
    return bad


def all_cycles(edges: dict[str, set[str]], limit: int = 20) -> list[list[str]]:
    """Cycles found one at a time, each reported cycle's last edge removed before the next search,
    so that every cycle of the graph is reported through at least one of its edges."""
    edges = {a: set(b) for a, b in edges.items()}
    cycles = []
    while len(cycles) < limit and (cycle := find_cycle(edges)):
        cycles.append(cycle)
        edges[cycle[-2]].discard(cycle[-1])
    return cycles


def check(graph: ImportGraph, allowed_private=frozenset()) -> list[str]:
    """Every problem of the graph, as messages; empty when the layers hold."""
    problems = ["import cycle between files: " + " -> ".join(c) for c in all_cycles(graph.edges)]
    pkg = package_edges(graph.edges)
    problems += ["import cycle between packages: " + " -> ".join(c) for c in all_cycles(pkg)]
    problems += [f"layers: {v}" for v in layer_violations(pkg)]
    for importer, module, attr, line in graph.private:
        if (importer, module, attr) not in allowed_private:
            problems.append(
                f"{importer} (line {line}) uses {module}.{attr}, a private name of another module"
            )
    return problems


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


def test_pr1_layers_point_down(graph):
    problems = check(graph, ALLOWED_PRIVATE_IMPORTS)
    assert not problems, "\n".join(problems)


def test_graph_sees_the_imports_it_must(graph):
    # The walk resolves each import form; a checker that saw no edges would pass everything.
    assert "pr1.models.config" in graph.edges["pr1.models.rope"]  # from pr1.models.config import X
    assert "pr1.sharding" in graph.edges["pr1.models.hf"]  # from pr1 import sharding as sharding_lib
    assert "pr1.eval.registry" in graph.edges["pr1.eval.__main__"]  # from pr1.eval import registry (lazy)
    pkg = package_edges(graph.edges)
    assert {"models", "rewards", "rl", "rollout", "data"} <= pkg["train"]


def _fake(tmp_path: pathlib.Path, files: dict[str, str]) -> ImportGraph:
    root = tmp_path / "pr1"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_graph(root)


def test_checker_finds_a_cycle_between_packages(tmp_path):
    graph = _fake(
        tmp_path,
        {
            "models/__init__.py": "",
            "models/a.py": "import pr1.data.b\n",
            "data/__init__.py": "",
            "data/b.py": "def f():\n    from pr1.models import a\n",
        },
    )
    problems = check(graph)
    assert any("between files: pr1.data.b -> pr1.models.a -> pr1.data.b" in p for p in problems), problems
    assert any("between packages: data -> models -> data" in p for p in problems), problems
    assert any("models (models) imports data (components)" in p for p in problems), problems


def test_checker_finds_relative_cycles_siblings_and_private_names(tmp_path):
    graph = _fake(
        tmp_path,
        {
            "rollout/__init__.py": "",
            "rollout/x.py": "from .y import Y\nfrom pr1.rewards import z\n",
            "rollout/y.py": "from . import x\nY = 1\n",
            "rewards/__init__.py": "",
            "rewards/z.py": "",
            "train/__init__.py": "",
            "train/t.py": "from pr1.rollout.y import _hidden\nimport pr1.rollout.x as rx\nrx._cache\n",
        },
    )
    problems = check(graph)
    assert any("between files: pr1.rollout.x -> pr1.rollout.y -> pr1.rollout.x" in p for p in problems)
    assert any("rollout (components) imports rewards (components)" in p for p in problems), problems
    assert any("pr1.rollout.y._hidden" in p for p in problems), problems
    assert any("pr1.rollout.x._cache" in p for p in problems), problems
    allowed = {("pr1.train.t", "pr1.rollout.y", "_hidden"), ("pr1.train.t", "pr1.rollout.x", "_cache")}
    assert not [p for p in check(graph, allowed) if "private" in p]


def test_checker_passes_a_graph_that_points_down(tmp_path):
    graph = _fake(
        tmp_path,
        {
            "sharding.py": "",
            "models/__init__.py": "",
            "models/m.py": "from pr1 import sharding\n",
            "train/__init__.py": "",
            "train/__main__.py": "from pr1.train import loop\n",
            "train/loop.py": "from pr1.models.m import *\nfrom .. import sharding\n",
        },
    )
    assert check(graph) == []
