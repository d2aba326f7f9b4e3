"""`LoraConfig` owns the htdemucs LoRA keys: its defaults are conf/model/htdemucs.yaml's,
every key is checked once with a message naming it; `LoraLayout` round-trips through the
adapter header and compares what a hot-swap needs."""
import copy
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LAYOUT_KEYS, LORA_KEYS, LoraConfig, LoraLayout

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


@pytest.mark.parametrize("model", ["htdemucs", "htdemucs_tiny", "htdemucs_6s"])
def test_yaml_defaults_are_the_dataclass_defaults(model):
    from demucs_lora.config.schema import load_group_file  # follows the defaults lists
    node = load_group_file(CONF / f"{model}.yaml")["htdemucs"]
    lora_keys = [k for k in node if k.startswith("lora_") or k in LORA_KEYS]
    assert sorted(lora_keys) == sorted(LORA_KEYS)  # no key in one place only
    assert LoraConfig.from_cfg(node) == LoraConfig()
    own = OmegaConf.load(CONF / "lora_keys.yaml").htdemucs
    assert all(k not in own for k in OmegaConf.load(CONF / f"{model}.yaml").get("htdemucs", {}))


@pytest.mark.parametrize("key,value,allowed", [
    ("lora_rank", -1, "integer >= 0"), ("lora_alpha", 0, "positive"),
    ("lora_dropout", 1.0, "[0, 1)"), ("lora_rslora", "yes", "true or false"),
    ("lora_targets", ["attention"], "allowed groups"), ("lora_bias", "some", "lora_only"),
    ("lora_rank_mode", "svd", "gradient"), ("lora_max_rank", 0, "integer >= 1"),
    ("layer_ranks", [1, 2], "mapping"), ("min_rank", 0, "integer >= 1"),
    ("lora_enable_qkv", [True], "three booleans"), ("lora_gradient_batches", 0, ">= 1"),
    ("lora_adapt_every", 1.5, "integer"), ("lora_save_dtype", "fp8", "bfloat16")])
def test_each_bad_value_names_the_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as exc:
        LoraConfig(**{key: value})
    text = str(exc.value)
    assert f"htdemucs.{key}" in text and allowed in text and "\n" not in text


def test_from_cfg_reads_config_nodes_and_checks_them_alike():
    node = OmegaConf.create({"lora_rank": 4, "layer_ranks": {"encoder.*": 2}, "depth": 4})
    assert LoraConfig.from_cfg(node).layer_ranks == (("encoder.*", 2),)
    with pytest.raises(ConfigError, match="htdemucs.layer_ranks=.*mapping"):
        LoraConfig.from_cfg(OmegaConf.create({"layer_ranks": [1, 2]}))


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="min_rank must not exceed max_rank"):
        LoraConfig(min_rank=8, max_rank=4)
    with pytest.raises(ConfigError, match="htdemucs.lora_rank > 0"):
        LoraConfig(lora_rank_adaptation=True)


def test_clamps():
    config = LoraConfig(lora_max_rank=16, max_rank=8)
    assert [config.rank_cap(s) for s in (4, 64)] == [4, 16]
    assert [config.gradient_cap(s) for s in (4, 64)] == [4, 8]
    assert LoraConfig(lora_max_rank=None).rank_cap(64) == 64


def test_layout_round_trips_the_header_and_compares_the_tensor_layout():
    layout = LoraConfig(lora_alpha=8, lora_dropout=0.1).layout({"a": 2, "b": 0}, ["head"])
    header = layout.to_header()
    assert list(header) == list(LAYOUT_KEYS) and header["ranks"] == {"a": 2}
    assert LoraLayout.from_header(header) == layout
    assert dict(layout)["alpha"] == 8.0 and layout["enable_qkv"] == (True, False, True)
    assert layout == LoraLayout({"a": 2}, alpha=8, dropout=0.3, train_extra=["head"])  # no tensor
    other = LoraLayout({"a": 3}, alpha=8, train_extra=["head"])
    assert layout != other
    assert layout.differences(other) == ["ranks of 1 layer(s) [a: model 2, adapter 3]"]
    assert copy.deepcopy(layout) == layout and pickle.loads(pickle.dumps(layout)) == layout
