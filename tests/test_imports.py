"""No import circles: a static check of every import statement, and a fresh interpreter per entry order."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package name it is installed as (backends/ is ckptfmt.backends)
PACKAGES = {"ckptfmt": "ckptfmt", "backends": "ckptfmt.backends"}
#: optional dependencies whose absence makes a module unimportable on purpose
OPTIONAL = ("torch", "cupy", "h5py")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its body, functions included.

    Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they cannot close a circle.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = node.module if not node.level else f"{base}.{node.module}" if node.module else base
            for a in node.names:  # "from . import x" imports the submodule x, not the package again
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else str(target))
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["ckptfmt.backends.torch"] >= {"ckptfmt.backends._cuda"}  # the finder sees the real edges
    assert _cycles(graph) == []


def test_every_module_imports_first_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Each module imported first (leaves before the package) in one fresh interpreter each batch."""
    names = [n for n in _modules() if not n.endswith("__main__")]
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    script = (
        "import importlib, sys\n"
        f"missing = {missing!r}\n"
        "name = sys.argv[1]\n"
        "try:\n"
        "    importlib.import_module(name)\n"
        "except ImportError as e:\n"
        "    if (e.name or '').partition('.')[0] not in missing: raise\n"
    )
    # one interpreter, each module imported first after a clean slate of ours
    batch = (
        "import importlib, sys\n"
        f"missing = {missing!r}\n"
        f"for name in {sorted(names, reverse=True)!r}:\n"
        "    for m in [m for m in sys.modules if m == 'ckptfmt' or m.startswith('ckptfmt.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if (e.name or '').partition('.')[0] not in missing: raise\n"
    )
    done = subprocess.run([sys.executable, "-c", batch], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    # the two modules that once imported each other, each truly first in a new interpreter
    for name in ("ckptfmt.backends._cuda", "ckptfmt._demo"):
        done = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert done.returncode == 0, done.stderr
