import json
import logging
import types
from pathlib import Path

import pytest
import torch
from demucs.htdemucs import HTDemucs
from omegaconf import OmegaConf
from torch import nn
from helpers import tiny_two_layer

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LoraConfig
from demucs_lora.lora.layers import params_per_rank
from demucs_lora.lora.ranks import RankTable, allocate_ranks
from demucs_lora.lora.targets import lora_target_names

SOURCES = ["drums", "bass", "other", "vocals"]
YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "htdemucs.yaml"



def raw_cfg(**overrides):
    base = dict(lora_rank=8, lora_rank_mode="uniform",
                lora_targets=["encoder", "decoder", "transformer"], lora_max_rank=32,
                layer_ranks=None, min_rank=1, max_rank=32,
                lora_enable_qkv=[True, False, True], lora_gradient_batches=2)
    base.update(overrides)
    return base


def cfg(**overrides):
    return LoraConfig.from_cfg(raw_cfg(**overrides))


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 2, 4096, generator=g), torch.randn(2, 4, 2, 4096, generator=g))
            for _ in range(2)]


def smallest(model, name):
    m = model.get_submodule(name)
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    w = m.weight  # conv: (out, in*k); conv_tr: (in, out*k); linear: (out, in)
    return min(w.shape[0], w[0].numel())


def test_uniform_table(model):
    table = allocate_ranks(model, cfg())
    names = lora_target_names(model, ["encoder", "decoder", "transformer"])
    assert isinstance(table, RankTable) and list(table) == names
    for n in names:
        assert table[n] == min(8, smallest(model, n))
    assert table["crosstransformer.layers.0.self_attn"] == 8
    assert table["encoder.0.dconv.layers.0.0"] == 1  # (1, 8*3): smallest dim 1
    expected = sum(table[n] * params_per_rank(model.get_submodule(n)) for n in names)
    assert table.trainable_params() == expected


def test_heuristic_default_table(model):
    table = allocate_ranks(model, cfg(lora_rank_mode="heuristic"))
    for n, r in table.items():
        if n.split(".")[:2] in (["encoder", "0"], ["tencoder", "0"],
                                ["decoder", "3"], ["tdecoder", "3"]):
            assert r == 0, n
    assert table["encoder.3.conv"] == 16 and table["tencoder.3.rewrite"] == 16
    assert table["decoder.0.conv_tr"] == 16 and table["tdecoder.0.rewrite"] == 16
    assert table["crosstransformer.layers.0.self_attn"] == 16
    assert table["crosstransformer.layers_t.1.cross_attn"] == 16
    assert table["crosstransformer.layers.1.linear1"] == 8
    assert table["encoder.1.conv"] == 8 and table["decoder.2.rewrite"] == 8
    assert table["encoder.3.dconv.layers.0.0"] == 4  # r/2
    assert table["encoder.1.dconv.layers.0.0"] == 2  # r/2=4 clamped to smallest dim 2
    assert set(table.active()) == {n for n, r in table.items() if r > 0}
    assert "decoder.3.conv_tr" not in table.active()


def test_heuristic_overrides_with_aliases(model):
    layer_ranks = {"encoder.0.*": 4, "transformer.*": 16, "transformer.self_attn.*": 8,
                   "decoder.3.*": 4}
    table = allocate_ranks(model, cfg(lora_rank_mode="heuristic", layer_ranks=layer_ranks))
    for branch in ("layers", "layers_t"):
        assert table[f"crosstransformer.{branch}.0.self_attn"] == 8
        assert table[f"crosstransformer.{branch}.1.cross_attn"] == 16
        assert table[f"crosstransformer.{branch}.0.linear1"] == 16
        assert table[f"crosstransformer.{branch}.1.linear2"] == 16
    assert table["encoder.0.conv"] == 4 and table["encoder.0.rewrite"] == 4
    assert table["decoder.3.conv_tr"] == 4
    assert table["tencoder.0.conv"] == 0  # "encoder.0.*" is not tencoder
    assert table["encoder.1.conv"] == 8  # untouched


