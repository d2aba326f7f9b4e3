"""One user-error boundary for every command: the exit status says the kind of error (2 a
config or usage error, 1 data, model, adapter and the rest) and stderr holds one line.

Each command's own tests give it one bad input per kind (test_separate, test_evaluate,
test_export, data/test_verify; `dora run` in integration/test_guide_commands); here the
boundary itself, Dora's excepthook (errors raised while Dora prepares an XP) and the demo.
"""
import sys

import pytest

from demucs_lora.core import errors


@pytest.mark.parametrize("kind, code", [
    (errors.ConfigError, 2), (errors.DatasetError, 1), (errors.AudioError, 1),
    (errors.ModelLoadError, 1), (errors.CheckpointError, 1), (errors.AdapterMismatch, 1),
    (errors.DiskWriteError, 1), (errors.TrainingDiverged, 1), (errors.XPBusy, 1)])
def test_boundary_exit_status_and_one_line(kind, code, capsys):
    with pytest.raises(SystemExit) as exc:
        with errors.exit_on_user_error():
            raise kind("key x=1 is wrong: set x=2")
    assert exc.value.code == code == errors.exit_code(kind("m"))
    assert capsys.readouterr().err == f"error: {kind.__name__}: key x=1 is wrong: set x=2\n"


def test_boundary_lets_bugs_through():
    with pytest.raises(KeyError):
        with errors.exit_on_user_error():
            raise KeyError("a bug keeps its traceback")


def test_dora_excepthook_uses_the_boundary(monkeypatch, capsys):
    """`dora run -f nothing` raises while Dora prepares the XP, outside our main."""
    from demucs_lora.training import dora_cli
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a))
    dora_cli.install_excepthook()
    with pytest.raises(SystemExit) as exc:
        sys.excepthook(errors.ConfigError, errors.ConfigError("-f nothing: no XP"), None)
    assert exc.value.code == 2 and capsys.readouterr().err == \
        "error: ConfigError: -f nothing: no XP\n"
    sys.excepthook(KeyError, KeyError("bug"), None)  # anything else: the previous hook
    assert len(seen) == 1 and seen[0][0] is KeyError


def test_demo_step_failure_keeps_the_step_status(capsys):
    from demucs_lora.commands.demo import _run
    with pytest.raises(SystemExit) as exc:
        _run(sys.executable, "-c", "import sys; sys.exit(2)")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: demo: this step failed (exit 2); see the output above"


def test_demo_dora_step_runs_from_the_root_and_finds_its_xp(capsys, monkeypatch):
    """The demo's `dora run` goes through training.dora_run from the repository root and
    returns the XP folder train.xp_folder_in computes; a failure keeps dora's status."""
    import subprocess
    from demucs_lora.commands import demo
    from demucs_lora.train import xp_folder_in
    from demucs_lora.training import dora_run
    calls, codes = [], [0, 3]
    monkeypatch.setattr(dora_run, "run_dora", lambda args, workdir: calls.append(
        (list(args), workdir)) or subprocess.CompletedProcess(args, codes.pop(0)))
    args = ["model=htdemucs_tiny", "epochs=1"]
    assert demo._dora(*args) == xp_folder_in(args, demo.REPO)
    assert calls == [(["run", *args], demo.REPO)]
    with pytest.raises(SystemExit) as exc:
        demo._dora(*args)
    assert exc.value.code == 3 and "exit 3" in capsys.readouterr().err


def test_nothing_to_train_is_a_config_error():
    from torch import nn
    from demucs_lora.config.run_config import optim_config
    from demucs_lora.training.optim import build_optimizer
    frozen = nn.Linear(2, 2).requires_grad_(False)
    cfg = optim_config(lr=1e-3)
    with pytest.raises(errors.ConfigError, match="nothing to train.*htdemucs.lora_rank"):
        build_optimizer(frozen, cfg)


def test_writing_under_a_file_is_a_disk_write_error(tmp_path):
    """`--json afile/x.json`: one line naming the file in the way, not NotADirectoryError."""
    from demucs_lora.core.files import atomic_write_text
    (tmp_path / "afile").write_text("")
    with pytest.raises(errors.DiskWriteError, match="afile is a file, not a folder"):
        atomic_write_text(tmp_path / "afile" / "x.json", "{}")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only machine")
@pytest.mark.parametrize("device, precision, key", [("cuda", "none", "device=cuda"),
                                                    ("cpu", "fp16", "mixed_precision=fp16")])
def test_training_device_errors_are_config_errors(device, precision, key):
    """`dora run device=cuda` on a CPU machine: exit status 2, like any bad value."""
    from demucs_lora.training.run import pick_device
    with pytest.raises(errors.ConfigError, match=key):
        pick_device(device, precision)
