"""One XP, one writer; DDP workers die with their launcher; SIGTERM stops at a step
boundary with a checkpoint that resumes exactly there (unit level; the real `dora run`
cases are in tests/integration/test_preemption.py)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from solver_helpers import make_solver
from demucs_lora.core.errors import XPBusy
from demucs_lora.training.xp_guard import StopSignals, XPLock


HOLD = textwrap.dedent("""
    import sys, time
    from demucs_lora.training.xp_guard import XPLock
    XPLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(XPBusy, match=f"pid {holder.pid} on "):
            XPLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
    with XPLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()


def test_a_worker_dies_with_its_launcher(tmp_path):
    """The launcher (here a plain parent) is killed -9; its WORLD_SIZE>1 child follows."""
    child = textwrap.dedent("""
        import time
        from demucs_lora.training.xp_guard import die_with_launcher
        assert die_with_launcher()
        print("armed", flush=True)
        time.sleep(600)
    """)
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, WORLD_SIZE="2", RANK="1")
        proc = subprocess.Popen([sys.executable, "-c", {child!r}], env=env)
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                              text=True)
    worker = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "armed"  # the child shares the pipe
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its launcher"


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().split()[2]
    except OSError:
        return False
    return state != "Z"


def _run_with_sigterm_at(solver, step):
    original, calls = solver._train_step, {"n": 0}

    def step_then_signal(batch, progress):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, progress)
    solver._train_step = step_then_signal
    with pytest.raises(SystemExit) as info:
        solver.run()
    return info.value.code


@pytest.mark.parametrize("step, workers", [  # mid-epoch, last step, a loader worker
    (2, 0), (3, 0), pytest.param(2, 1, marks=pytest.mark.slow)])  # (a process: seconds)
def test_sigterm_mid_epoch_resumes_exactly(tmp_path, monkeypatch, step, workers):
    reference = make_solver(monkeypatch, tmp_path / "ref", "epochs=2").run()
    ref_weights = torch.load(tmp_path / "ref" / "checkpoint.th", weights_only=True)["model"]
    folder = tmp_path / "xp"
    code = _run_with_sigterm_at(make_solver(monkeypatch, folder, "epochs=2",
                                            num_workers=workers), step)
    assert code == 128 + signal.SIGTERM
    state = torch.load(folder / "checkpoint.th", weights_only=True)
    if step < 3:
        assert state["partial"]["step"] == step and state["epoch"] == 0
    else:  # the signal came with the epoch's last step: the epoch ends, then the run stops
        assert state["partial"] is None and state["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    resumed = make_solver(monkeypatch, folder, "epochs=2", num_workers=workers).run()
    assert len(resumed) == 2
    for ref, res in zip(reference, resumed):
        assert ref.keys() == res.keys()
        for key in ref:
            if "seconds" not in key:
                assert res[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    weights = torch.load(folder / "checkpoint.th", weights_only=True)["model"]
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_submitits_handler_gets_the_signal_after_the_checkpoint():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopSignals().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and not calls  # deferred
        with pytest.raises(SystemExit):
            stop.exit()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
