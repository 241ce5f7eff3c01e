"""The folders are the pipeline's stages (README, Layout): imports flow one way through them, and
no module imports itself back through others (no cycle, not even inside a function)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lm_human_preferences"
# Lower layers never import higher ones; a module may import its own layer.
LAYERS = [
    "utils",
    "language",  # with language.corpora
    "task",
    "labeling",  # label data: types, files, mock labelers, collection, sources
    "labeling.app",  # the web app for people
    "training",
    "evaluation",
    "experiments",
    "cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The deepest layer whose name is a prefix of `module`."""
    best = None
    for index, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            if best is None or len(name) > len(LAYERS[best]):
                best = index
    assert best is not None, f"{module} is in no layer of {LAYERS}; add it to the README's Layout and here"
    return best


def imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm_human_preferences"):
            base = node.module.removeprefix("lm_human_preferences").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in MODULES or not base else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lm_human_preferences.") for a in node.names
                      if a.name.startswith("lm_human_preferences.")}
    return {m for m in found if m}


GRAPH = {name: imports(path) for name, path in MODULES.items() if name}


def test_every_module_is_in_a_layer():
    assert len(GRAPH) > 40
    for name in GRAPH:
        layer_of(name)


def test_every_import_names_a_module_that_exists():
    missing = [f"{name} imports {imported}" for name, targets in GRAPH.items() for imported in targets
               if imported not in MODULES]
    assert not missing, missing


def test_imports_flow_one_way():
    upward = [f"{name} imports {imported}" for name, targets in GRAPH.items() for imported in targets
              if layer_of(imported) > layer_of(name)]
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    # a package's __init__ is not an edge to its modules, so `labeling.app` importing nothing is fine
    cycle = find_cycle({name: {t for t in targets if t != name} for name, targets in GRAPH.items()})
    assert cycle is None, " → ".join(cycle)
