"""Small shared helpers: atomic file writes (nothing a user has is ever half-written).

Every file a run or a tool writes goes through `atomic_write` (one file; `atomic_write_text`
and `atomic_torch_save` for the two common payloads) or `atomic_write_group` (files that
only make sense together, e.g. an adapter's ``.safetensors`` + ``.json``): the data goes to ``.NAME.XXXX.tmp`` beside the target and
is renamed over it once complete, so a kill or a full disk leaves the old file or the new
one, never a torn one. A write that fails for lack of space or on a read-only folder is a
`DiskWriteError` naming the file; `remove_stale_temps` deletes the temps a killed write
left behind.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import time
import typing as tp
from pathlib import Path

PathLike = tp.Union[str, Path]
Writer = tp.Callable[[str], None]

_DISK_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
                errno.EPERM: "Operation not permitted", errno.EFBIG: "File too large"}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_LOW_SPACE = 1 << 20  # below this many free bytes, a failed write is blamed on the disk


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _disk_reason(folder: PathLike, exc: BaseException) -> tp.Optional[str]:
    """'No space left on device' / 'Read-only file system' / ... when `exc` (or the state
    of `folder` right after it) says the disk is at fault; None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # torch.save wraps OSErrors
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[exc.errno]
        code = _OS_ERROR.search(str(exc))   # safetensors' SafetensorError: "(os error 28)"
        if code and int(code.group(1)) in _DISK_ERRNOS:
            return _DISK_ERRNOS[int(code.group(1))]
        exc = exc.__cause__ or exc.__context__
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return _DISK_ERRNOS[errno.EROFS]
    if stat.f_bavail * stat.f_frsize < _LOW_SPACE:
        return _DISK_ERRNOS[errno.ENOSPC]
    return None


def disk_error_of(exc: BaseException):
    """The DiskWriteError for an OSError of a full, read-only or forbidden disk raised
    outside our writers (Dora creating outputs/), naming its file; None for others."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRNOS:
        return None
    return _disk_error(exc.filename or "a file", _DISK_ERRNOS[exc.errno])


def _disk_error(path: PathLike, reason: str):
    from demucs_lora.core.errors import DiskWriteError
    fix = ("free some space" if "space" in reason or "quota" in reason
           else "make the folder writable or write elsewhere")
    return DiskWriteError(f"cannot write {path}: {reason} ({fix}, then run the same command "
                          "again; nothing half-written was left behind)")


def not_a_folder(folder: PathLike) -> tp.Optional[str]:
    """'X is a file, not a folder' when the first existing part of ``folder`` is a file
    (an output option naming a file): the user's mistake, not a traceback."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is a file, not a folder"
    return None


def _temp_beside(path: Path) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        reason = _disk_reason(path.parent, exc) or not_a_folder(path.parent)
        if reason is None:
            raise
        raise _disk_error(path, reason) from None
    os.close(fd)
    return tmp


def _write_temp(path: Path, write: Writer) -> str:
    """`write(tmp)` into a temp beside `path`; the temp is removed if anything fails."""
    tmp = _temp_beside(path)
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp alone gives 0600
        except Exception as exc:
            reason = _disk_reason(path.parent, exc)  # checked before the temp is freed
            if reason is None:
                raise
            raise _disk_error(path, reason) from None
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: PathLike, write: Writer) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it over `path`.

    Permissions follow the umask like a plain open() would."""
    return atomic_write_group([(path, write)])[0]


def atomic_write_group(items: tp.Sequence[tp.Tuple[PathLike, Writer]]) -> tp.List[Path]:
    """Write every file to a temp first; only when all are complete, rename them in order.

    Put the file that vouches for the others last (an adapter's ``.json`` header, which
    carries the tensors' checksum): a kill between two renames then leaves a pair that
    readers detect as torn, never one that looks whole."""
    done: tp.List[tp.Tuple[Path, str]] = []
    try:
        for path, write in items:
            done.append((Path(path), _write_temp(Path(path), write)))
    except BaseException:
        for _, tmp in done:
            _unlink(tmp)
        raise
    for index, (path, tmp) in enumerate(done):
        try:
            os.replace(tmp, path)
        except OSError as exc:
            for _, rest in done[index:]:
                _unlink(rest)
            reason = _disk_reason(path.parent, exc)
            if reason is None:
                raise
            raise _disk_error(path, reason) from None
    return [path for path, _ in done]


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: PathLike) -> Path:
    """``torch.save(obj)`` to a temp beside `path`, renamed over it once complete."""
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temps(folder: PathLike, min_age: float = 0.0,
                       recursive: bool = True) -> tp.List[Path]:
    """Delete ``.NAME.XXXX.tmp`` files that a killed `atomic_write` left in `folder`.

    Only call it while holding the folder's writer lock (or with `min_age` seconds of
    margin): a live writer's temp looks the same. Returns the files removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed, now = [], time.time()
    for path in found:
        try:
            if path.is_file() and now - path.stat().st_mtime >= min_age:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
