"""The packages' import graph: no cycles, and transfer never pulls in the training loop (pretrain.main_pretrain)."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "transfer")
TRAINING_LOOP = "pretrain.main_pretrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, counting imports inside functions too (they run sooner or later)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}: relative import; the project imports absolutely"
                if node.module in files:
                    deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_cycle_finder_finds_a_cycle_and_the_graph_has_known_edges():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    # the graph is really parsed: the edges this layout is built on are there
    assert {"transfer.index", "transfer.crops", "transfer.gallery"} <= graph["transfer.retrieve"]
    assert "transfer.crops" in graph["transfer.gallery"] and "pretrain.hub" in graph["transfer.trunk"]
    assert "pretrain.hub" in graph[TRAINING_LOOP] and "pretrain.data" in graph["transfer.crops"]


def test_no_import_cycle_in_pretrain_and_transfer():
    assert find_cycle(import_graph()) is None


def test_transfer_and_hub_never_reach_the_training_loop():
    graph = import_graph()
    for name in sorted(graph):
        if name.startswith("transfer") or name == "pretrain.hub":
            assert TRAINING_LOOP not in reachable(graph, name), f"{name} imports {TRAINING_LOOP} (directly or not)"


def test_importing_every_transfer_module_leaves_the_training_loop_unloaded():
    modules = sorted(n for n in import_graph() if n.startswith("transfer"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print({TRAINING_LOOP!r} in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
