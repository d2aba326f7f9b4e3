"""Every MSST LoRA spelling (/work/shared/seeds/msst-lora.md: the `lora:` block, its
keys, `--train_lora`) is accepted as an alias of the project's key or refused naming it."""
import shutil

import pytest
from omegaconf import OmegaConf

from demucs_lora.config.compose import compose
from demucs_lora.core.errors import ConfigError
from demucs_lora.core.paths import CONF_DIR

MSST_BLOCK = """
lora:
  r: 8
  lora_alpha: 16 # alpha / rank > 1
  lora_dropout: 0.05
  merge_weights: False
  fan_in_fan_out: False
  enable_lora: [True]
"""
EXPECTED = {"htdemucs.lora_rank": 8, "htdemucs.lora_alpha": 16, "htdemucs.lora_dropout": 0.05,
            "htdemucs.lora_enable_qkv": [True, True, True]}


def _check(cfg, expected):
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key
    assert "lora" not in cfg


def test_msst_block_pasted_into_config_yaml_takes_effect(tmp_path):
    from demucs_lora.train import _LoRAHydraMain, run
    from demucs_lora.config.resolve import prepare_config
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text() + MSST_BLOCK)
    (conf / "variant" / "msst.yaml").write_text("# @package _global_\n" + MSST_BLOCK)
    main = _LoRAHydraMain(run, config_name="config", config_path=str(conf),
                          version_base="1.3")
    _check(prepare_config(main.get_xp(["continue_from=htdemucs"]).cfg), EXPECTED)
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text().replace(
        MSST_BLOCK, ""))
    main = _LoRAHydraMain(run, config_name="config", config_path=str(conf),
                          version_base="1.3")
    _check(prepare_config(main.get_xp(["continue_from=htdemucs", "variant=msst"]).cfg),
           EXPECTED)


@pytest.mark.parametrize("argv,expected", [
    (["lora.r=8", "lora.lora_alpha=16", "lora.lora_dropout=0.05"],
     {"htdemucs.lora_rank": 8, "htdemucs.lora_alpha": 16, "htdemucs.lora_dropout": 0.05}),
    (["htdemucs.lora_rank=4", "htdemucs.enable_lora=[true,false,true]"],
     {"htdemucs.lora_enable_qkv": [True, False, True]}),
    (["htdemucs.lora_rank=4", "lora.enable_lora=[true]", "lora.merge_weights=false",
      "lora.fan_in_fan_out=False"], {"htdemucs.lora_enable_qkv": [True, True, True]}),
])
def test_msst_spellings_on_the_command_line(argv, expected):
    _check(compose(argv), expected)


@pytest.mark.parametrize("argv,message", [
    (["lora.merge_weights=true"], "lora.merge_weights='true' is MSST's spelling and has no "
                                  "key here: adapters stay separate"),
    (["lora.fan_in_fan_out=true"], "lora.fan_in_fan_out="),
    (["train_lora=true"], "set htdemucs.lora_rank"),
    (["htdemucs.enable_lora=[true,false]"], "htdemucs.lora_enable_qkv=[true,false,true]"),
    (["lora.foo=1"], "MSST's `lora:` block: r, lora_alpha, lora_dropout and enable_lora are "
                     "htdemucs.lora_rank"),
])
def test_msst_spellings_refused_with_ours(argv, message):
    with pytest.raises(ConfigError) as info:
        compose(argv)
    assert message in str(info.value)
