"""Real `dora run` processes: a second run of a live XP is refused naming the holder's pid,
SIGTERM stops with a checkpoint (exit 128+15) and the same command finishes the XP, stale
temps of killed writes are removed, and a killed `dora run -d` launcher takes its DDP
workers with it. (Exact mid-epoch resume is tested at unit level: tests/training/test_xp_guard.py.)"""
import os
import signal
import time

import psutil

from .dora_helpers import QUICK, dora, history, xps

ARGS = ["run", *QUICK, "epochs=2", "max_batches=3", "test.initial=false"]


def _wait_for_lock(cwd, proc, timeout=600):
    """The XP folder once its writer holds the lock (signal handlers are installed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended early:\n" + proc.stdout.read()
        found = xps(cwd)
        if found and (found[0] / ".lock").exists() and \
                "pid" in (found[0] / ".lock").read_text():
            return found[0]
        time.sleep(0.2)
    raise AssertionError("the run never took the XP lock")


def test_one_writer_sigterm_checkpoint_and_stale_temps(tmp_path):
    first = dora(tmp_path, *ARGS, popen=True)
    try:
        xp = _wait_for_lock(tmp_path, first)
        second = dora(tmp_path, *ARGS, check=False)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr and "XPBusy" in second.stderr
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Stopped" in (xp / "train.log").read_text()
    stale = xp / ".checkpoint.th.k1ll3d.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"\0" * 1000)
    dora(tmp_path, *ARGS)
    assert len(history(xp)) == 2 and not stale.exists()
    assert "Removed 1 temporary file" in (xp / "train.log").read_text()


def test_killed_ddp_launcher_takes_its_workers(tmp_path):
    launcher = dora(tmp_path, "run", "-d", "--ddp_workers=2", *QUICK, "epochs=100",
                    "batch_size=2", "test.initial=false", popen=True)
    try:
        _wait_for_lock(tmp_path, launcher)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        assert len(workers) >= 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only, not its group
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers outlived the launcher: {[p.pid for p in alive]}"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