def test_specific_and_later_globs_win(model):
    ranks = {"encoder.?.conv": 3, "encoder.1.*": 5}  # more specific first, still wins
    table = allocate_ranks(model, cfg(layer_ranks=ranks))
    assert table["encoder.1.conv"] == 3 and table["encoder.1.rewrite"] == 5
    tie = {"encoder.1.c*": 3, "encoder.1.*o*": 6}  # same specificity: later wins
    assert allocate_ranks(model, cfg(layer_ranks=tie))["encoder.1.conv"] == 6


def test_uniform_honors_layer_ranks_and_zero_disables(model):
    table = allocate_ranks(model, cfg(layer_ranks={"decoder.*": 0, "tdecoder.*": 0}))
    assert all(r == 0 for n, r in table.items() if "decoder" in n)
    assert not any("decoder" in n for n in table.active())
    assert table["encoder.1.conv"] == 8


def test_unmatched_glob_lists_close_names(model):
    with pytest.raises(ConfigError) as err:
        allocate_ranks(model, cfg(layer_ranks={"encoder.9.conv": 4}))
    msg = str(err.value)
    assert "encoder.9.conv" in msg and "htdemucs.layer_ranks" in msg
    assert "close names" in msg and all(f"'encoder.{i}.conv'" in msg for i in range(4))
    with pytest.raises(ConfigError, match="freq_emb"):  # exists but is not targeted
        allocate_ranks(model, cfg(layer_ranks={"freq_emb.*": 4}))


def test_bad_config_values(model):
    with pytest.raises(ConfigError) as err:
        allocate_ranks(model, cfg(lora_rank_mode="svd"))
    assert "htdemucs.lora_rank_mode" in str(err.value) and "gradient" in str(err.value)
    with pytest.raises(ConfigError, match="full fine-tun"):
        allocate_ranks(model, cfg(lora_rank=0))
    with pytest.raises(ConfigError, match="layer_ranks"):
        allocate_ranks(model, cfg(layer_ranks={"encoder.1.*": -1}))
    with pytest.raises(ConfigError, match="lora_targets"):
        allocate_ranks(model, cfg(lora_targets=["upsampler"]))  # none in this model


def test_clamp_to_max_rank_and_smallest_dim_logged_once(model, caplog):
    with caplog.at_level(logging.INFO, logger="demucs_lora.lora.ranks"):
        table = allocate_ranks(model, cfg(lora_rank=64, lora_max_rank=24))
    assert table["crosstransformer.layers.0.self_attn"] == 24  # lora_max_rank
    assert table["crosstransformer.layers.0.linear1"] == 24
    assert table["encoder.0.conv"] == 8  # (8, 4*8): smallest dim 8
    assert table["encoder.2.dconv.layers.0.3"] == 4  # (64, 4)
    assert all(r <= min(24, smallest(model, n)) for n, r in table.items())
    msgs = [r.getMessage() for r in caplog.records]
    for n in table:
        assert sum(f" {n} clamped" in m for m in msgs) == 1, n
    assert any("lora_max_rank=24" in m for m in msgs)


def test_accepts_omegaconf_and_namespace(model):
    from demucs_lora.config.schema import load_group_file  # with lora_keys.yaml
    node = OmegaConf.create(load_group_file(YAML)["htdemucs"])
    node = OmegaConf.merge(node, {"lora_rank": 8, "lora_rank_mode": "heuristic",
                                  "layer_ranks": {"transformer.*": 4}})
    table = allocate_ranks(model, LoraConfig.from_cfg(node))
    assert table["crosstransformer.layers.0.linear1"] == 4
    ns = types.SimpleNamespace(**raw_cfg())
    from_namespace = allocate_ranks(model, LoraConfig.from_cfg(ns))
    assert dict(from_namespace) == dict(allocate_ranks(model, cfg()))


def test_format_and_json(model):
    table = allocate_ranks(model, cfg(lora_rank_mode="heuristic"))
    text = table.format()
    assert text.splitlines()[0].split() == ["layer", "type", "shape", "rank", "params"]
    assert "crosstransformer.layers.0.self_attn" in text and "MultiheadAttention" in text
    data = json.loads(table.to_json())
    assert data["mode"] == "heuristic" and data["ranks"] == dict(table)
    assert data["trainable_params"] == table.trainable_params()


