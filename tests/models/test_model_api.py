"""The guide's Python API on models (model.load_lora_weights / get_lora_state / quantize /
lora_config), which still serialize as a plain HTDemucs; optimize_scales; the messages for
a .pth adapter, a rank-swap mismatch and an int8 file read by the stock CLI."""
import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from demucs.htdemucs import HTDemucs
from demucs.states import load_model as stock_load_model
from demucs.states import serialize_model
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import adapted_copy, tiny_htdemucs, write_mix

from demucs_lora.core.errors import ConfigError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_api")
    from demucs_lora import save_adapter
    base = tiny_htdemucs().eval()
    torch.save(serialize_model(base, OmegaConf.create({}), half=False), root / "base.th")
    save_adapter(adapted_copy(base, 3), root / "adapter")
    save_adapter(adapted_copy(base, 4, rank=3), root / "rank3")
    return root


def test_models_offer_the_guide_methods(files):
    from demucs_lora import get_model
    from demucs_lora.lora.inject import has_lora
    model = get_model(files / "base.th")
    assert type(model) is HTDemucs and model.lora_config is None
    assert model.get_lora_state() == {}
    same = model.load_lora_weights(files / "adapter")
    assert same is model and has_lora(model)
    assert model.lora_config["ranks"] and model.lora_config["alpha"] == 16.0
    assert model.config is model.lora_config        # the guide's spelling (an alias)
    state = model.get_lora_state()
    on_disk = load_file(files / "adapter.safetensors")
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
    package = model.quantize(bits=8, optimize_scales=True)
    assert package["quantized"]["scale_method"] == "mse" and has_lora(model)  # left as is
    assert "save this package" in package["quantized"]["note"]
    assert "returned package\n    is what must be saved" in model.quantize.__doc__
    with pytest.raises(ConfigError, match="inplace=...\\) is not offered.*torch.save"):
        model.quantize(bits=8, inplace=True)
    torch.save(package, files / "q8.th")
    quantized = get_model(files / "q8.th")
    x = torch.randn(1, 2, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()(x), quantized(x)
    assert ((got - want).norm() / want.norm()) < 0.02
    assert callable(quantized.quantize)


def test_methods_do_not_change_what_is_serialized(files):
    from demucs_lora import get_model, remove_lora
    model = get_model(files / "base.th", adapter=files / "adapter")
    copied = copy.deepcopy(model)
    assert copied.get_lora_state.model is copied  # bound to the copy
    assert copied.lora_config == model.lora_config and copied.lora_config is not model.lora_config
    plain = remove_lora(copy.deepcopy(model))
    assert plain.lora_config is None and plain.config is None
    package = serialize_model(plain, OmegaConf.create({}), half=False)
    assert package["klass"] is HTDemucs
    stock = stock_load_model(package)  # the stock loader builds a plain HTDemucs
    assert type(stock) is HTDemucs and not hasattr(stock, "quantize")
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole-model pickle keeps working, methods included
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.get_lora_state.model is back and back.get_lora_state().keys() == \
        model.get_lora_state().keys()


def test_a_pth_path_is_told_what_an_adapter_is(files):
    from demucs_lora import get_model, load_lora_weights
    from demucs_lora.core.errors import AdapterMismatch
    model = get_model(files / "base.th")
    for call in (lambda: model.load_lora_weights("weights/lora_last.pth"),
                 lambda: load_lora_weights(model, "lora.th"),
                 lambda: get_model(files / "base.th", adapter="x/lora.ckpt")):
        with pytest.raises(AdapterMismatch, match=r"not an adapter: an adapter is a pair "
                                                  r"NAME\.safetensors \+ NAME\.json"):
            call()


def test_rank_swap_mismatch_names_the_layers_and_ranks(files):
    from demucs_lora import get_model, load_lora_weights
    from demucs_lora.core.errors import AdapterMismatch
    from demucs_lora.lora.state import check_same_layout
    from demucs_lora.lora.adapter_file import read_adapter
    model = get_model(files / "base.th", adapter=files / "adapter")
    header, _ = read_adapter(files / "rank3")
    with pytest.raises(AdapterMismatch) as exc:
        check_same_layout(model.lora_config, header, files / "rank3")
    text = str(exc.value)
    assert "(model: [], adapter: [])" not in text
    assert "ranks of 70 layer(s) [crosstransformer.layers.0.linear1: model 2, adapter 3;" in text
    fresh = load_lora_weights(get_model(files / "base.th"), files / "rank3")  # the fix works
    assert set(fresh.lora_config["ranks"].values()) == {3}


def test_optimize_scales_never_reconstructs_worse_than_max_abs():
    """Per channel never worse (max-abs is a candidate); clearly better where clipping pays
    (4 bits on Gaussian weights: -41%); at 8 bits max-abs is near optimal (-2%)."""
    from demucs_lora.model_files.int8 import quantize_tensor
    weight = torch.randn(16, 64, 16, generator=torch.Generator().manual_seed(0))
    for bits, gain in ((4, 0.7), (8, 1.0)):
        errors = {}
        for opt in (False, True):
            q, scale = quantize_tensor(weight, axis=0, bits=bits, optimize_scales=opt)
            errors[opt] = (weight - q.float() * scale).square().sum(dim=(1, 2))
        assert (errors[True] <= errors[False] * (1 + 1e-6)).all()
        assert errors[True].sum() < gain * errors[False].sum()


@pytest.mark.slow  # the stock demucs CLI in a subprocess
def test_stock_cli_reading_an_int8_file_says_how_to_load_it(tmp_path):
    from demucs_lora.core.files import atomic_torch_save
    from demucs_lora.model_files.int8 import quantize
    repo = tmp_path / "release"
    atomic_torch_save(quantize(tiny_htdemucs().eval()), repo / "small.th")
    with pytest.raises(RuntimeError, match="int8 file: load it with demucs_lora.get_model"):
        stock_load_model(torch.load(repo / "small.th", weights_only=False))
    write_mix(tmp_path / "song.wav", seconds=0.2)
    proc = subprocess.run([sys.executable, "-m", "demucs", "--repo", str(repo), "-n", "small",
                           str(tmp_path / "song.wav"), "-o", str(tmp_path / "sep")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode != 0
    assert "int8 file: load it with demucs_lora.get_model" in proc.stderr
    assert "state_dict" not in proc.stderr and "Traceback" not in proc.stderr
    assert "Dropping inexistant parameter" not in proc.stderr
