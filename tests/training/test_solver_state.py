"""The Solver's state is registered once (`training/state_registry.py`): a part registered
with one line is saved in checkpoint.th, required and checked on resume, and restored; and
checkpoint.th keeps the layout main's Solver wrote before the registry, so an XP started by
an older demucs-lora still resumes."""
import pytest
import torch

from solver_helpers import make_solver, trainable
from demucs_lora.core.errors import CheckpointError
from demucs_lora.core.rng import rng_state
from demucs_lora.models.trainable import trainable_state
from demucs_lora.training.checkpoint import CHECKPOINT_FORMAT
from demucs_lora.training.state_registry import StateRegistry



class Counter:
    """A stateful part the Solver does not know: anything with the state_dict protocol."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def counter_ok(value, state) -> bool:
    return isinstance(value, dict) and isinstance(value.get("value"), torch.Tensor)


def with_counter(monkeypatch, folder, value: int = 0):
    solver = make_solver(monkeypatch, folder, "epochs=1")
    counter = Counter(value)
    solver.state.register_stateful("counter", counter, counter_ok)  # the one line
    return solver, counter


def test_a_part_registered_in_one_line_is_saved_checked_and_restored(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver, _ = with_counter(monkeypatch, folder, value=7)
    solver.run()
    path = folder / "checkpoint.th"
    saved = torch.load(path, weights_only=True)
    assert int(saved["counter"]["value"]) == 7
    resumed, counter = with_counter(monkeypatch, folder)
    assert resumed.restore() and counter.value == 7
    broken = dict(saved, counter="not a state")
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"malformed entries \['counter'\]"):
        with_counter(monkeypatch, folder)[0].restore()
    del broken["counter"]  # an XP saved before the part existed
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['counter'\]") as info:
        with_counter(monkeypatch, folder)[0].restore()
    assert str(path) in str(info.value) and "--clear" in str(info.value)
    torch.save(saved, path)  # and a run without the part refuses a file that has it
    with pytest.raises(CheckpointError, match=r"unexpected keys \['counter'\]"):
        make_solver(monkeypatch, folder, "epochs=1").restore()


def test_a_part_is_registered_once():
    state = StateRegistry("test/1")
    state.register("a", lambda: 1, None, lambda value, whole: True)
    for key in ("a", "format"):
        with pytest.raises(ValueError, match=repr(key)):
            state.register(key, lambda: 1, None, lambda value, whole: True)
    assert state.keys == ("format", "a") and state.save() == {"format": "test/1", "a": 1}


def main_state(solver) -> dict:
    """checkpoint.th as main's `Solver._state` wrote it before the registry."""
    return {"format": "demucs-lora-checkpoint/2",
            "model": trainable_state(solver.model),
            "optimizer": solver.optimizer.state_dict(),
            "scheduler": solver.scheduler.state_dict(),
            "scaler": solver.scaler.state_dict(),
            "ema": solver.ema.state_dict() if solver.ema else None,
            "rng": rng_state(), "epoch": len(solver.history),
            "history": solver.history, "best_state": solver.best_state,
            "best_nsdr": solver.best_nsdr, "base": solver.base, "partial": None,
            "rank_adaptation": None}


def same(a, b) -> bool:
    """Nested dicts / lists / tensors equal, leaf by leaf."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_checkpoint_layout_is_mains_and_its_checkpoints_resume(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=1", "optim.ema=0.9")
    solver.run()
    old = main_state(solver)
    assert old["format"] == CHECKPOINT_FORMAT and old["ema"] is not None
    new = solver.state.save()
    assert set(new) == set(old)
    bad = [k for k in old if not same(old[k], new[k])]
    assert not bad, f"entries that differ from main's layout: {bad}"
    torch.save(old, folder / "checkpoint.th")  # what an XP started on main holds
    resumed = make_solver(monkeypatch, folder, "epochs=1", "optim.ema=0.9")
    assert resumed.restore()
    assert all(torch.equal(v, trainable(solver)[k]) for k, v in trainable(resumed).items())
    assert same(resumed.ema.state_dict(), solver.ema.state_dict())
    assert resumed.history == solver.history and resumed.best_nsdr == solver.best_nsdr
