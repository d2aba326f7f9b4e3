"""The quality protocol's methods on every layer kind: LoRA-GA init (htdemucs.lora_init),
rank-aware scaling (htdemucs.lora_scaling), sensitivity allocation, LoRA+.

For Conv1d/2d (dilated too), ConvTranspose1d/2d, MultiheadAttention and Linear: the output
at init equals the base's, merging is exact, the adapter reloads exactly onto the
unmodified base, and the result is deterministic for a seed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_htdemucs
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.calibration import calibrate
from demucs_lora.lora.config import LoraConfig, LoraLayout
from demucs_lora.lora.init_gradient import gradient_init, has_offset
from demucs_lora.lora.adapt import inject_lora
from demucs_lora.lora.inject import merge_lora, unmerge_lora
from demucs_lora.lora.ranks import allocate_ranks
from demucs_lora.lora.state import load_adapter, save_adapter
from demucs_lora.lora.adapter_file import read_header

R = 3
KINDS = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 4, 6, generator=g)),
    "conv1d_dilated": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2),
                       lambda g: torch.randn(2, 4, 21, generator=g)),
    "conv2d": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
               lambda g: torch.randn(2, 4, 12, 5, generator=g)),
    "conv2d_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
                       lambda g: torch.randn(2, 4, 9, 7, generator=g)),
    "convtr1d": (lambda: nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2),
                 lambda g: torch.randn(2, 6, 9, generator=g)),
    "convtr2d": (lambda: nn.ConvTranspose2d(6, 4, (8, 1), stride=(4, 1)),
                 lambda g: torch.randn(2, 6, 5, 3, generator=g)),
    "mha": (lambda: nn.MultiheadAttention(16, 4, batch_first=True),
            lambda g: torch.randn(2, 5, 16, generator=g)),
}
# (lora_init, lora_scaling, lora_rslora): the new initialisation, the new scaling, both
VARIANTS = [("gradient", "per_layer", False), ("default", "mean_rank", False),
            ("gradient", "mean_rank", True)]


class Holder(nn.Module):
    """One layer as a model (`layer`), so the model-level functions apply to it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if isinstance(getattr(self.layer, "base", self.layer), nn.MultiheadAttention):
            return self.layer(x, x, x, need_weights=False)[0]
        return self.layer(x)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _adapted(kind, init, scaling, rslora, seed=0, with_calibration=False):
    """(base Holder, x, adapted Holder) with `kind` wrapped at rank R, calibrated on a
    seeded batch; the base stays untouched."""
    make, data = KINDS[kind]
    torch.manual_seed(seed)
    base = Holder(make()).eval()
    g = torch.Generator().manual_seed(seed)
    x = data(g)
    with torch.no_grad():
        target = base(x) + torch.randn(base(x).shape, generator=g)
    config = LoraConfig(lora_rank=R, lora_init=init, lora_scaling=scaling, lora_rslora=rslora)
    model = copy.deepcopy(base)
    calib = calibrate(model, ["layer"], config.lora_enable_qkv, [(x, target)], F.mse_loss, 1)
    inject_lora(model, config.layout({"layer": 2}))  # rank 2 != lora_rank: scaling differs
    if init == "gradient":
        assert gradient_init(model, calib) == 1
    return (base, x, model.eval()) + ((calib,) if with_calibration else ())


