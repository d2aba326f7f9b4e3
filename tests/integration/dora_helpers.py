"""Run the real CLIs (`dora`, `python -m tools.X`) as subprocesses in a scratch folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_ASSET = REPO / "demucs_lora" / "assets" / "base_tiny_A.th"
DORA = str(Path(sys.executable).with_name("dora"))
# Seconds-long runs: tiny model, tiny synthetic data.
QUICK = ["model=htdemucs_tiny", "variant=debug", "misc.num_prints=1"]


def env() -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "2")
    return out


def _run(cmd, cwd: Path, timeout: float, check: bool):
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def dora(cwd: Path, *args: str, timeout: float = 600, check: bool = True,
         popen: bool = False):
    cmd = [DORA, "-P", "demucs_lora", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return _run(cmd, cwd, timeout, check)


def tool(cwd: Path, module: str, *args: str, timeout: float = 600, check: bool = True):
    return _run([sys.executable, "-m", module, *args], cwd, timeout, check)


def xps(cwd: Path) -> list:
    root = cwd / "outputs" / "xps"
    return sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.exists() else []


def history(xp: Path) -> list:
    return json.loads((xp / "history.json").read_text())
