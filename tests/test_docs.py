"""The README and docs/ hold together: every relative link resolves (file and #anchor), and
the tables generated from code match their generator."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|\!\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if not re.match(r"^[a-z]+:", target):
            yield target


def test_anchor_rule():
    assert anchor("Stems: the base's sources, new stems, file names") == \
        "stems-the-bases-sources-new-stems-file-names"
    assert anchor("The demo, step by step (`make demo`)") == "the-demo-step-by-step-make-demo"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_docs_are_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from README.md"


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


def test_generated_docs_are_current():
    from tools.gen_docs import stale
    assert stale() == [], "run python -m tools.gen_docs"


def test_stale_block_is_detected(tmp_path):
    from tools import gen_docs
    page = tmp_path / "aliases.md"
    page.write_text("x\n<!-- aliases:start -->\n| old |\n<!-- aliases:end -->\n")
    assert gen_docs.stale(tmp_path) == ["aliases.md"]
    page.write_text(gen_docs.replace_block(page.read_text(), "aliases", gen_docs.alias_table()))
    assert gen_docs.stale(tmp_path) == []