def _train_a_little(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init,scaling,rslora", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_init_merge_reload_determinism(kind, init, scaling, rslora, tmp_path):
    base, x, model = _adapted(kind, init, scaling, rslora)
    _, _, twin = _adapted(kind, init, scaling, rslora)  # the same seed: the same state
    assert model.state_dict().keys() == twin.state_dict().keys()
    assert all(torch.equal(p, twin.state_dict()[n]) for n, p in model.state_dict().items())
    layer = model.layer
    with torch.no_grad():
        ref = base(x)
        assert _rel(model(x), ref) <= 1e-6  # output at init = the base's
        if init == "gradient":
            assert has_offset(layer)
            assert all(p.abs().max() > 0 for n, p in layer.lora_named_parameters())
        if scaling == "mean_rank":  # scaled by lora_rank=R, not the layer's rank 2
            assert layer.scaling == pytest.approx(16 / R ** 0.5 if rslora else 16 / R)
        _train_a_little(model)
        trained = model(x)
        assert _rel(trained, ref) > 1e-2  # the adapter does something
        merge_lora(model)
        assert _rel(model(x), trained) <= 1e-5  # merge exact
        unmerge_lora(model)
        assert _rel(model(x), trained) <= 1e-6
    save_adapter(model, tmp_path / "ad")
    header = read_header(tmp_path / "ad")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()  # the UNMODIFIED base
    with torch.no_grad():
        assert _rel(fresh(x), trained) <= 1e-5
    assert header["scaling_rank"] == (R if scaling == "mean_rank" else None)
    if init == "gradient":
        assert header["ranks"] == {"layer": 4}  # rank 2 trained, stored as rank 2r
        assert header["lora_init"]["method"] == "gradient"
        assert header["lora_init"]["trained_ranks"] == {"layer": 2}
    else:
        assert header["ranks"] == {"layer": 2} and "lora_init" not in header


def test_adapters_without_the_new_header_keys_still_load(tmp_path):
    """Adapters written before lora_scaling / lora_init have no scaling_rank key."""
    import json
    base, x, model = _adapted("conv2d", "default", "per_layer", False)
    _train_a_little(model)
    save_adapter(model, tmp_path / "old")
    header = json.loads((tmp_path / "old.json").read_text())
    del header["scaling_rank"]
    (tmp_path / "old.json").write_text(json.dumps(header))
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "old").eval()
    with torch.no_grad():
        assert _rel(fresh(x), model(x)) <= 1e-6
    assert fresh.layer.scaling_rank is None and fresh.layer.scaling == 16 / 2


def test_gradient_init_is_deterministic_and_seed_dependent():
    _, _, a = _adapted("conv1d_dilated", "gradient", "per_layer", False, seed=0)
    _, _, b = _adapted("conv1d_dilated", "gradient", "per_layer", False, seed=0)
    _, _, c = _adapted("conv1d_dilated", "gradient", "per_layer", False, seed=5)
    assert torch.equal(a.layer.lora_A, b.layer.lora_A)
    assert torch.equal(a.layer.lora_B, b.layer.lora_B)
    assert not torch.equal(a.layer.lora_A, c.layer.lora_A)


def test_gradient_init_factors_follow_the_gradient():
    """LoRA-GA: B0 along the gradient's top r left singular vectors, A0 along the next r
    right ones, both scaled by rows ** 0.25 / sqrt(16)."""
    _, _, model, calib = _adapted("linear", "gradient", "per_layer", False, with_calibration=True)
    u, _, vh = torch.linalg.svd(calib.grads["layer"][0].double())
    b0, a0 = model.layer.lora_B_init.double(), model.layer.lora_A_init.double()
    scale = 5 ** 0.25 / 4
    assert torch.allclose((b0 / scale).abs(), u[:, :2].abs(), atol=1e-5)
    assert torch.allclose((a0 / scale).abs(), vh[2:4].abs(), atol=1e-5)


# ------------------------------------------------------------ on a tiny HTDemucs
SEGMENT = 0.25  # seconds: a quarter of helpers.TINY's, so each forward is 4x cheaper


def _config(**kw):
    return LoraConfig(lora_rank=4, lora_targets=("encoder", "decoder", "transformer"),
                      lora_gradient_batches=1, **kw)


@pytest.fixture(scope="module")
def calibrated():
    """(base, x, calibration of every target): one calibration pass for this module."""
    base = tiny_htdemucs(segment=SEGMENT).eval()
    g = torch.Generator().manual_seed(1)
    length = int(SEGMENT * 44100)
    x, y = torch.randn(1, 2, length, generator=g), torch.randn(1, 4, 2, length, generator=g)
    names = list(allocate_ranks(base, _config()))
    return base, x, calibrate(base, names, _config().lora_enable_qkv, [(x, y)], F.l1_loss, 1)


def test_sensitivity_allocation_budget_floor_determinism(calibrated):
    base, _, calib = calibrated
    config = _config(lora_rank_mode="sensitivity")
    table = allocate_ranks(base, config, calibration=calib)
    uniform = allocate_ranks(base, _config()).trainable_params()
    assert table.budget == uniform
    assert 0.95 * uniform <= table.trainable_params() <= uniform
    assert min(table.values()) >= 1  # no layer below rank 1
    assert len(set(table.values())) > 2  # not uniform
    assert dict(allocate_ranks(base, config, calibration=calib)) == dict(table)
    pinned = allocate_ranks(base, _config(lora_rank_mode="sensitivity",
                                          layer_ranks={"encoder.0.*": 0}), calibration=calib)
    assert all(r == 0 for n, r in pinned.items() if n.startswith("encoder.0."))
    assert 0.95 * uniform <= pinned.trainable_params() <= uniform


