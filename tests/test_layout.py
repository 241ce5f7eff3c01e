"""Imports flow one way (README, Layout): command lines → training → labeling → language → utils."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lm_human_preferences"
# Lower layers never import higher ones; a module may import its own layer.
LAYERS = [
    {"utils"},
    {"language", "corpora"},
    {"lm_tasks", "policy", "rewards", "labeling"},
    {"run", "resume", "stopping", "train_reward", "train_policy", "online"},
    {"demo", "report", "experiments", "options", "serve", "cli"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("lm_human_preferences.") else module
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer of {LAYERS}; add it to the README's Layout and here")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm_human_preferences"):
            if node.module == "lm_human_preferences":
                found |= {f"lm_human_preferences.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lm_human_preferences.")}
    return found


def test_imports_flow_one_way():
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 30
    upward = []
    for path in modules:
        name = "lm_human_preferences." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in imports(path):
            if layer_of(imported) > layer_of(name):
                upward.append(f"{name} imports {imported}")
    assert not upward, upward
