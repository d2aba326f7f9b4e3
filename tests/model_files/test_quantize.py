import pytest
import torch
from demucs.states import load_model as stock_load_model
from demucs.states import serialize_model
from omegaconf import OmegaConf
from helpers import tiny_htdemucs

from demucs_lora.core.errors import ConfigError
from demucs_lora.core.files import atomic_torch_save
from demucs_lora.model_files.int8 import SCALE_SUFFIX, dequantize_state, quantize
from demucs_lora.model_files.packages import load_model_file
from demucs_lora.model_files.safe_load import load_package

SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture(scope="module")
def model():
    return tiny_htdemucs(SOURCES).eval()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    float_path = folder / "float.th"
    torch.save(serialize_model(model, training_args=OmegaConf.create({}), half=False), float_path)
    return float_path, atomic_torch_save(quantize(model), folder / "q8.th")


def outputs(model):
    x = torch.randn(1, 2, 8000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def test_file_is_about_a_quarter_of_float32(files):
    float_path, q_path = files
    ratio = q_path.stat().st_size / float_path.stat().st_size
    assert ratio < 0.35, ratio
    assert [p.name for p in q_path.parent.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_reloaded_model_output_is_close(model, files):
    _, q_path = files
    loaded = load_model_file(q_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref = outputs(model)
    rel = ((outputs(loaded) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel          # measured 0.16%
    via_loader = load_model_file(q_path).state_dict()
    assert all(torch.equal(v, via_loader[k]) for k, v in loaded.state_dict().items())


def test_package_is_plain_tensors_with_per_channel_scales(model, files):
    package = load_package(files[1])  # weights_only=True with the demucs allowlist
    assert package["quantized"]["bits"] == 8
    assert package["quantized"]["scheme"] == "per_channel_symmetric"
    state = package["state"]
    conv = model.encoder[0].conv.weight                       # Conv2d: (out, in, kh, kw)
    assert state["encoder.0.conv.weight"].dtype == torch.int8
    assert state["encoder.0.conv.weight" + SCALE_SUFFIX].shape == (conv.shape[0], 1, 1, 1)
    conv_tr = model.decoder[-1].conv_tr.weight                # ConvTranspose2d: (in, out, kh, kw)
    name = f"decoder.{len(model.decoder) - 1}.conv_tr.weight"
    assert state[name + SCALE_SUFFIX].shape == (1, conv_tr.shape[1], 1, 1)
    in_proj = "crosstransformer.layers.0.self_attn.in_proj_weight"
    assert state[in_proj + SCALE_SUFFIX].shape == (state[in_proj].shape[0], 1)
    for key in ("encoder.0.conv.bias",                    # bias
                "encoder.0.dconv.layers.0.1.weight",      # GroupNorm
                "encoder.0.dconv.layers.0.6.scale"):      # LayerScale
        assert state[key].dtype == torch.float32 and key + SCALE_SUFFIX not in state
    assert all(v.dtype in (torch.int8, torch.float32) or not v.is_floating_point()
               for v in state.values())


def test_dequantization_error_is_within_half_a_step(model):
    package = quantize(model)
    deq = dequantize_state(package["state"])
    assert set(deq) == set(model.state_dict())
    for name, value in model.state_dict().items():
        scale = package["state"].get(name + SCALE_SUFFIX)
        if scale is None:
            assert torch.equal(deq[name], value)
        else:
            assert ((deq[name] - value).abs() <= scale / 2 + 1e-7).all(), name


def test_stock_demucs_loader_rejects_quantized_package(model):
    with pytest.raises(RuntimeError, match="int8 file: load it with demucs_lora.get_model"):
        stock_load_model(quantize(model))


def test_bad_bits_and_unmerged_models_are_refused(model):
    with pytest.raises(ConfigError, match="bits"):
        quantize(model, bits=16)
    wrapped = tiny_htdemucs(SOURCES)
    wrapped.encoder[0].conv.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 2)))
    with pytest.raises(ConfigError, match="lora_A"):
        quantize(wrapped)
