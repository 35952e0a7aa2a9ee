"""The runtime package's shape: its modules import one another without a cycle (function-level imports
included), and none imports a developer tool or runs an external program."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rmsprop_gpu"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every rmsprop_gpu module this file imports, at any depth of its code."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names + [target] if n.startswith("rmsprop_gpu")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rmsprop_gpu")}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in _imports(path):
            while name and name not in files:  # "from . import backends" names a module; a symbol names its module
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != mod and not (mod.startswith(name + ".") and files[name].name == "__init__.py"):
                deps.add(name)
        graph[mod] = deps
    return graph


def test_the_runtime_package_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if dep.startswith(node + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_runtime_package_imports_no_tool_and_runs_no_program():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "subprocess" not in text and "os.system" not in text, path
        assert "from tools" not in text and "import tools" not in text and "tests." not in text, path
