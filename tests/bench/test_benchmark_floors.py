"""The train-step benchmark's own floors and SDPA kernel check (benchmarks/train_step.py).

A floor of LoRA config X is the frozen base back-propagated exactly as far as X needs:
gradients reach every layer X adapts and stop below its lowest ones.
"""
import pytest
import torch
from torch.nn import functional as F

from benchmarks import train_step as ts

SEGMENT = 0.5


def outputs_requiring_grad(model, names, mix):
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out.requires_grad)) for n in names]
    model(mix)
    for h in handles:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def mix():
    return 0.1 * torch.randn(1, 2, int(SEGMENT * 44100), generator=torch.Generator().manual_seed(0))


def test_heuristic_floor_stops_at_its_lowest_adapted_layers(mix):
    adapted = ts.adapted_layers("tiny", SEGMENT, "heuristic")
    assert "encoder.0.conv" not in adapted and "encoder.1.conv" in adapted  # outer rank 0
    model, hooks = ts.build_config("floor_heuristic", "tiny", SEGMENT, 0)
    assert hooks == adapted and not any(p.requires_grad for p in model.parameters())
    leaves = ts.add_floor_hooks(model, hooks, "cpu")
    grads = outputs_requiring_grad(model, ["encoder.0.conv", "tencoder.0.conv",
                                           "encoder.1.conv", "decoder.3.conv_tr"], mix)
    # below the lowest adapted layers no gradient is needed; above, it flows
    assert grads == {"encoder.0.conv": False, "tencoder.0.conv": False,
                     "encoder.1.conv": True, "decoder.3.conv_tr": True}
    F.l1_loss(model(mix), torch.zeros(1, 4, 2, mix.shape[-1])).backward()
    assert all(z.grad is not None and torch.isfinite(z.grad) for z in leaves)
    attention = [n for n in hooks if n.endswith("attn")]
    assert attention  # attention layers get their inputs hooked (q/v are inside them)


def test_input_floor_backpropagates_through_everything(mix):
    model, hooks = ts.build_config("floor_input", "tiny", SEGMENT, 0)
    assert hooks == []
    grads = outputs_requiring_grad(model, ["encoder.0.conv"], mix.clone().requires_grad_(True))
    assert grads == {"encoder.0.conv": True}


def test_floor_step_runs_in_every_precision():
    model, hooks = ts.build_config("floor_heuristic_ckpt", "tiny", SEGMENT, 0)
    leaves = ts.add_floor_hooks(model, hooks, "cpu")
    stems = 0.1 * torch.randn(1, 4, 2, int(SEGMENT * 44100))
    for precision in ("bf16",):  # fp32 runs in every other test
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ts._train_step(model, None, [], stems, False, precision, scaler, leaves)
        assert all(z.grad is None for z in leaves)  # dropped after each step


def test_sdpa_kernel_is_recorded():
    model, _ = ts.build_config("heuristic", "tiny", SEGMENT, 0)
    stems = 0.1 * torch.randn(1, 4, 2, int(SEGMENT * 44100))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    kernels = ts.sdpa_kernels(lambda: ts._train_step(model, optimizer, params, stems, False,
                                                     "fp32", scaler, []))
    assert kernels == ["flash (CPU)"]
