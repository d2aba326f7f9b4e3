"""Dora's own pickles in an XP folder, checked before Dora unpickles them.

`dora run`, `dora info` and `dora grid` load ``XP/job.pkl`` (the submitit job of a grid
or launch) with plain ``pickle.load`` (``dora.shep.Sheep``): an edited job.pkl would run
its payload on the next ``dora run`` of that XP, before any of our code. Every Dora
command that touches an XP goes through our main's ``get_xp``, which calls
`check_job_pickle` first. The pickle is read opcode by opcode (``pickletools.genops``:
nothing is executed) on a symbolic stack, against an allowlist: of opcodes (plain data,
memo, and the import / call opcodes), of what may be imported (GLOBAL, STACK_GLOBAL,
INST: the submitit job classes), and of what may be called (REDUCE, NEWOBJ, NEWOBJ_EX,
OBJ, INST, BUILD: only what was imported from that list, or an object it made). Anything
else (EXT*, PERSID, buffers, a callable whose origin cannot be traced) is refused.
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

_DATA_OPCODES = frozenset("""
INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES
SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE UNICODE SHORT_BINUNICODE
BINUNICODE BINUNICODE8 FLOAT BINFLOAT EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE
TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET POP DUP
MARK POP_MARK GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE PROTO FRAME STOP
""".split())
"""Opcodes that only build plain data or touch the memo: nothing is imported or called."""
_IMPORTS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"})
ALLOWED_OPCODES = _DATA_OPCODES | _IMPORTS | _CALLS


class _Mark:
    pass


class _Global(tp.NamedTuple):
    name: str


class _Made(tp.NamedTuple):
    name: str      # an object made by calling the allowlisted `name`


_MARK = _Mark()


def _pop_mark(stack: tp.List[tp.Any]) -> tp.List[tp.Any]:
    """The items above the topmost mark (removed with it)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise ValueError("no mark")


def _callee(value: tp.Any, allowed: tp.FrozenSet[str], op: str,
            problems: tp.List[str]) -> tp.Any:
    if isinstance(value, _Global) and value.name in allowed:
        return _Made(value.name)
    if not isinstance(value, _Global):   # a name it imported wrongly is reported already
        problems.append(f"its {op} calls something not imported from the allowlist")
    return None


def _step(name: str, arg: tp.Any, stack: tp.List[tp.Any], memo: tp.Dict[int, tp.Any],
          allowed: tp.FrozenSet[str], problems: tp.List[str]) -> None:
    """One opcode on the symbolic stack (values: str, _Global, _Made, _MARK or None)."""
    if name not in ALLOWED_OPCODES:
        problems.append(f"it uses the {name} opcode")
        raise ValueError(name)
    if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
        if name == "STACK_GLOBAL":
            mod, qual = stack.pop(-2), stack.pop()
            full = f"{mod}.{qual}" if isinstance(mod, str) and isinstance(qual, str) else None
        else:
            full = str(arg).replace(" ", ".")
        if full not in allowed:
            problems.append(f"it imports {full or '<a name it computes>'} ({name})")
        imported = _Global(full or "<unknown>")
        if name == "INST":
            _pop_mark(stack)
            stack.append(_callee(imported, allowed, name, problems))
        else:
            stack.append(imported)
    elif name in ("REDUCE", "NEWOBJ"):
        stack.pop()
        stack.append(_callee(stack.pop(), allowed, name, problems))
    elif name == "NEWOBJ_EX":
        del stack[-2:]
        stack.append(_callee(stack.pop(), allowed, name, problems))
    elif name == "OBJ":
        items = _pop_mark(stack)
        stack.append(_callee(items[0] if items else None, allowed, name, problems))
    elif name == "BUILD":
        stack.pop()
        if not isinstance(stack[-1], _Made):
            problems.append("its BUILD sets the state of something it did not make from "
                            "the allowlist")
    else:
        _data_step(name, arg, stack, memo)


def _data_step(name: str, arg: tp.Any, stack: tp.List[tp.Any],
               memo: tp.Dict[int, tp.Any]) -> None:
    op = _OPS[name]
    if name == "MARK":
        stack.append(_MARK)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo.get(arg))
    elif name == "DUP":
        stack.append(stack[-1])
    else:
        before = [s.name for s in op.stack_before]
        if "mark" in before:
            _pop_mark(stack)
            before = before[:before.index("mark")]
        if before:
            del stack[-len(before):]
        for _ in op.stack_after:
            stack.append(arg if isinstance(arg, str) else None)


_OPS = {op.name: op for op in pickletools.opcodes}


def pickle_problems(data: bytes, allowed: tp.FrozenSet[str] = JOB_GLOBALS) -> tp.List[str]:
    """What in pickle `data` imports or calls anything outside `allowed`, found without
    running it ([]: nothing). A truncated or corrupt pickle is scanned up to where it
    breaks (pickle.load would run everything before that too)."""
    problems: tp.List[str] = []
    stack: tp.List[tp.Any] = []
    memo: tp.Dict[int, tp.Any] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            _step(op.name, arg, stack, memo, allowed, problems)
    except Exception:  # truncated / not a pickle / refused opcode: reported up to here
        pass
    return list(dict.fromkeys(problems))


def job_pickle_problem(path: Path) -> tp.Optional[str]:
    """Why Dora must not unpickle `path` (None: only submitit job classes in it)."""
    try:
        problems = pickle_problems(path.read_bytes())
    except OSError as exc:
        return f"it cannot be read ({exc})"
    return f"{'; '.join(problems)}: not a submitit job" if problems else None


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
