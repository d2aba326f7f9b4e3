"""Reusable pytest fixture: a real one-node Slurm cluster (tools/slurm_local.sh).

tests/conftest.py imports it, so any test takes it by name (and is marked `slurm`)::

    def test_something(slurm_cluster):
        slurm_cluster.partition  # "local"; SLURM_CONF is exported while it lives

The fixture is module-scoped: it starts the cluster (installing the packages
if needed) and stops it at teardown, leaving no daemon behind.  It skips (with
the reason printed) when not root or when the packages can't be installed.
Tests use their own state folder and ports so that a cluster a user started
with the defaults is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_local.sh"
TEST_DIR = os.environ.get("SLURM_LOCAL_TEST_DIR", "/tmp/demucs-lora-slurm-test")
TEST_PORT_BASE = os.environ.get("SLURM_LOCAL_TEST_PORT_BASE", "6917")
PARTITION = "local"


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    partition: str = PARTITION
    env: dict = field(default_factory=dict)  # os.environ + SLURM_CONF etc.

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a Slurm client command (sbatch, sacct, ...) against this cluster."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def sacct_state(self, job_id: str | int) -> str:
        """State of the job allocation (not its steps), '' if not yet known."""
        out = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id),
                       check=False)
        return out.strip().splitlines()[0].strip() if out.strip() else ""

    def wait(self, job_id: str | int, timeout: float = 60) -> str:
        """Poll sacct until the job reaches a final state; returns it."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                 "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sacct_state(job_id)
            if state.split(" ")[0] in final:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s (state {state!r})\n"
                           + self.run("squeue", check=False))

    def script(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _script(command, self.env, timeout)


def _env() -> dict:
    env = dict(os.environ)
    env["SLURM_LOCAL_DIR"] = TEST_DIR
    env["SLURM_LOCAL_PORT_BASE"] = TEST_PORT_BASE
    env["SLURM_CONF"] = f"{TEST_DIR}/etc/slurm.conf"
    return env


def _script(command: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True,
                          text=True, timeout=timeout)


def unavailable_reason() -> str | None:
    """Why a local Slurm cluster can't be had here, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "local Slurm needs Linux"
    if os.geteuid() != 0:
        return "local Slurm needs root (tools/slurm_local.sh starts daemons and may apt-get install)"
    if not shutil.which("slurmctld") and not Path("/usr/sbin/slurmctld").exists() \
            and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = unavailable_reason()
    if reason:
        print(f"SKIP slurm: {reason}")
        pytest.skip(reason)
    env = _env()
    t0 = time.monotonic()
    inst = _script("install", env, timeout=600)
    if inst.returncode != 0:
        reason = ("could not install the Slurm packages: "
                  + _tail(inst.stdout + inst.stderr, 8))
        print(f"SKIP slurm: {reason}")
        pytest.skip(reason)
    t1 = time.monotonic()
    start = _script("start", env, timeout=300)
    if start.returncode != 0:
        stop = _script("stop", env, timeout=120)
        pytest.fail("tools/slurm_local.sh start failed:\n"
                    + _tail(start.stdout + start.stderr) + "\n" + _tail(stop.stderr, 5))
    print(f"slurm: install {t1 - t0:.1f}s, start {time.monotonic() - t1:.1f}s")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # for submitit / dora in-process
    try:
        yield SlurmCluster(dir=Path(TEST_DIR), conf=Path(env["SLURM_CONF"]), env=env)
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        stop = _script("stop", env, timeout=180)
        if stop.returncode != 0:
            pytest.fail("tools/slurm_local.sh stop failed:\n" + _tail(stop.stdout + stop.stderr))
