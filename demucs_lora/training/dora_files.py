"""Dora's own pickles in an XP folder, checked before Dora unpickles them.

`dora run`, `dora info` and `dora grid` load ``XP/job.pkl`` (the submitit job of a grid
or launch) with plain ``pickle.load`` (``dora.shep.Sheep``): an edited job.pkl would run
its payload on the next ``dora run`` of that XP, before any of our code. Every Dora
command that touches an XP goes through our main's ``get_xp``, which calls
`check_job_pickle` first: the pickle's opcodes are scanned (nothing is executed) and a
file naming anything but the submitit job classes is refused.
"""
from __future__ import annotations

import io
import pickletools
import typing as tp
from pathlib import Path

JOB_GLOBALS = frozenset({
    "submitit.slurm.slurm.SlurmJob", "submitit.local.local.LocalJob",
    "submitit.local.debug.DebugJob", "submitit.core.core.Job",
    "submitit.core.utils.JobPaths", "pathlib.PosixPath", "pathlib.Path",
    "builtins.set", "builtins.frozenset", "collections.OrderedDict",
})
"""What the job.pkl of a real submitit job names (measured on SlurmJob and LocalJob)."""

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
            "BINSTRING", "STRING"}


def pickle_globals(data: bytes) -> tp.Set[str]:
    """Every global a pickle imports (GLOBAL and STACK_GLOBAL), found without running it;
    '<unknown>' when a STACK_GLOBAL's names cannot be traced. A truncated or corrupt
    pickle is scanned up to where it breaks (pickle.load would stop there too)."""
    found: tp.Set[str] = set()
    pushed: tp.List[tp.Any] = []
    memo: tp.Dict[int, tp.Any] = {}
    try:
        _scan(data, found, pushed, memo)
    except Exception:  # truncated / not a pickle: what came before is what would run
        pass
    return found


def _scan(data: bytes, found: tp.Set[str], pushed: tp.List[tp.Any],
          memo: tp.Dict[int, tp.Any]) -> None:
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            names = pushed[-2:]
            ok = len(names) == 2 and all(isinstance(n, str) for n in names)
            found.add(f"{names[0]}.{names[1]}" if ok else "<unknown>")
            pushed.append(None)
        elif name in _STRINGS:
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        else:
            pushed.append(None)


def job_pickle_problem(path: Path) -> tp.Optional[str]:
    """Why Dora must not unpickle `path` (None: only submitit job classes in it)."""
    try:
        names = pickle_globals(path.read_bytes())
    except OSError as exc:
        return f"it cannot be read ({exc})"
    bad = sorted(names - JOB_GLOBALS)
    return f"it imports {', '.join(bad)}, not a submitit job" if bad else None


def check_job_pickle(folder: tp.Union[str, Path], name: str = "job.pkl") -> None:
    """SystemExit (one line) when XP `folder` holds a job pickle Dora must not load."""
    path = Path(folder) / name
    if not path.is_file():
        return
    problem = job_pickle_problem(path)
    if problem:
        raise SystemExit(f"error: refusing to let Dora unpickle {path}: {problem}; an XP "
                         "folder is untrusted input. Delete the file if you did not put it "
                         "there (it only records a Slurm job), then run the command again")
