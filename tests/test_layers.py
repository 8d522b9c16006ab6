"""The layout's rules, read from the source: no import circles, no upward imports, no hidden imports.

Layers, lowest first (ARCHITECTURE.md): a module may import its own component and lower layers only.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import qdistill

PACKAGE = Path(qdistill.__file__).parent
LAYERS = {
    "version": 0, "errors": 0,
    "io": 1, "batch": 1, "factory": 1, "recipe": 1,
    "data": 2, "models": 2, "quant": 2,
    "kd": 3, "train": 3, "evaluate": 3,
    "export": 4,
    "report": 5, "runtime": 5,
    "runs": 6,
    "api": 7, "__init__": 7,
    "cli": 8, "__main__": 8,
}
OPTIONAL = {"torchvision", "timm", "transformers", "tensorboard", "torch.utils.tensorboard"}  # may be imported late


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("qdistill", *parts)).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported(module: str, node: ast.ImportFrom | ast.Import, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("qdistill")]
    if node.level or not (node.module or "").startswith("qdistill"):
        return []
    names = []
    for alias in node.names:  # `from qdistill.x import y` imports module qdistill.x.y when that is a module
        submodule = f"{node.module}.{alias.name}"
        names.append(submodule if submodule in modules else node.module)
    return names


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    hidden = []
    for name, tree in modules.items():
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _imported(name, node, set(modules))
            edges[name].update(target for target in targets if target != name)
            if id(node) not in top_level and not _guarded(node, tree):
                root = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if root not in OPTIONAL and (root or "").split(".")[0] not in OPTIONAL:
                    hidden.append(f"{name}: import of {root} inside a function")
    return edges, hidden


def _guarded(node: ast.AST, tree: ast.Module) -> bool:
    # module-level `if TYPE_CHECKING:` / try-blocks count as top level
    for statement in tree.body:
        if isinstance(statement, (ast.If, ast.Try)) and any(child is node for child in ast.walk(statement)):
            return True
    return False


def test_every_module_has_a_layer():
    assert {_component(name) for name in _modules()} <= set(LAYERS)


def test_no_upward_imports():
    edges, _ = _graph()
    upward = []
    for source, targets in edges.items():
        for target in targets:
            if target == "qdistill":  # the package root is the top: nothing below may import it (e.g. for __version__)
                upward.append(f"{source} -> the package root")
            elif LAYERS[_component(target)] > LAYERS[_component(source)]:
                upward.append(f"{source} -> {target}")
    assert upward == []


def test_no_import_circles():
    edges, _ = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_imports_hidden_in_function_bodies():
    _, hidden = _graph()
    assert hidden == []
