"""Injection on a whole tiny HTDemucs, removal back to plain demucs, adapter files."""
import json

import pytest
import torch
from demucs.htdemucs import HTDemucs
from helpers import forward as run
from helpers import randomize_b, tiny_htdemucs, tiny_two_layer
from demucs.pretrained import get_model
from demucs.states import serialize_model
from omegaconf import OmegaConf
from safetensors import safe_open

from demucs_lora.core.errors import AdapterMismatch, ConfigError
from demucs_lora.lora.config import LoraLayout
from demucs_lora.lora.adapt import inject_lora
from demucs_lora.lora.inject import (iter_lora_layers, merge_lora, remove_lora, unmerge_lora,
                                     wrap_layers)
from demucs_lora.lora.state import get_lora_state, save_adapter
from demucs_lora.models.guide_methods import load_lora_weights
from demucs_lora.lora.targets import lora_target_names

ALL = ["encoder", "decoder", "transformer", "freq_emb"]



def test_whole_model_identity_merge_and_remove(mix, tmp_path):
    model = tiny_two_layer()
    ref = run(model, mix)
    names = lora_target_names(model, ALL)
    report = wrap_layers(model, LoraLayout({n: 4 for n in names}))
    assert len(report) == len(names) == len(list(iter_lora_layers(model)))
    assert run(model, mix).sub(ref).abs().max() == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    randomize_b(model)
    unmerged = run(model, mix)
    assert (unmerged - ref).abs().max() > 1e-4  # the adapter does something
    merge_lora(model)
    merge_lora(model)  # idempotent: never a double add
    merged = run(model, mix)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()) < 1e-4
    unmerge_lora(model)
    assert ((run(model, mix) - unmerged).abs().max() / unmerged.abs().max()) < 1e-5
    plain = remove_lora(model)
    assert not list(iter_lora_layers(plain))
    assert all(type(m).__name__.find("LoRA") < 0 for m in plain.modules())
    out = run(plain, mix)
    assert ((out - merged).abs().max() / merged.abs().max()) < 1e-5
    torch.save(serialize_model(plain, OmegaConf.create({}), half=False), tmp_path / "mine.th")
    reloaded = get_model("mine", repo=tmp_path)  # what the stock demucs CLI does
    assert isinstance(reloaded, HTDemucs)
    reloaded.train()
    assert ((run(reloaded, mix) - out).abs().max() / out.abs().max()) < 1e-5


def test_adapter_round_trip_and_header(mix, tmp_path):
    model = tiny_two_layer()
    names = lora_target_names(model, ["encoder", "transformer"])
    inject_lora(model, LoraLayout({n: 2 for n in names}, alpha=8,
                                  train_extra=["decoder.3.conv_tr"]))
    randomize_b(model)
    with torch.no_grad():
        model.decoder[3].conv_tr.weight.mul_(1.5)  # a "trained" head
    expected = run(model, mix)
    tensors, header = save_adapter(model, tmp_path / "ad", note="x")
    meta = json.loads(header.read_text())
    assert meta["alpha"] == 8 and meta["note"] == "x" and meta["sources"] == model.sources
    assert set(meta["ranks"].values()) == {2}
    with safe_open(str(tensors), "pt") as f:
        keys = set(f.keys())
        assert "demucs_lora" in f.metadata()
    assert keys == set(get_lora_state(model))
    assert "decoder.3.conv_tr.weight" in keys
    fresh = load_lora_weights(tiny_two_layer(), tmp_path / "ad")
    assert (run(fresh, mix) - expected).abs().max() == 0


def test_adapter_on_other_base_or_shape_is_mismatch(tmp_path):
    model = tiny_two_layer()
    inject_lora(model, LoraLayout({n: 2 for n in lora_target_names(model, ["transformer"])}))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(AdapterMismatch, match="different base"):
        load_lora_weights(tiny_two_layer(seed=5), tmp_path / "ad")
    other = tiny_two_layer()
    inject_lora(other, LoraLayout({n: 3 for n in lora_target_names(other, ["transformer"])}))
    with pytest.raises(AdapterMismatch, match="ranks"):
        load_lora_weights(other, tmp_path / "ad")
    wider = tiny_htdemucs(channels=16, t_layers=2)
    with pytest.raises(AdapterMismatch, match="shape mismatches"):
        load_lora_weights(wider, tmp_path / "ad")
    scaled = tiny_two_layer()
    inject_lora(scaled, LoraLayout({n: 2 for n in lora_target_names(scaled, ["transformer"])},
                                   alpha=4))
    with pytest.raises(AdapterMismatch, match="alpha"):
        load_lora_weights(scaled, tmp_path / "ad")  # same shapes, other scaling: refused
    with pytest.raises(AdapterMismatch, match="does not exist"):
        load_lora_weights(tiny_two_layer(), tmp_path / "nothing")


def test_hot_swap_on_one_base(mix, tmp_path):
    model = tiny_two_layer()
    base_out = run(model, mix)
    inject_lora(model, LoraLayout({n: 2 for n in lora_target_names(model, ["decoder"])}))
    randomize_b(model, seed=1)
    out_a = run(model, mix)
    save_adapter(model, tmp_path / "a")
    randomize_b(model, seed=2)
    out_b = run(model, mix)
    save_adapter(model, tmp_path / "b")
    merge_lora(model)
    assert (load_lora_weights(model, tmp_path / "a") is model)
    assert ((run(model, mix) - out_a).abs().max() / out_a.abs().max()) < 1e-5
    unmerge_lora(model)
    load_lora_weights(model, tmp_path / "b")
    assert ((run(model, mix) - out_b).abs().max() / out_b.abs().max()) < 1e-5
    assert (out_a - base_out).abs().max() > 1e-5 and (out_a - out_b).abs().max() > 1e-5


def test_inject_errors():
    model = tiny_two_layer()
    with pytest.raises(ConfigError, match="close names"):
        inject_lora(model, LoraLayout({"encoder.9.conv": 4}))
    with pytest.raises(ConfigError, match="lora_bias"):
        inject_lora(model, LoraLayout({"encoder.1.conv": 4}, bias="some"))
    inject_lora(model, LoraLayout({"encoder.1.conv": 4}, bias="all"))
    assert model.encoder[2].conv.bias.requires_grad  # bias=all: every bias trains
    with pytest.raises(ConfigError, match="already has LoRA"):
        inject_lora(model, LoraLayout({"encoder.2.conv": 4}))
