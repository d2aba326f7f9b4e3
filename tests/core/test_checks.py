"""`core.checks`: the value-rule shapes every room uses, one message form; each key's rule
lives once (LoraConfig's ints, data.roots' dset.valid_tracks, data.layout's dset.mixture)."""
import pytest
from omegaconf import OmegaConf

from demucs_lora.core.checks import check_choice, check_int, is_number
from demucs_lora.core.errors import ConfigError


def test_numbers_ints_and_choices():
    assert is_number(2) and is_number(2.5) and is_number(2.0, integer=True)
    assert not any(is_number(v) for v in (True, "2", None, float("nan"), float("inf")))
    assert not is_number(2.5, integer=True)
    assert check_int(3.0, "k", 1) == 3
    for bad in (0, 2.5, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ConfigError, match=r"^k=.*: must be an integer >= 1$"):
            check_int(bad, "k", 1)
    with pytest.raises(ConfigError, match=r"^k='x': allowed values are \['a', 'b'\]$"):
        check_choice("x", "k", ("a", "b"))


def test_lora_ints_refuse_inf_and_nan_as_config_errors():
    from demucs_lora.lora.config import LoraConfig
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="htdemucs.lora_rank="):
            LoraConfig(lora_rank=bad)


def test_valid_tracks_and_mixture_have_one_rule_each():
    from demucs_lora.config.compose import compose
    from demucs_lora.config.values import CHOICES, check_value_ranges
    from demucs_lora.data.layout import MIXTURE_MODES
    from demucs_lora.data.roots import check_valid_tracks
    assert CHOICES["dset.mixture"] is MIXTURE_MODES
    cfg = compose(["model=htdemucs_tiny", "variant=debug"])
    for value in (0, -1, 1.5, "two"):
        with pytest.raises(ConfigError) as data_rule:
            check_valid_tracks(value)
        bad = OmegaConf.merge(cfg, {"dset": {"valid_tracks": value}})
        with pytest.raises(ConfigError) as config_rule:
            check_value_ranges(bad)
        assert str(data_rule.value) == str(config_rule.value)
    for value in (None, 2, 2.0, 0.1):
        check_valid_tracks(value)
        check_value_ranges(OmegaConf.merge(cfg, {"dset": {"valid_tracks": value}}))
