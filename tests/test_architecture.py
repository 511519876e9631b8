"""The package's import graph, read from the source (function-level imports included, imports for
type checkers only excluded): no module imports itself back through others, and the arrows that
ARCHITECTURE.md forbids do not exist."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwenkit"

# (importer, imported): parts of the package that must never depend on each other this way.
FORBIDDEN = [
    ("qwenkit.model", "qwenkit.quant"), ("qwenkit.model", "qwenkit.train"), ("qwenkit.model", "qwenkit.server"),
    ("qwenkit.model", "qwenkit.loading"), ("qwenkit.model", "qwenkit.runtime"), ("qwenkit.model", "qwenkit.chat"),
    ("qwenkit.server", "qwenkit.model"), ("qwenkit.generate", "qwenkit.server"), ("qwenkit.engine", "qwenkit.server"),
    ("qwenkit.quant", "qwenkit.loading"), ("qwenkit.train", "qwenkit.loading.hf"), ("qwenkit.prompts", "qwenkit.model"),
    ("qwenkit.prompts", "qwenkit.generate"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> set[str]:
    """The qwenkit modules `path` imports anywhere in its code, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("qwenkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.startswith("qwenkit"):
                # `from . import x` may name a submodule: count it as one when it is a file.
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if _is_module(candidate) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def _within(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a dependency of those modules on it.
    edges = {m: {t for t in targets if not (_is_init(t) and _within(m, t))} for m, targets in edges.items()}
    cycles, state = [], {}

    def walk(module, stack):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _is_init(name: str) -> bool:
    return (PACKAGE.parent.joinpath(*name.split(".")) / "__init__.py").is_file()


@pytest.mark.parametrize("importer,imported", FORBIDDEN, ids=lambda p: p)
def test_forbidden_arrows(importer, imported):
    offenders = [f"{m} imports {t}" for m, targets in graph().items() if _within(m, importer)
                 for t in targets if _within(t, imported)]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_ones_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qwenkit")):
                offenders += [f"{module_name(path)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "\n".join(offenders)


_IMPORT_EACH = """
import importlib, sys
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == "qwenkit" or n.startswith("qwenkit.")]:
        del sys.modules[name]
    importlib.import_module(module)
"""


def test_each_module_imports_alone():
    """Each module from a clean slate of qwenkit modules (torch and the rest stay loaded: one process),
    so that none works only because another was imported first."""
    modules = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
