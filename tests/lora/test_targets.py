import pytest
from torch import nn
from helpers import tiny_two_layer

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.layers import SUPPORTED_TYPES, wrap_module
from demucs_lora.lora.config import TARGET_GROUPS
from demucs_lora.lora.targets import (glob_specificity, head_names, layer_role,
                                      lora_target_names, resolve_alias)

SOURCES = ["drums", "bass", "other", "vocals"]



def test_encoder_decoder_groups(model):
    enc = lora_target_names(model, ["encoder"])
    dec = lora_target_names(model, ["decoder"])
    assert enc and all(n.split(".")[0] in ("encoder", "tencoder") for n in enc)
    assert dec and all(n.split(".")[0] in ("decoder", "tdecoder") for n in dec)
    assert {"encoder.0.conv", "tencoder.3.rewrite", "encoder.2.dconv.layers.1.3"} <= set(enc)
    assert {"decoder.0.conv_tr", "tdecoder.3.rewrite"} <= set(dec)
    for n in enc + dec:  # norms, GELU, LayerScale are not targets
        assert isinstance(model.get_submodule(n), SUPPORTED_TYPES)
    assert not any("norm" in n for n in enc + dec)


def test_transformer_group_wraps_attention_whole(model):
    names = lora_target_names(model, ["transformer"])
    expected = []
    for branch in ("layers", "layers_t"):
        expected += [f"crosstransformer.{branch}.0.self_attn",
                     f"crosstransformer.{branch}.0.linear1",
                     f"crosstransformer.{branch}.0.linear2",
                     f"crosstransformer.{branch}.1.cross_attn",
                     f"crosstransformer.{branch}.1.linear1",
                     f"crosstransformer.{branch}.1.linear2"]
    assert sorted(names) == sorted(expected)
    assert not any("out_proj" in n for n in names)
    assert isinstance(model.get_submodule(names[0]), nn.MultiheadAttention)


def test_order_follows_groups_given_and_module_order(model):
    both = lora_target_names(model, ["decoder", "encoder"])
    assert both == [n for n, _ in model.named_modules() if n in set(both)]
    assert len(both) == len(set(both))


def test_upsampler_and_freq_emb():
    m = tiny_two_layer(bottom_channels=16)
    assert lora_target_names(m, ["upsampler"]) == [
        "channel_upsampler", "channel_downsampler",
        "channel_upsampler_t", "channel_downsampler_t"]
    assert lora_target_names(m, ["freq_emb"]) == ["freq_emb.embedding"]
    assert lora_target_names(tiny_two_layer(), ["upsampler"]) == []  # absent without bottom_channels


def test_unknown_group_lists_allowed(model):
    with pytest.raises(ConfigError) as err:
        lora_target_names(model, ["encoder", "attention"])
    msg = str(err.value)
    assert "attention" in msg and "htdemucs.lora_targets" in msg
    for group in TARGET_GROUPS:
        assert group in msg


def test_wrapped_model_lists_wrapper_not_base():
    m = tiny_two_layer()
    m.encoder[1].conv = wrap_module(m.encoder[1].conv, 2)
    names = lora_target_names(m, ["encoder"])
    assert "encoder.1.conv" in names
    assert not any(n.startswith("encoder.1.conv.") for n in names)


def test_head_names_depend_on_sources(model):
    assert head_names(model) == ["decoder.3.conv_tr", "tdecoder.3.conv_tr"]
    two = tiny_two_layer(["vocals", "accompaniment"])
    sd4, sd2 = model.state_dict(), two.state_dict()
    heads = {f"{h}.weight" for h in head_names(model)} | {f"{h}.bias" for h in head_names(model)}
    differing = {k for k in sd4 if sd4[k].shape != sd2[k].shape}
    assert differing == heads


def test_resolve_alias():
    assert resolve_alias("transformer.*") == "crosstransformer.*"
    assert resolve_alias("transformer") == "crosstransformer"
    assert resolve_alias("transformer.self_attn.*") == "crosstransformer.*.self_attn"
    assert resolve_alias("transformer.cross_attn") == "crosstransformer.*.cross_attn"
    assert resolve_alias("transformer.linear1.*") == "crosstransformer.*.linear1"
    assert resolve_alias("transformer.layers_t.0.*") == "crosstransformer.layers_t.0.*"
    assert resolve_alias("encoder.0.*") == "encoder.0.*"
    assert resolve_alias("crosstransformer.layers.0.*") == "crosstransformer.layers.0.*"


def test_glob_specificity():
    assert glob_specificity("encoder.0.*") == 10
    assert glob_specificity("*") == 0
    assert glob_specificity("encoder.[12].conv?") == len("encoder..conv")


@pytest.mark.parametrize("name,role", [
    ("encoder.0.conv", "outer_encoder"),
    ("encoder.0.dconv.layers.0.0", "outer_encoder"),
    ("tencoder.0.rewrite", "outer_encoder"),
    ("encoder.1.conv", "encoder"),
    ("encoder.1.dconv.layers.1.3", "dconv"),
    ("encoder.3.rewrite", "inner_encoder"),
    ("tencoder.3.dconv.layers.0.0", "dconv"),
    ("decoder.0.conv_tr", "inner_decoder"),
    ("tdecoder.0.rewrite", "inner_decoder"),
    ("decoder.2.rewrite", "decoder"),
    ("decoder.3.rewrite", "outer_decoder"),
    ("decoder.3.conv_tr", "head"),
    ("tdecoder.3.conv_tr", "head"),
    ("crosstransformer.layers.0.self_attn", "attention"),
    ("crosstransformer.layers_t.1.cross_attn", "attention"),
    ("crosstransformer.layers.1.linear2", "ffn"),
    ("channel_upsampler_t", "upsampler"),
    ("freq_emb.embedding", "freq_emb"),
    ("something.else", "other"),
])
def test_layer_role(name, role):
    assert layer_role(name, 4) == role


def test_layer_role_shorter_time_branch():
    assert layer_role("tdecoder.2.conv_tr", 4, t_depth=3) == "head"
    assert layer_role("tencoder.2.conv", 4, t_depth=3) == "inner_encoder"
