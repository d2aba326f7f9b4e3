"""The package's rooms and their arrows, checked from the source (no import is run).

Rooms, bottom to top: an arrow (an ``import``, at module level or inside a function) may
only go from a room to its own room or to a room of a lower rank, and the module graph
has no circle. Run ``python -m pytest tests/test_architecture.py -q`` to see every
violation; ``python tests/test_architecture.py`` prints the room of each module.
"""
from __future__ import annotations

import ast
import sys
import typing as tp
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "demucs_lora"

RANKS = {
    "core": 0, "assets": 0,        # errors, atomic files, finite checks, paths, stem names
    "lora": 1, "data": 1, "metrics": 1,   # three independent stacks on the core
    "model_files": 2,                     # find and read model files (safe loading, int8)
    "models": 3,                   # build the model a run trains; bags; heads; methods
    "config": 4,                   # Hydra/Dora config: aliases, keys, checks
    "training": 5, "inference": 5,   # the two halves
    "api": 6, "train": 6,          # the public Python API; Dora's entry point (train.py)
    "commands": 7, "grids": 7,     # the CLIs (tools/ and python -m call them); Dora grids
    "__init__": 8,                 # the lazy public facade
}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60



def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> tp.Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known_prefix(name: str, known: tp.Collection[str]) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports(module: str, path: Path, known: tp.Collection[str]) -> tp.Set[str]:
    """The package modules ``module`` imports: ``import a.b`` and ``from a import b`` count
    a.b when it is a module, else a (the module the name is read from)."""
    out: tp.Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "demucs_lora":
                found = _known_prefix(name, known)
                if found and found != module:
                    out.add(found)
    return out


def graph() -> tp.Dict[str, tp.Set[str]]:
    mods = modules()
    return {m: imports(m, p, mods) for m, p in mods.items()}


def upward_arrows() -> tp.Set[tp.Tuple[str, str]]:
    bad = set()
    for src, targets in graph().items():
        for dst in targets:
            a, b = room(src), room(dst)
            if a != b and RANKS[b] >= RANKS[a]:
                bad.add((src, dst))
    return bad


def cycles() -> tp.List[tp.List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    g = graph()
    index: tp.Dict[str, int] = {}
    low: tp.Dict[str, int] = {}
    stack: tp.List[str] = []
    on: tp.Set[str] = set()
    out: tp.List[tp.List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def long_functions() -> tp.Set[str]:
    out = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.add(f"{name}.{node.name}")
    return out


def test_every_module_is_in_a_room():
    unknown = sorted(m for m in modules() if room(m) not in RANKS)
    assert not unknown, f"modules outside the rooms of RANKS: {unknown}"


def test_tests_mirror_the_rooms():
    """Every room with code has its tests in tests/<room>/ (api.py's and train.py's in
    tests/api/ and tests/integration/; grids/ is run by tests/integration/test_grid.py)."""
    tests = PACKAGE.parent / "tests"
    mirror = {"train": "integration", "grids": "integration", "__init__": "api", "assets": None}
    rooms = {room(m) for m in modules()}
    missing = sorted(r for r in rooms if mirror.get(r, r) is not None and
                     not list((tests / mirror.get(r, r)).glob("test_*.py")))
    assert not missing, f"rooms without tests/<room>/test_*.py: {missing}"


def _fixtures(path: Path) -> tp.Set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                "fixture" in ast.unparse(d) for d in node.decorator_list):
            out.add(node.name)
    return out


def test_a_fixture_is_defined_once_per_room():
    """Fixtures that several files of a room use live in its conftest.py (those of every
    room in tests/conftest.py): no two test files of one room define the same name."""
    tests = PACKAGE.parent / "tests"
    twice = []
    for folder in sorted(p for p in tests.iterdir() if p.is_dir()):
        seen: tp.Dict[str, str] = {}
        for path in sorted(folder.glob("test_*.py")):
            for name in _fixtures(path):
                if name in seen:
                    twice.append(f"{folder.name}/: {name} in {seen[name]} and {path.name}")
                seen.setdefault(name, path.name)
    assert not twice, twice


def test_no_import_arrow_runs_upward():
    bad = sorted(upward_arrows())
    assert not bad, "upward imports (room rank must fall): " + "; ".join(
        f"{a} -> {b} ({room(a)} {RANKS[room(a)]} -> {room(b)} {RANKS[room(b)]})" for a, b in bad)


def test_no_import_circle():
    found = sorted(cycles())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_modules_are_small():
    long = {m for m, p in modules().items()
            if len(p.read_text().splitlines()) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {sorted(long)}"


def test_functions_are_short():
    long = long_functions()
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {sorted(long)}"


if __name__ == "__main__":
    for name in modules():
        print(f"{RANKS.get(room(name), '?')!s:>2} {room(name):10} {name}")
