"""`swapped_trainables`: the one "load these trainable tensors, do X, restore" step."""
import pytest
import torch
from torch import nn

from demucs_lora.models.trainable import swapped_trainables, trainable_state
from demucs_lora.training.optim import TrainableEMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: never part of the swap
    return model


def _other(model: nn.Module) -> dict:
    return {k: torch.full_like(v, 7.0) for k, v in trainable_state(model).items()}


def test_swap_loads_then_restores():
    model = _model()
    before, frozen = trainable_state(model), model[0].weight.detach().clone()
    with swapped_trainables(model, _other(model)) as inside:
        assert inside is model
        assert torch.all(model[1].weight == 7.0)
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model[0].weight, frozen)


def test_swap_restores_when_the_body_raises():
    model = _model()
    before = trainable_state(model)
    with pytest.raises(ValueError, match="inside"):
        with swapped_trainables(model, _other(model)):
            assert torch.all(model[1].bias == 7.0)
            raise ValueError("inside")
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_swap_of_none_changes_nothing_and_a_foreign_state_is_refused():
    model = _model()
    before = trainable_state(model)
    with swapped_trainables(model, None):
        pass
    with pytest.raises(RuntimeError, match="does not match the model"):
        with swapped_trainables(model, {"nope": torch.zeros(1)}):
            pytest.fail("the body must not run on a state that does not fit")
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ema_applied_is_the_swap():
    model = _model()
    ema = TrainableEMA(model, decay=0.5)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    live = model[1].weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model[1].weight, ema.shadow["1.weight"])
        assert not torch.equal(model[1].weight, live)
    assert torch.equal(model[1].weight, live)
