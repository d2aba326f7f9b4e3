"""Small shared helpers: atomic file writes (nothing a user has is ever half-written)."""
from __future__ import annotations

import os
import tempfile
import typing as tp
from pathlib import Path


def atomic_write(path: tp.Union[str, Path], write: tp.Callable[[str], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it over `path`.

    Permissions follow the umask like a plain open() would (mkstemp alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: tp.Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
