"""`htdemucs.lora_save_dtype`: adapter factors stored in float16 / bfloat16.

The file about halves, loading casts back to float32, and the output moves by a small,
reported amount; float32 (the default) reloads bit-exactly.
"""
import json

import pytest
import torch
from helpers import forward as run
from helpers import inject_all, randomize_b, tiny_htdemucs
from safetensors import safe_open

from demucs_lora.config.check import check_config
from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LoraLayout
from demucs_lora.lora.adapt import inject_lora
from demucs_lora.lora.adapter_file import adapter_paths
from demucs_lora.models.guide_methods import load_lora_weights
from demucs_lora.lora.state import save_adapter
from demucs_lora.lora.targets import lora_target_names

TARGETS = ["encoder", "decoder", "transformer"]


def base(seed=0):
    return tiny_htdemucs(seed=seed, t_layers=2).eval()


def adapted(seed=0):
    return randomize_b(inject_all(base(seed), 8)).eval()


def test_default_float32_reloads_bit_exact(mix, tmp_path):
    model = adapted()
    tensors, header = save_adapter(model, tmp_path / "a")
    assert json.loads(header.read_text())["save_dtype"] == "float32"
    loaded = load_lora_weights(base(), tmp_path / "a").eval()
    mine, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(run(model, mix), run(loaded, mix))


@pytest.mark.parametrize("dtype,limit", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_half_precision_halves_the_file(dtype, limit, mix, tmp_path, capsys):
    model = adapted()
    full, _ = save_adapter(model, tmp_path / "f32")
    half, header = save_adapter(model, tmp_path / dtype, save_dtype=dtype)
    assert json.loads(header.read_text())["save_dtype"] == dtype
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.56, ratio
    loaded = load_lora_weights(base(), tmp_path / dtype).eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref, out, plain = run(model, mix), run(loaded, mix), run(base(), mix)
    error = ((out - ref).abs().max() / ref.abs().max()).item()
    effect = ((out - ref).abs().max() / (ref - plain).abs().max()).item()
    with capsys.disabled():
        print(f"\n{dtype} adapter: file {ratio:.3f}x of float32; output max abs error "
              f"{error:.2e} of the output peak, {effect:.2e} of the adapter's effect")
    assert 0 < error < limit and effect < 10 * limit


def test_trained_heads_stay_float32(tmp_path):
    model = base()
    heads = ["decoder.3.conv_tr", "tdecoder.3.conv_tr"]
    names = [n for n in lora_target_names(model, TARGETS) if n not in heads]
    inject_lora(model, LoraLayout({n: 4 for n in names}, train_extra=heads))
    tensors, _ = save_adapter(model, tmp_path / "a", save_dtype="bfloat16")
    with safe_open(str(tensors), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["decoder.3.conv_tr.weight"] == torch.float32
    assert {d for k, d in dtypes.items() if ".lora_" in k} == {torch.bfloat16}


def test_bad_dtype_and_overflow(tmp_path):
    model = adapted()
    with pytest.raises(ValueError, match="save_dtype"):
        save_adapter(model, tmp_path / "a", save_dtype="int8")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1e6)
    with pytest.raises(ValueError, match="float32"):
        save_adapter(model, tmp_path / "b", save_dtype="float16")
    assert not adapter_paths(tmp_path / "b")[0].exists()
    save_adapter(model, tmp_path / "b", save_dtype="bfloat16")  # bf16 has float32's range


def test_config_validates_lora_save_dtype():
    from demucs_lora.config.compose import compose
    cfg = compose(["model=htdemucs_tiny", "variant=debug"])
    assert cfg.htdemucs.lora_save_dtype == "float32"
    check_config(cfg)
    for value in ("float16", "bfloat16"):
        check_config(compose(["model=htdemucs_tiny", "htdemucs.lora_rank=4",
                                     f"htdemucs.lora_save_dtype={value}"]))
    with pytest.raises(ConfigError, match="lora_save_dtype.*bfloat16"):
        check_config(compose(["model=htdemucs_tiny", "htdemucs.lora_save_dtype=fp8"]))
    assert compose(["model=htdemucs"]).htdemucs.lora_save_dtype == "float32"
