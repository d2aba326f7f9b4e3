"""Run the real CLIs (`dora`, `python -m tools.X`) as subprocesses in a scratch folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest

from demucs_lora.training.dora_run import dora_env, run_dora

REPO = Path(__file__).resolve().parents[2]
BASE_ASSET = REPO / "demucs_lora" / "assets" / "base_tiny_A.th"
# Seconds-long runs: tiny model, tiny synthetic data.
QUICK = ["model=htdemucs_tiny", "variant=debug", "misc.num_prints=1"]


def env() -> dict:
    out = dora_env()
    out.setdefault("OMP_NUM_THREADS", "2")
    return out


def _run(cmd, cwd: Path, timeout: float, check: bool):
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    return _checked(proc, cmd, check)


def _checked(proc, cmd, check: bool):
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def dora(cwd: Path, *args: str, timeout: float = 600, check: bool = True,
         popen: bool = False, extra_env: tp.Optional[dict] = None):
    """`dora ARGS` in cwd (demucs_lora.training.dora_run), output captured."""
    run_env = {**env(), **(extra_env or {})}
    if popen:
        return run_dora(args, cwd, popen=True, env=run_env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = run_dora(args, cwd, env=run_env, capture_output=True, text=True, timeout=timeout)
    return _checked(proc, ["dora", *args], check)


def tool(cwd: Path, module: str, *args: str, timeout: float = 600, check: bool = True):
    return _run([sys.executable, "-m", module, *args], cwd, timeout, check)


def xps(cwd: Path) -> list:
    root = cwd / "outputs" / "xps"
    return sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.exists() else []


def history(xp: Path) -> list:
    return json.loads((xp / "history.json").read_text())


def kill_9_when(cwd: Path, args: tp.Sequence[str], ready: tp.Callable[[Path], bool]) -> Path:
    """Start `dora *args` in cwd, SIGKILL its process group one second after `ready(xp)`
    first holds (polled), and return the XP folder the killed run left."""
    proc = dora(cwd, *args, popen=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        folders = xps(cwd)
        if folders and (folders[0] / "history.json").exists() and ready(folders[0]):
            time.sleep(1.0)  # well inside the next epoch
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (xp,) = xps(cwd)
    return xp


def assert_same_histories(want: list, got: list):
    """Epoch by epoch the same metrics, timings aside (a resumed run equals an uninterrupted
    one)."""
    assert len(want) == len(got)
    for a, b in zip(want, got):
        a, b = ({k: v for k, v in h.items() if "seconds" not in k} for h in (a, b))
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
