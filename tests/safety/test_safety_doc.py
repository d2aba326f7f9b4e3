"""docs/safety.md: every test it names exists (a row pointing at a renamed or deleted test
would be a claim nothing checks), and every table row names at least one test."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "safety.md"
_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`")


def _references(text):
    """(file, test or None) for each `tests/x.py::name`, `tests/x.py` and `::name` (the
    last file named before it)."""
    out, last = [], None
    for match in _REF.finditer(text):
        path, name, short = match.groups()
        if path:
            last = path
            out.append((path, name))
        else:
            out.append((last, short))
    return out


def test_every_named_test_exists():
    refs = _references(DOC.read_text())
    assert len(refs) > 30
    for path, name in refs:
        source = (REPO / path).read_text()
        if name is not None:
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name}"


def test_every_table_row_names_a_test():
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| input", "| what you write",
                                                            "| event")):
            assert "`tests/" in line or "`::" in line, line


def test_readme_links_the_safety_doc():
    assert "(docs/safety.md)" in (REPO / "README.md").read_text()
