"""Regenerate the generated parts of docs/: `python -m tools.gen_docs` (`--check`: only compare).

Tables that code owns are written from the code, never by hand, so they cannot drift:
docs/aliases.md from `demucs_lora.config.aliases.ALIASES`. The benchmark tables are written
by `python -m benchmarks.run_all` (docs/benchmarks.md) from benchmarks/results/*.json.
`tests/test_docs.py` fails when a generated block differs from what this writes.
"""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def alias_table() -> str:
    from demucs_lora.config.aliases import ALIASES
    rows = ["| guide spelling | canonical key | note |", "|---|---|---|"]
    rows += [f"| `{alias}` | `{entry.canonical}` | {entry.note} |".replace(" |  |", " | |")
             for alias, entry in ALIASES.items()]
    return "\n".join(rows)


# file -> (marker name, generator)
GENERATED: tp.Dict[str, tp.Tuple[str, tp.Callable[[], str]]] = {
    "aliases.md": ("aliases", alias_table),
}


def replace_block(text: str, name: str, body: str) -> tp.Optional[str]:
    """`text` with the block between `<!-- NAME:start -->` and `<!-- NAME:end -->` set to
    body; None when a marker is missing or they are out of order. Every generated block of
    docs/ goes through it (this module, benchmarks.run_all, benchmarks.quality_report)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return None
    return text[:i + len(start)] + "\n" + body.rstrip() + "\n" + text[j:]


def _replaced(path: Path, name: str, body: str) -> str:
    new = replace_block(path.read_text(), name, body)
    if new is None:
        raise ValueError(f"{path}: markers <!-- {name}:start/end --> not found")
    return new


def stale(docs: Path = DOCS) -> tp.List[str]:
    """Generated docs whose block differs from what the code generates now."""
    out = []
    for name, (marker, make) in GENERATED.items():
        if _replaced(docs / name, marker, make()) != (docs / name).read_text():
            out.append(name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"docs/{name} is stale: run python -m tools.gen_docs")
        return 1 if names else 0
    from demucs_lora.core.files import atomic_write_text
    for name, (marker, make) in GENERATED.items():
        path = DOCS / name
        atomic_write_text(path, _replaced(path, marker, make()))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
