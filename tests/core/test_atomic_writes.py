"""Every file the package and the benchmarks write goes through demucs_lora.core.files.

Checked from the source (nothing is run): a call that writes a file (``write_text``,
``write_bytes``, ``torch.save``, ``sf.write``, ``save_file``, ``shutil.copy*``,
``json.dump``, ``savefig``, ``open(..., "w"/"a"/"x")``) must write to the temp a writer
of ``atomic_write``/``atomic_write_group`` is handed (a name ``tmp``/``t``, or
``Path(tmp)``/``str(tmp)``), or to an in-memory buffer (``buf``). `ALLOWED` lists the
few files that cannot be renamed into place, and why.
"""
from __future__ import annotations

import ast
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "demucs_lora", ROOT / "benchmarks"]
WRITERS = {"write_text", "write_bytes", "save", "write", "save_file", "copy", "copyfile",
           "copy2", "dump", "savefig"}
TARGETS = {"tmp", "t", "buf"}
ALLOWED = {
    # the child processes' combined output, streamed while they run (a log, not a result)
    ("benchmarks/quality.py", "dora_run"),
    # an empty lock file (flock), never read: the protocol processes' results JSON lock
    ("benchmarks/quality_protocol.py", "_locked"),
}


def _target_arg(call: ast.Call) -> tp.Optional[ast.AST]:
    """The argument naming the file a writer call writes, None when it writes no file."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name == "open":
        mode = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "mode"), None)
        text = mode.value if isinstance(mode, ast.Constant) else "r"
        return call.args[0] if set(str(text)) & set("wax") else None
    if name not in WRITERS or not isinstance(func, ast.Attribute):
        return None
    if name in ("write_text", "write_bytes"):
        return func.value
    if name == "write" and getattr(func.value, "id", None) not in ("sf", "soundfile"):
        return None  # file.write / os.write on a handle opened elsewhere
    if name == "save" and getattr(func.value, "id", None) != "torch":
        return None
    if name == "dump" and getattr(func.value, "id", None) not in ("json", "yaml"):
        return None
    index = {"save": 1, "dump": 1, "copy": 1, "copyfile": 1, "copy2": 1, "save_file": 1,
             "savefig": 0, "write": 0}[name]
    return call.args[index] if len(call.args) > index else None


def _is_temp(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in TARGETS
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Path", "str"):
        return len(node.args) == 1 and _is_temp(node.args[0])
    return False


class _Scan(ast.NodeVisitor):
    """Writer calls whose target is not a temp, with the innermost function around them."""

    def __init__(self, rel: str):
        self.rel, self.where, self.found = rel, "<module>", []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer, self.where = self.where, node.name
        self.generic_visit(node)
        self.where = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        target = _target_arg(node)
        if target is not None and not _is_temp(target) and (self.rel, self.where) not in ALLOWED:
            self.found.append(f"{self.rel}:{node.lineno} ({self.where}): "
                              f"{ast.unparse(node)[:80]}")
        self.generic_visit(node)


def direct_writes() -> tp.List[str]:
    out = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            scan = _Scan(str(path.relative_to(ROOT)))
            scan.visit(ast.parse(path.read_text()))
            out += scan.found
    return out


def test_every_write_goes_through_the_atomic_writer():
    found = direct_writes()
    assert not found, ("files written in place (use demucs_lora.core.files.atomic_write, "
                       "atomic_write_text or atomic_torch_save):\n  " + "\n  ".join(found))


def test_the_scan_sees_a_direct_write(tmp_path):
    tree = ast.parse("def f(p, obj):\n    torch.save(obj, p)\n    p.write_text('x')\n"
                     "    atomic_write(p, lambda tmp: torch.save(obj, tmp))\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    flagged = [ast.unparse(c) for c in calls
               if _target_arg(c) is not None and not _is_temp(_target_arg(c))]
    assert flagged == ["torch.save(obj, p)", "p.write_text('x')"]