# ------------------------------------------------------------------- gradient mode

class TwoLinear(nn.Module):
    """The loss sees `b` only through a tiny factor: its gradient has little energy."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.a(x) + 1e-3 * self.b(x)


def test_gradient_gives_rank_to_the_energetic_layer():
    torch.manual_seed(0)
    model = TwoLinear()
    batches = [(torch.randn(4, 3, 16), torch.randn(4, 3, 16)) for _ in range(3)]
    table = allocate_ranks(model, cfg(lora_rank=4, lora_rank_mode="gradient"),
                           batches=batches, names=["a", "b"])
    assert table["b"] == 1 and table["a"] == 7  # budget 2 layers x 4 = 8 units
    assert table.trainable_params() == table.budget == 2 * 4 * 32


def test_gradient_needs_batches(model):
    with pytest.raises(ConfigError, match="calibration"):
        allocate_ranks(model, cfg(lora_rank_mode="gradient"))


def test_gradient_budget_bounds_and_determinism(model, batches):
    model.train()
    frozen = "encoder.1.conv.weight"
    params = dict(model.named_parameters())
    params[frozen].requires_grad_(False)
    try:
        c = cfg(lora_rank_mode="gradient", min_rank=1, max_rank=16)
        table = allocate_ranks(model, c, batches=batches)
        uniform = allocate_ranks(model, cfg()).trainable_params()
        assert table.budget == uniform
        assert 0.95 * uniform <= table.trainable_params() <= uniform
        for n, r in table.items():
            assert 1 <= r <= min(16, smallest(model, n)), n
        assert len(set(table.values())) > 2  # not uniform
        assert dict(allocate_ranks(model, c, batches=batches)) == dict(table)
        # state restored: train mode, requires_grad, no gradients left behind
        assert model.training and all(m.training for m in model.modules())
        assert not params[frozen].requires_grad
        assert all(p.requires_grad for k, p in params.items() if k != frozen)
        assert all(p.grad is None for p in model.parameters())
    finally:
        params[frozen].requires_grad_(True)


def test_gradient_with_pinned_layers(model, batches):
    c = cfg(lora_rank_mode="gradient", layer_ranks={"encoder.0.*": 0, "decoder.3.*": 0})
    table = allocate_ranks(model, c, batches=batches)
    assert all(r == 0 for n, r in table.items() if n.startswith(("encoder.0.", "decoder.3.")))
    assert 0.95 * table.budget <= table.trainable_params() <= table.budget


# ------------------------------------------------------------------- acceptance

def test_full_size_uniform_r8_under_5_percent():
    torch.manual_seed(0)
    model = HTDemucs(sources=SOURCES)
    table = allocate_ranks(model, cfg(lora_rank=8))
    print()
    print(table.format())
    fraction = table.trainable_params() / sum(p.numel() for p in model.parameters())
    print(f"LoRA uniform r=8 trainable fraction: {100 * fraction:.2f}%")
    assert fraction < 0.05


def test_heuristic_budget_match_spends_at_most_uniform_budget():
    model = tiny_two_layer()
    cfg = {"lora_rank": 8, "lora_targets": ["encoder", "decoder", "transformer"],
           "lora_max_rank": 32}
    def table(**kw):
        return allocate_ranks(model, LoraConfig.from_cfg(dict(cfg, **kw)))
    uniform = table(lora_rank_mode="uniform")
    plain = table(lora_rank_mode="heuristic")
    matched = table(lora_rank_mode="heuristic", lora_budget_match=True)
    budget = uniform.trainable_params()
    assert plain.trainable_params() > budget  # the plain table overspends here
    assert 0.85 * budget <= matched.trainable_params() <= budget
    # Same shape of table: outermost layers stay at 0, attention above the middle layers.
    assert matched["encoder.0.conv"] == 0
    assert matched["crosstransformer.layers.0.self_attn"] >= matched["encoder.1.conv"]
