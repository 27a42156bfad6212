"""The shape of the code base: acceptance criteria that no behavioural test sees.

- no import cycle among the modules of ``src/batchplate``;
- no function or method longer than ``MAX_FUNCTION_LINES`` lines outside
  ``src/batchplate/examples/``;
- no private Pyro internals (``_PYRO_STACK``, ``._vectorized``, any ``_name`` of a
  ``pyro`` module) in ``src/batchplate``;
- no reference to the project's internal notes file and no nickname for Pyro
  issue #2220 or its programs (the patterns are in ``FORBIDDEN``), in the
  sources, docs, tests and the CLI's help texts: the references are "Pyro issue
  #2220" and the Contract page (docs/contract.md).

Everything is read with :mod:`ast` or as text; nothing under ``src`` is imported
except :mod:`batchplate.cli`, whose help texts are checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "batchplate"
MAX_FUNCTION_LINES = 60


# ---------------------------------------------------------------------------
# Reading the package
# ---------------------------------------------------------------------------


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``src/batchplate/objectives/base.py`` -> ``batchplate.objectives.base``."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------
# 1. No import cycles
# ---------------------------------------------------------------------------


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:  # a module's level-1 anchor is its package
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``module`` imports, anywhere in its body (top level,
    inside functions, under ``TYPE_CHECKING``), relative or absolute. ``from pkg import
    name`` imports ``pkg.name`` if that is a module, else ``pkg``. Parent packages a
    submodule import runs implicitly are not counted (they would make every
    submodule a cycle with its own ``__init__``)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(module, is_package, node)
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    return {name for name in found if name in modules and name != module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (``[a, b, ..., a]``); empty
    if and only if the graph has no cycle."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == "open":
                cycles.append(stack[stack.index(succ) :] + [succ])
            elif succ not in state:
                visit(succ)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_find_cycles_finds_a_cycle():
    """The checker itself: a planted cycle is found and reported in order."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_relative_imports_resolve():
    node = ast.parse("from ..plate import BatchFrame").body[0]
    assert resolve_from("batchplate.objectives.base", False, node) == "batchplate.plate"
    node = ast.parse("from . import base").body[0]
    assert resolve_from("batchplate.objectives", True, node) == "batchplate.objectives"
    assert resolve_from("batchplate.objectives.rws", False, node) == "batchplate.objectives"


