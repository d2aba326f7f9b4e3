"""conf/model/*.yaml build the architectures they claim to.

htdemucs.yaml is the released htdemucs (955717e8): 41,984,456 parameters for 4 sources,
what `HTDemucs(sources=4, dconv_mode=3, bottom_channels=512)` of the installed demucs
has; htdemucs_6s.yaml the same with 6 sources; htdemucs_tiny.yaml (tests, demo, CI) keeps
the architecture of the shipped tiny base.
"""
from pathlib import Path

import pytest
from demucs.htdemucs import HTDemucs

from demucs_lora.config.compose import compose
from demucs_lora.config.run_config import architecture_kwargs, model_spec
from demucs_lora.models.build import build_base

ASSET = Path(__file__).resolve().parents[2] / "demucs_lora" / "assets" / "base_tiny_A.th"
RELEASED_4 = 41_984_456      # HTDemucs(sources=4, dconv_mode=3, bottom_channels=512)
CTOR_DEFAULT_4 = 26_899_536  # HTDemucs(sources=4): the benchmarks' second row


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_released_htdemucs_architecture():
    cfg = compose(["model=htdemucs"])
    kwargs = architecture_kwargs(cfg)
    assert (kwargs["dconv_mode"], kwargs["bottom_channels"], kwargs["t_dropout"],
            kwargs["depth"], kwargs["t_layers"]) == (3, 512, 0.02, 4, 5)
    model = build_base(model_spec(cfg))
    assert list(model.sources) == ["drums", "bass", "other", "vocals"]
    assert n_params(model) == RELEASED_4 and round(RELEASED_4 / 1e6, 2) == 41.98
    # the same count as the installed demucs gives for the released settings
    assert n_params(HTDemucs(sources=list(model.sources), dconv_mode=3,
                             bottom_channels=512)) == RELEASED_4
    assert hasattr(model, "channel_upsampler") and hasattr(model, "channel_downsampler_t")
    assert n_params(HTDemucs(sources=list(model.sources))) == CTOR_DEFAULT_4


def test_htdemucs_6s_sets_six_sources():
    cfg = compose(["model=htdemucs_6s"])
    assert list(cfg.dset.sources) == ["drums", "bass", "other", "vocals", "guitar", "piano"]
    model = build_base(model_spec(cfg))
    assert len(model.sources) == 6 and n_params(model) == 41_989_076
    assert architecture_kwargs(cfg) == architecture_kwargs(compose(["model=htdemucs"]))
    # the command line and variants still win over the model config
    assert list(compose(["model=htdemucs_6s", "dset.sources=[a,b]"]).dset.sources) == [
        "a", "b"]
    assert len(compose(["model=htdemucs_6s", "variant=five_stem"]).dset.sources) == 5


def test_tiny_config_keeps_the_shipped_base_architecture():
    from demucs_lora.model_files.packages import load_model_file
    cfg = compose(["model=htdemucs_tiny"])
    kwargs = architecture_kwargs(cfg)
    assert kwargs["dconv_mode"] == 1 and kwargs["bottom_channels"] == 0
    assert "t_dropout" not in kwargs
    base = load_model_file(ASSET)
    assert n_params(build_base(model_spec(cfg))) == n_params(base)


@pytest.mark.parametrize("overrides", [[], ["model=htdemucs_tiny", "variant=debug"],
                                       ["variant=five_stem"]])
def test_sources_default_unchanged(overrides):
    cfg = compose(overrides)
    expected = (["other", "kick", "vocals", "bass", "hihat"] if "variant=five_stem" in overrides
                else None)  # null: the base's sources (a new model: the 4 demucs stems)
    assert (list(cfg.dset.sources) if cfg.dset.sources is not None else None) == expected
