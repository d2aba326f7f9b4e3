"""Bases users have, by name from the HF cache: a 6-source model adapted to 4 and 5 stems,
and the released htdemucs architecture (41.98M parameters) taking one LoRA step."""
import pytest
import torch
from helpers import SIX, tiny_htdemucs
from model_layouts import isolate_caches, write_hf_cache

from demucs_lora.config.compose import compose
from demucs_lora.config.run_config import model_spec
from demucs_lora.models.build import build_model

X = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    return isolate_caches(tmp_path, monkeypatch) / "hf"


def _cfg(*overrides):
    return compose(["model=htdemucs_tiny", "htdemucs.lora_rank=4", *overrides])


@pytest.mark.parametrize("sources,init,kept", [
    (["drums", "bass", "other", "vocals"], "{other:[other,guitar,piano]}",
     ["drums", "bass", "vocals"]),
    (["kick", "bass", "other", "vocals", "guitar"], "{kick:drums}",
     ["bass", "other", "vocals", "guitar"]),
    (SIX, None, SIX),
])
def test_six_source_base_to_four_five_six_stems(hf_home, sources, init, kept):
    base = tiny_htdemucs(sources=SIX)
    write_hf_cache([base], hf_home, "htdemucs_6s", ["5c90dfd2"], repo="adefossez/HTDemucs-6s")
    overrides = [f"sources=[{','.join(sources)}]", "continue_from=htdemucs_6s"]
    if init:
        overrides.append(f"source_init={init}")
    model, report = build_model(model_spec(_cfg(*overrides)))
    assert list(model.sources) == sources and report["base_sources"] == SIX
    assert report["train_heads"] == ([] if sources == SIX else ["decoder.3.conv_tr",
                                                                  "tdecoder.3.conv_tr"])
    with torch.no_grad():
        ref, out = base.eval()(X), model.eval()(X)
    for name in kept:  # kept stems come out of the adapted model unchanged at init
        i, j = sources.index(name), SIX.index(name)
        assert (out[:, i] - ref[:, j]).abs().max() < 1e-5, name
    if "kick" in sources:
        assert (out[:, 0] - ref[:, 0]).abs().max() < 1e-5  # kick starts as drums
    if init and "guitar" not in sources:
        summed = ref[:, [2, 4, 5]].sum(1)  # other = other + guitar + piano (+ mean, 5%)
        assert (out[:, 2] - summed).abs().max() / summed.abs().max() < 0.05


@pytest.mark.slow  # a full-size HTDemucs
def test_released_htdemucs_architecture_from_hf_cache_takes_a_lora_step(hf_home):
    """One full-size HTDemucs as demucs ships htdemucs (dconv_mode=3, bottom_channels=512),
    random weights, in the HF layout: continue_from=htdemucs finds it and trains."""
    from demucs.htdemucs import HTDemucs
    torch.manual_seed(0)
    base = HTDemucs(sources=["drums", "bass", "other", "vocals"], dconv_mode=3,
                    bottom_channels=512, t_dropout=0.02)
    count = sum(p.numel() for p in base.parameters())
    assert round(count / 1e6, 2) == 41.98, count
    write_hf_cache([base], hf_home, "htdemucs", ["955717e8"])
    del base
    model, report = build_model(model_spec(compose(["continue_from=htdemucs",
                                                          "htdemucs.lora_rank=8"])))
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == count
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < report["trainable"]["trainable"] < 0.05 * count
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    model.train()
    mix = torch.randn(1, 2, 44100 // 2)
    loss = model(mix).abs().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
