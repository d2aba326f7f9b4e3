"""An XP folder is untrusted input: checkpoint.th is read with weights_only=True (a trapped
or stealth file never runs), a corrupt or foreign one is one line with the fix, resuming on
another base is refused, and `dora run -f SIG` never inherits trust_remote_code."""
import json
import os
import pickle

import pytest
import torch

from demucs_lora.training import checkpoint as ckpt
from demucs_lora.core.errors import CheckpointError, ModelLoadError
from demucs_lora.core.rng import rng_state

from solver_helpers import lora, make_solver, tiny_base, trainable



class Evil:
    """Pickles to a call of os.system: what a trapped checkpoint.th carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """An XP folder after one epoch (checkpoint.th of a tiny LoRA run)."""
    solver = make_solver(monkeypatch, tmp_path / "xp", "epochs=1")
    solver.run()
    return tmp_path / "xp", trainable(solver)


def test_checkpoint_is_plain_tensors_and_resumes_exactly(trained, monkeypatch):
    folder, weights = trained
    state = torch.load(folder / "checkpoint.th", weights_only=True)  # no allowlist needed
    assert state["format"] == ckpt.CHECKPOINT_FORMAT and state["epoch"] == 1
    assert state["base"]["fingerprint"] is not None
    solver = make_solver(monkeypatch, folder, "epochs=1", base_seed=0)
    torch.manual_seed(123)  # restore() must put every RNG back
    assert solver.restore()
    assert all(torch.equal(weights[k], v) for k, v in trainable(solver).items())
    import numpy as np, random
    again = rng_state()
    assert torch.equal(again["torch"], state["rng"]["torch"])
    assert torch.equal(again["numpy"]["keys"], state["rng"]["numpy"]["keys"])
    assert random.getstate()[1][:3] == tuple(state["rng"]["python"]["state"][:3].tolist())
    assert np.random.get_state()[2] == state["rng"]["numpy"]["pos"]


@pytest.mark.parametrize("stealth", [False, True])
def test_trapped_checkpoint_never_runs(trained, monkeypatch, tmp_path, stealth):
    folder, _ = trained
    marker = tmp_path / "pwned"
    path = folder / "checkpoint.th"
    if stealth:  # the real checkpoint plus one payload key
        state = torch.load(path, weights_only=True)
        state["payload"] = Evil(marker)
    else:
        state = {"x": Evil(marker)}
    torch.save(state, path)
    solver = make_solver(monkeypatch, folder, "epochs=1")
    with pytest.raises(CheckpointError) as info:
        solver.run()
    assert isinstance(info.value, ModelLoadError)
    message = str(info.value)
    assert str(path) in message and "posix.system" in message and "--clear" in message
    assert not marker.exists()


def _write(path, kind, other_state):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "junk":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "bare_dict":
        torch.save({"model": {}}, path)
    elif kind == "other_config":  # a real checkpoint of another model
        torch.save(other_state, path)
    elif kind == "old_numpy_rng":  # what demucs-lora wrote before (numpy arrays inside)
        state = torch.load(path, weights_only=True)
        import numpy as np
        state["rng"]["numpy"] = np.random.get_state()
        torch.save(state, path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "junk", "bare_dict", "other_config",
                                  "old_numpy_rng"])
def test_broken_checkpoint_is_one_line_with_the_fix(trained, monkeypatch, tmp_path, kind):
    folder, _ = trained
    path = folder / "checkpoint.th"
    other_state = None
    if kind == "other_config":
        other = make_solver(monkeypatch, tmp_path / "other", "epochs=1",
                            model=lora(tiny_base(), rank=3))
        other.run()
        other_state = torch.load(tmp_path / "other" / "checkpoint.th", weights_only=True)
        other_state["base"] = torch.load(path, weights_only=True)["base"]
    _write(path, kind, other_state)
    solver = make_solver(monkeypatch, folder, "epochs=1")
    with pytest.raises(CheckpointError) as info:
        solver.restore()
    message = str(info.value)
    assert str(path) in message and "--clear" in message and "\n" not in message


def test_resume_on_another_base_is_refused(trained, monkeypatch):
    folder, _ = trained
    solver = make_solver(monkeypatch, folder, "epochs=2", base_seed=1)  # other weights
    with pytest.raises(CheckpointError, match="started on the base .* this run loaded"):
        solver.restore()


def test_fresh_start_on_another_base_drops_the_initial_validation(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    first = make_solver(monkeypatch, folder, "epochs=1")
    ckpt.save_adapter_with_state(first.model, None, folder / "lora_init",
                                 **first._adapter_header())
    (folder / "validation").mkdir()
    (folder / "validation" / "epoch_000.json").write_text('{"valid_initial_nsdr": 1.0}')
    second = make_solver(monkeypatch, folder, "epochs=1", base_seed=1)
    ckpt.forget_other_base(folder, second.base)
    assert not (folder / "validation" / "epoch_000.json").exists()


def test_load_resume_state_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.th"
    path.write_bytes(pickle.dumps({"x": Evil(marker)}))  # legacy (non-zip) pickle
    with pytest.raises(CheckpointError):
        ckpt.load_resume_state(path, lambda state: None)
    assert not marker.exists()


# ----------------------------------------------------------------------------- -f SIG
def test_from_sig_never_inherits_trust_remote_code(tmp_path, monkeypatch):
    from demucs_lora.core.errors import ConfigError
    from demucs_lora.train import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    folder = tmp_path / "outputs" / "xps" / "abcd1234"
    folder.mkdir(parents=True)
    good = ["model=htdemucs_tiny", "variant=finetune", "epochs=3", "++htdemucs.t_dropout=0.1",
            "continue_from=/some/base.th"]
    (folder / ".argv.json").write_text(json.dumps(good))
    assert main.get_argv_from_sig("abcd1234") == good
    for bad in ("trust_remote_code=true", "+trust_remote_code=1",
                "hydra.callbacks.x._target_=os.system", "variant=../../outputs/xps/SIG/evil",
                "variant=/tmp/evil", "model=nope", "+variant=finetune", "~epochs",
                "dset.wav=${oc.env:HOME}", "hydra/launcher=basic", "epochs"):
        (folder / ".argv.json").write_text(json.dumps(["epochs=3", bad]))
        with pytest.raises(ConfigError) as info:
            main.get_argv_from_sig("abcd1234")
        assert repr(bad) in str(info.value) and "abcd1234" in str(info.value), bad
    (folder / ".argv.json").write_text('{"not": "a list"')
    with pytest.raises(SystemExit, match="abcd1234"):
        main.get_argv_from_sig("abcd1234")


def test_dora_never_unpickles_a_trapped_job_pkl(tmp_path, monkeypatch):
    """`dora run`/`info`/`grid` load XP/job.pkl with pickle.load (dora.shep.Sheep); every
    one of them gets the XP from our main's get_xp first, which refuses a trapped file."""
    import pathlib
    import submitit
    from dora.shep import Sheep
    from demucs_lora.train import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    argv = ["model=htdemucs_tiny", "epochs=1"]
    folder = main.get_xp(argv).folder
    folder.mkdir(parents=True)
    job = folder / main.dora.shep.job_file
    job.write_bytes(pickle.dumps((submitit.SlurmJob(pathlib.Path(folder), "12"), [], [])))
    assert Sheep(main.get_xp(argv)).job.job_id == "12"  # a real job file still loads
    marker = tmp_path / "pwned"
    for payload in ((submitit.SlurmJob(pathlib.Path(folder), "12"), [Evil(marker)], []),
                    Evil(marker)):
        data = pickle.dumps(payload)
        for blob in (data, data[: len(data) - 3]):  # truncated after the payload too
            job.write_bytes(blob)
            with pytest.raises(SystemExit, match="posix.system"):
                main.get_xp(argv)
    assert not marker.exists()