def test_sensitivity_follows_the_score():
    class TwoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) + 1e-3 * self.b(x)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 16), torch.randn(4, 3, 16)) for _ in range(3)]
    table = allocate_ranks(TwoLinear(), _config(lora_rank_mode="sensitivity"),
                           batches=batches, names=["a", "b"])
    assert table["b"] == 1 and table["a"] == 7  # 8 units; b's |W*G| is ~1000x smaller


def test_gora_on_htdemucs_reloads_on_the_unmodified_base(calibrated, tmp_path):
    """Gradient allocation + gradient init (GoRA's combination) on every HTDemucs layer
    kind, with mean-rank scaling: exact at init, after merging, and reloaded."""
    base, x, calib = calibrated
    model = copy.deepcopy(base)
    config = _config(lora_rank_mode="gradient", lora_init="gradient",
                     lora_scaling="mean_rank")
    table = allocate_ranks(model, config, calibration=calib)
    inject_lora(model, config.layout(table.active()))
    assert gradient_init(model, calib) == len(table.active())
    model.eval()
    with torch.no_grad():
        ref = base(x)
        assert _rel(model(x), ref) <= 1e-6
        _train_a_little(model)
        trained = model(x)
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()
    with torch.no_grad():
        assert _rel(fresh(x), trained) <= 1e-5
        assert _rel(merge_lora(model)(x), trained) <= 1e-5


# ------------------------------------------------------------ LoRA+ and bad values
def test_lora_plus_param_groups_keep_the_ratio_through_the_schedule():
    import dataclasses
    from demucs_lora.config.run_config import optim_config
    from demucs_lora.training.optim import build_optimizer, build_scheduler
    model = tiny_htdemucs(segment=SEGMENT)
    inject_lora(model, LoraLayout({"encoder.1.conv": 2, "crosstransformer.layers.0.self_attn":
                                   2}, train_extra=("decoder.3",)))
    cfg = optim_config(lr=1e-3, lora_plus_ratio=16.0, schedule="cosine", warmup_steps=2)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    rest, b_side = opt.param_groups
    assert {names[id(p)].rsplit(".", 1)[-1] for p in b_side["params"]} == \
        {"lora_B", "lora_B_q", "lora_B_v", "lora_B_o"}
    assert not any("lora_B" in names[id(p)] for p in rest["params"])
    assert any(names[id(p)].startswith("decoder.3") for p in rest["params"])
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(4):
        opt.step()
        sched.step()
        assert b_side["lr"] == pytest.approx(16 * rest["lr"])
    plain = build_optimizer(model, dataclasses.replace(cfg, lora_plus_ratio=1.0))
    assert len(plain.param_groups) == 1


@pytest.mark.parametrize("overrides,key", [
    (["htdemucs.lora_rank=4", "htdemucs.lora_init=magic"], "htdemucs.lora_init='magic'"),
    (["htdemucs.lora_rank=4", "optim.lora_plus_ratio=-2"], "optim.lora_plus_ratio=-2"),
    (["htdemucs.lora_rank=4", "htdemucs.lora_scaling=huge"], "htdemucs.lora_scaling='huge'"),
    (["htdemucs.lora_rank=4", "htdemucs.lora_rank_mode=sensitive"],
     "htdemucs.lora_rank_mode='sensitive'"),
    (["htdemucs.lora_rank=4", "htdemucs.lora_init=gradient",
      "htdemucs.lora_rank_adaptation=true"], "htdemucs.lora_init=gradient"),
])
def test_bad_values_are_one_line_config_errors(overrides, key):
    from demucs_lora.config.compose import compose
    from demucs_lora.config.resolve import prepare_config
    with pytest.raises(ConfigError) as err:
        prepare_config(compose(["model=htdemucs_tiny", "variant=debug", *overrides]))
    message = str(err.value)
    assert key in message and "\n" not in message
