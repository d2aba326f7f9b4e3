"""`training.dora_run`: the one way scripts (demo, base recipe, quality benchmarks, the
integration tests) start `dora` as a subprocess, from any working directory."""
import os
import sys

import pytest

from demucs_lora.core.paths import REPO_DIR
from demucs_lora.training.dora_run import dora_command, dora_env, run_dora


def test_command_is_this_interpreter_and_env_puts_the_checkout_first(monkeypatch):
    assert dora_command("run", "epochs=1") == [sys.executable, "-m", "dora", "-P",
                                               "demucs_lora", "run", "epochs=1"]
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = dora_env(DEMUCS_LORA_GRID_ARGS="epochs=1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_DIR), "/elsewhere"]
    assert env["DEMUCS_LORA_GRID_ARGS"] == "epochs=1"
    monkeypatch.delenv("PYTHONPATH")
    assert dora_env()["PYTHONPATH"] == str(REPO_DIR)


@pytest.mark.slow
def test_run_dora_works_outside_the_checkout_and_returns_the_status(tmp_path):
    ok = run_dora(["run", "--help"], tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run_dora(["run", "no_such_key=1"], tmp_path, capture_output=True, text=True,
                   timeout=120)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr
    assert not (tmp_path / "outputs" / "xps").exists() or not any(
        (tmp_path / "outputs" / "xps").iterdir())