def test_import_graph_of_a_planted_package(tmp_path):
    """The checker itself on files: a cycle through a function-level relative import
    is found; without that import the same package has none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .core import f\n",
        "core.py": "import os\nfrom .util import g\n\ndef f():\n    return g()\n",
        "util.py": "def g():\n    from .core import f  # cycle\n    return f\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from .. import util\nfrom ..core import f\nimport pkg.sub\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.core"},
        "pkg.core": {"pkg.util"},
        "pkg.util": {"pkg.core"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.util", "pkg.core", "pkg.sub"},
    }
    assert find_cycles(graph) == [["pkg.core", "pkg.util", "pkg.core"]]
    (pkg / "util.py").write_text("def g():\n    return 1\n")
    assert find_cycles(import_graph(pkg)) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "batchplate.plate" in graph and graph["batchplate"], "the package was not read"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/batchplate:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


# ---------------------------------------------------------------------------
# 2. Short functions
# ---------------------------------------------------------------------------


def long_functions(tree: ast.Module, limit: int) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length in lines)`` of every function or method
    longer than ``limit`` lines, from its ``def`` line to its last line (nested
    functions counted on their own and as part of the enclosing one)."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > limit:
                        found.append((name, child.lineno, length))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def test_long_functions_are_found():
    """The checker itself: a 62-line method in a class is reported with its length."""
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    tree = ast.parse(
        f"class C:\n    def f(self):\n{body}\n        return x0\n\ndef g():\n    pass\n"
    )
    assert long_functions(tree, MAX_FUNCTION_LINES) == [("C.f", 2, 62)]


def test_no_long_functions():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "examples") in path.parents:
            continue
        for name, line, length in long_functions(parse(path), MAX_FUNCTION_LINES):
            offenders.append(f"  {rel(path)}:{line} {name} ({length} lines)")
    assert not offenders, (
        f"functions longer than {MAX_FUNCTION_LINES} lines outside src/batchplate/examples/:\n"
        + "\n".join(offenders)
    )


# ---------------------------------------------------------------------------
# 3. No private Pyro internals
# ---------------------------------------------------------------------------

PRIVATE_NAMES = {"_PYRO_STACK", "_vectorized"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node: ast.AST) -> str | None:
    """``pyro.poutine.runtime._PYRO_STACK`` for that attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def private_pyro_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, what)`` for each use of a private Pyro internal: importing a ``_name``
    from a ``pyro`` module (or a private ``pyro`` module), the names in
    ``PRIVATE_NAMES`` as a name, an attribute or a ``getattr``/``setattr`` string, and
    any ``pyro.<...>._name`` attribute chain."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pyro":
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            names = [a.name for a in node.names]
            if any(is_private(p) for m in modules for p in m.split(".")[1:]):
                found.append((node.lineno, f"from {node.module} import {', '.join(names)}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pyro" and any(is_private(p) for p in parts):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Name) and node.id in PRIVATE_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            chain = dotted(node)
            if node.attr in PRIVATE_NAMES:
                found.append((node.lineno, f".{node.attr}"))
            elif chain and chain.split(".")[0] == "pyro" and is_private(node.attr):
                found.append((node.lineno, chain))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
                for arg in node.args[1:2]:
                    if isinstance(arg, ast.Constant) and arg.value in PRIVATE_NAMES:
                        found.append((node.lineno, f"{node.func.id}(..., {arg.value!r})"))
    return sorted(set(found))


def test_private_pyro_uses_are_found():
    """The checker itself, on each form it looks for."""
    source = "\n".join(
        [
            "from pyro.poutine.runtime import _PYRO_STACK, apply_stack",
            "import pyro.poutine._private",
            "from pyro.poutine import runtime",
            "a = runtime._PYRO_STACK",
            "b = frame._vectorized",
            "c = getattr(frame, '_vectorized')",
            "d = pyro.poutine.runtime._PYRO_PARAM_STORE",
            "from pyro.infer import Trace_ELBO",
            "e = self._vectorized_particles",
        ]
    )
    found = private_pyro_uses(ast.parse(source))
    assert [line for line, _ in found] == [1, 2, 4, 5, 6, 7]


#: The one accepted use, by (module, function): automatic batching runs each lane
#: (a coroutine) on its own Pyro handler stack by swapping the contents of Pyro's
#: global stack, and Pyro has no public API for several handler stacks side by side.
#: Confined to this function, which returns the two lists and says why.
ALLOWED_PRIVATE = {("src/batchplate/autobatch/_lanes.py", "pyro_global_stacks")}


def allowed_lines(path: Path, tree: ast.Module) -> set[int]:
    """The lines of the functions of ``path`` named in ``ALLOWED_PRIVATE``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (rel(path), node.name) in ALLOWED_PRIVATE:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_allowed_private_use_is_confined_to_its_function():
    source = (
        "def pyro_global_stacks():\n    from pyro.poutine.runtime import _PYRO_STACK\n\n"
        "def elsewhere():\n    from pyro.poutine.runtime import _PYRO_STACK\n"
    )
    path = ROOT / "src/batchplate/autobatch/_lanes.py"
    tree = ast.parse(source)
    found = [line for line, _ in private_pyro_uses(tree) if line not in allowed_lines(path, tree)]
    assert found == [5]


def test_no_private_pyro_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = parse(path)
        allowed = allowed_lines(path, tree)
        for line, what in private_pyro_uses(tree):
            if line not in allowed:
                offenders.append(f"  {rel(path)}:{line} {what}")
    assert not offenders, "private Pyro internals used in src/batchplate:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------
# 4. Wording: Pyro issue #2220 and the Contract page, not internal names
# ---------------------------------------------------------------------------

FORBIDDEN = [
    re.compile(r"design\.md", re.IGNORECASE),
    re.compile(r"\bthe\s+seed(?![-\w])", re.IGNORECASE),  # also with "'s"
    re.compile(r"\bseed's", re.IGNORECASE),
    re.compile(r"\bseed\s+discussion", re.IGNORECASE),
    re.compile(r"\bseed\s+problems?\b", re.IGNORECASE),
    re.compile(r"\bseed[/]batching", re.IGNORECASE),  # the issue's text as a file
]
#: Sources of user-facing text. ``tools/`` generates pages of ``docs/``.
TEXT_ROOTS = ["src", "docs", "tests", "tools", "examples", "benchmarks", "README.md", "mkdocs.yml"]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".yml", ".yaml", ".toml", ".cfg", ".rst", ".ipynb"}


def forbidden_wording(text: str) -> list[tuple[int, str]]:
    """``(line, matched text)`` of every forbidden phrase (a phrase may wrap lines)."""
    found = []
    for pattern in FORBIDDEN:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((line, " ".join(match.group().split())))
    return sorted(set(found))


def test_forbidden_wording_is_found():
    """The checker itself: what it flags and what it leaves alone."""
    text = (
        # (Assembled from pieces so that this file does not itself contain the phrases.)
        "See design" + ".md.\nThe " + "seed's geometric program\nthe\nseed" + " discussion\n"
        "seed Problem 2\nfix the random seed; seed=0; the seeded run; guide='seed'"
    )
    assert [line for line, _ in forbidden_wording(text)] == [1, 2, 2, 3, 4, 5]
    assert forbidden_wording("torch.manual_seed(seed); pass the seed-free run") == []


def text_files() -> list[Path]:
    files = []
    for root in TEXT_ROOTS:
        path = ROOT / root
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES]
    this = Path(__file__).resolve()
    return [p for p in files if p.resolve() != this and "__pycache__" not in p.parts]


def test_no_seed_or_design_md_wording_in_files():
    offenders = []
    for path in text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        hits: dict[int, list[str]] = {}
        for line, what in forbidden_wording(text):
            hits.setdefault(line, []).append(what)
        offenders += [
            f"  {rel(path)}:{line}: {', '.join(map(repr, what))} in {lines[line - 1].strip()!r}"
            for line, what in hits.items()
        ]
    assert not offenders, (
        'cite "Pyro issue #2220" or "the Contract page (docs/contract.md)" instead of:\n'
        + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    "argv", [[], ["run"], ["bench"], ["demo"]], ids=lambda argv: " ".join(argv) or "batchplate"
)
def test_no_seed_or_design_md_wording_in_cli_help(argv, capsys, monkeypatch):
    """``batchplate [COMMAND] --help``, as the console script prints it."""
    from batchplate import cli

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: batchplate" in text
    offenders = forbidden_wording(text)
    command = " ".join(["batchplate", *argv, "--help"])
    assert not offenders, f"{command} says {[what for _, what in offenders]}:\n{text}"
