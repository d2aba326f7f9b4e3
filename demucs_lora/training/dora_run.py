"""Running ``dora`` as a subprocess, as a user types it: the one command line and
environment for the demo, ``make base-medium``, the quality benchmarks and the tests.

Why a subprocess and not ``main()`` in-process: Dora's run is a whole process (its own
logging, signals, DDP workers, the XP lock), and each script must see exactly what a user
who types ``dora run ARGS`` sees. The XP folder such a run writes is a pure function of
its overrides: ``demucs_lora.train.xp_folder_in(args, workdir)`` (it needs the entry point
itself, one room above this one).
"""
from __future__ import annotations

import os
import subprocess
import sys
import typing as tp
from pathlib import Path

from demucs_lora.core.paths import REPO_DIR

PathLike = tp.Union[str, Path]


def dora_command(*args: str) -> tp.List[str]:
    """``python -m dora -P demucs_lora ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dora", "-P", "demucs_lora", *args]


def dora_env(**extra: str) -> tp.Dict[str, str]:
    """This environment, with the checkout first on PYTHONPATH (Dora imports the package
    from any working directory) and ``extra`` variables set."""
    paths = [str(REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


def run_dora(args: tp.Sequence[str], workdir: PathLike = REPO_DIR, popen: bool = False,
             env: tp.Optional[tp.Mapping[str, str]] = None, **kwargs: tp.Any
             ) -> tp.Union[subprocess.CompletedProcess, subprocess.Popen]:
    """``dora ARGS`` in ``workdir`` (``subprocess.run``, or ``Popen`` when ``popen``);
    ``kwargs`` go to subprocess (stdout, timeout, ...). The caller decides what a failure
    means (its exit status is returned, never raised)."""
    cmd = dora_command(*args)
    env = dict(env) if env is not None else dora_env()
    if popen:
        return subprocess.Popen(cmd, cwd=workdir, env=env, **kwargs)
    return subprocess.run(cmd, cwd=workdir, env=env, **kwargs)
