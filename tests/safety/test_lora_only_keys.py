"""LoRA-only keys set with htdemucs.lora_rank=0 (a full fine-tune) are refused, naming
them and htdemucs.lora_rank (the guide's layer_ranks block alone ran a full fine-tune)."""
import pytest

from demucs_lora.config.check import check_config
from demucs_lora.config.compose import compose
from demucs_lora.core.errors import ConfigError


@pytest.mark.parametrize("override,key", [
    ("htdemucs.layer_ranks={encoder.0.*:16,transformer.*:12}", "htdemucs.layer_ranks"),
    ("htdemucs.lora_rank_mode=heuristic", "htdemucs.lora_rank_mode"),
    ("htdemucs.lora_alpha=1.0", "htdemucs.lora_alpha"),
    ("htdemucs.lora_dropout=0.1", "htdemucs.lora_dropout"),
    ("htdemucs.lora_enable_qkv=[true,true,true]", "htdemucs.lora_enable_qkv"),
])
def test_lora_only_key_without_a_rank(override, key):
    with pytest.raises(ConfigError) as info:
        check_config(compose([override]))
    message = str(info.value)
    assert message.startswith(f"{key} set, but htdemucs.lora_rank=0 is a full fine-tune")
    assert "set htdemucs.lora_rank" in message
    check_config(compose([override, "htdemucs.lora_rank=4"]))   # with a rank: fine
    check_config(compose(["htdemucs.lora_rank=0"]))             # a plain full fine-tune
