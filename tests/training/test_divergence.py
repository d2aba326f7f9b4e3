"""The NaN policy: a diverged run stops with the step and what to try, keeps its last
finite checkpoint, never saves a NaN "best"; NaN/inf/int adapters and NaN models are
refused by every loader that serves them; test_pretrained fails when every score is NaN."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from solver_helpers import make_solver, trainable
from demucs_lora.core.errors import AdapterMismatch, ModelLoadError, TrainingDiverged



def nan_after(solver, calls):
    """Make the loss NaN from the `calls`-th train step on (0-based)."""
    original, count = solver._loss, {"n": 0}

    def loss(estimate, sources):
        value, per_source = original(estimate, sources)
        count["n"] += 1
        return (value * float("nan") if count["n"] > calls else value), per_source
    solver._loss = loss


def test_nan_lr_stops_at_the_first_step_and_writes_no_best(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=2", "optim.lr=1e30")
    with pytest.raises(TrainingDiverged) as info:
        solver.run()
    message = str(info.value)
    assert "epoch 1, step" in message and "optim.lr" in message and "clip_grad" in message
    assert not (folder / "best.th").exists() and not (folder / "checkpoint.th").exists()
    assert not (folder / "lora_best.safetensors").exists()


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=3")
    nan_after(solver, 4)  # 3 steps per epoch: epoch 2, step 2
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2/3: the loss is nan\. "
                       r"checkpoint.th still holds the last finite state \(end of epoch 1\)"):
        solver.run()
    state = torch.load(folder / "checkpoint.th", weights_only=True)
    assert state["epoch"] == 1
    best = torch.load(folder / "best.th", weights_only=False)["state"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    assert not list(folder.glob("validation/epoch_002.json"))


def test_skip_nonfinite_skips_a_bounded_number_of_steps(tmp_path, monkeypatch):
    solver = make_solver(monkeypatch, tmp_path / "xp", "epochs=1", "optim.skip_nonfinite=1")
    original = solver._loss
    calls = {"n": 0}

    def loss(estimate, sources):  # only the second step is NaN
        value, per = original(estimate, sources)
        calls["n"] += 1
        return (value * float("nan") if calls["n"] == 2 else value), per
    solver._loss = loss
    before = trainable(solver)
    history = solver.run()
    assert history[0]["train_skipped"] == 1 and math.isfinite(history[0]["train_loss"])
    after = trainable(solver)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_validation_is_never_best(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=2")
    real = solver.validate
    scores = iter([None, float("nan")])  # epoch 1 real, epoch 2 NaN

    def validate(epoch):
        metrics = real(epoch)
        value = next(scores)
        return metrics if value is None else {k: value for k in metrics}
    solver.validate = validate
    history = solver.run()
    assert math.isnan(history[1]["valid_nsdr"])
    assert history[1]["best_nsdr"] == history[0]["valid_nsdr"]  # best stayed epoch 1's
    header = json.loads((folder / "lora_best.json").read_text())
    assert header["xp"] == "testxp"


def test_all_nan_validation_fails_and_writes_no_best(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=1")
    solver.validate = lambda epoch: {"nsdr": float("nan")}
    with pytest.raises(TrainingDiverged, match="no epoch of 1 had a finite validation"):
        solver.run()
    assert not (folder / "best.th").exists()
    assert (folder / "checkpoint.th").exists()  # the epoch itself is kept


# ----------------------------------------------------------------------------- adapters
@pytest.fixture
def adapter(tmp_path):
    from solver_helpers import lora, tiny_base
    from demucs_lora.lora.state import save_adapter
    model = lora(tiny_base())
    save_adapter(model, tmp_path / "ad", xp="x")
    return tmp_path / "ad"


def _rewrite_tensors(adapter, fn):
    path = adapter.with_suffix(".safetensors")
    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path))
    header = json.loads(adapter.with_suffix(".json").read_text())
    header.pop("tensors_sha256", None)  # an edited pair with a consistent header
    adapter.with_suffix(".json").write_text(json.dumps(header))


@pytest.mark.parametrize("kind", ["nan", "inf", "int32"])
def test_nonfinite_or_integer_adapter_is_refused(adapter, kind):
    from solver_helpers import tiny_base
    from demucs_lora.models.guide_methods import load_lora_weights

    def edit(tensors):
        name = sorted(tensors)[0]
        if kind == "int32":
            tensors[name] = (tensors[name] * 100).to(torch.int32)
        else:
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = float(kind)
        return tensors
    _rewrite_tensors(adapter, edit)
    with pytest.raises(AdapterMismatch, match="NaN/inf" if kind != "int32" else "floating"):
        load_lora_weights(tiny_base(), adapter)


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", '"16"'])
def test_nonfinite_alpha_is_refused(adapter, alpha):
    from solver_helpers import tiny_base
    from demucs_lora.models.guide_methods import load_lora_weights
    path = adapter.with_suffix(".json")
    text = path.read_text()
    header = json.loads(text)
    path.write_text(text.replace(f'"alpha": {json.dumps(header["alpha"])}',
                                 f'"alpha": {alpha}'))
    with pytest.raises(AdapterMismatch, match="'alpha'"):
        load_lora_weights(tiny_base(), adapter)


# ----------------------------------------------------------------------------- serving
def _nan_package(path):
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from solver_helpers import tiny_base
    model = tiny_base()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    torch.save(serialize_model(model, OmegaConf.create({}), half=False), path)
    return path


def test_get_model_refuses_a_nan_model(tmp_path):
    from demucs_lora.api import get_model
    path = _nan_package(tmp_path / "nan.th")
    with pytest.raises(ModelLoadError, match="NaN/inf weights"):
        get_model(str(path))


def test_export_refuses_a_nan_best(tmp_path):
    from helpers import make_xp
    from demucs_lora.commands import export
    folder = make_xp(tmp_path, sig="nanxp").folder
    _nan_package(folder / "best.th")
    args = export.get_parser().parse_args(["nanxp", "-o", str(tmp_path / "rel")])
    with pytest.raises(ModelLoadError, match="NaN/inf weights"):
        export.run(args, root=tmp_path)
    assert not (tmp_path / "rel" / "nanxp.th").exists()


def test_test_pretrained_fails_when_every_score_is_nan(tmp_path, monkeypatch, capsys):
    from demucs_lora.commands import score_model as test_pretrained
    from helpers import make_xp
    make_xp(tmp_path, sig="xpnan")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(test_pretrained, "evaluate_model", lambda model, data, **kw: {
        "tracks": {"t": {}}, "summary": {"nsdr": None, "nsdr_drums": None}})
    args = test_pretrained.get_parser().parse_intermixed_args(
        ["-n", "xpnan", "--split", "valid", "--no-progress"])
    with pytest.raises(test_pretrained.NoScores, match="every score of xpnan is NaN"):
        test_pretrained.run(args)
    assert not (tmp_path / "outputs" / "xps" / "xpnan" / "valid_results.json").exists()
