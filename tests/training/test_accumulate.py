"""Gradient accumulation (`optim.accumulate`, MSST's `gradient_accumulation_steps`): N
micro-batches per optimizer step give the weights of one step at the N-times batch, and
everything that counts steps (scheduler, EMA, resume) counts optimizer steps."""
import os
import signal

import pytest
import torch
from solver_helpers import make_solver, trainable

from demucs_lora.core.errors import DatasetError

NO_AUGMENT = ["dset.augment.remix=false", "dset.augment.flip=false",
              "dset.augment.scale=null", "dset.augment.time_shift=false"]


@pytest.mark.parametrize("extra", [[], ["optim.clip_grad=0.01", "optim.ema=0.5"]])
def test_accumulate_equals_one_step_at_n_times_batch(tmp_path, monkeypatch, extra):
    big = make_solver(monkeypatch, tmp_path / "big", "batch_size=4", "max_batches=2",
                      *NO_AUGMENT, *extra)
    small = make_solver(monkeypatch, tmp_path / "small", "batch_size=1", "max_batches=8",
                        "optim.accumulate=4", *NO_AUGMENT, *extra)
    before = trainable(small)
    assert all(torch.equal(before[k], v) for k, v in trainable(big).items())
    assert big.steps_per_epoch == small.steps_per_epoch == 2
    a, b = big.train_epoch(0), small.train_epoch(0)
    assert a["batches"] == b["batches"] == 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    after_big, after_small = trainable(big), trainable(small)
    assert any(not torch.equal(after_small[k], before[k]) for k in before)   # it trained
    for name, weight in after_big.items():
        assert torch.allclose(after_small[name], weight, atol=1e-6, rtol=1e-4), name
    assert small.scheduler.last_epoch == big.scheduler.last_epoch == 2   # optimizer steps
    if small.ema is not None:
        for name, value in big.ema.shadow.items():
            assert torch.allclose(small.ema.shadow[name], value, atol=1e-6, rtol=1e-4)


def test_too_few_batches_for_one_step(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="optim.accumulate=8 needs 8 train batches .* 4"):
        make_solver(monkeypatch, tmp_path / "x", "batch_size=2", "max_batches=4",
                    "optim.accumulate=8")


def _stop_at(solver, step):
    original, calls = solver._train_step, {"n": 0}

    def step_then_signal(micro, progress):
        calls["n"] += 1
        assert len(micro) == solver.accumulate
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(micro, progress)
    solver._train_step = step_then_signal
    with pytest.raises(SystemExit):
        solver.run()


def test_stop_and_resume_at_an_optimizer_step_boundary(tmp_path, monkeypatch):
    args = ["epochs=2", "batch_size=1", "max_batches=6", "optim.accumulate=2"]
    reference = make_solver(monkeypatch, tmp_path / "ref", *args).run()
    folder = tmp_path / "xp"
    _stop_at(make_solver(monkeypatch, folder, *args), 2)
    state = torch.load(folder / "checkpoint.th", weights_only=True)
    assert state["partial"]["step"] == 2 and state["epoch"] == 0   # 4 micro-batches in
    assert state["scheduler"]["last_epoch"] == 2
    resumed = make_solver(monkeypatch, folder, *args).run()
    for ref, res in zip(reference, resumed):
        for key in ref:
            if "seconds" not in key:
                assert res[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


def test_ddp_all_reduces_once_per_optimizer_step(tmp_path, monkeypatch):
    """Under DDP every micro-batch but the last runs inside `no_sync()` (no all-reduce)."""
    import contextlib
    solver = make_solver(monkeypatch, tmp_path / "x", "batch_size=1", "max_batches=8",
                         "optim.accumulate=4")
    model, calls = solver.model, []

    class FakeDDP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = model
            self.synced = True

        def forward(self, mix):
            calls.append(self.synced)
            return self.module(mix)

        @contextlib.contextmanager
        def no_sync(self):
            self.synced = False
            yield
            self.synced = True
    solver.dmodel = FakeDDP()
    solver.train_epoch(0)
    assert calls == [False, False, False, True] * 2
