import datetime
import logging
import os
import pickle
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from demucs.htdemucs import HTDemucs
from demucs.pretrained import get_model
from demucs.states import serialize_model
from omegaconf import OmegaConf
from helpers import tiny_htdemucs

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.model_files.packages import load_model_file
from demucs_lora.model_files.safe_load import SAFE_GLOBALS, load_package

SOURCES = ["drums", "bass", "other", "vocals"]


def tiny_model(segment=1, seed=0):
    return tiny_htdemucs(SOURCES, seed, segment=segment).eval()


def save_package(model, path, half=False, **overrides):
    package = serialize_model(model, training_args=OmegaConf.create({}), half=half)
    package.update(overrides)
    torch.save(package, path)
    return path


def outputs(model, seed=1):
    x = torch.randn(1, 2, 8000, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def same_state(a, b):
    """Equal states mean equal outputs; cheaper than a forward on a busy 2-core box."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Evil:
    """Pickles to a call of os.system: what a hostile model file can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_roundtrip_gives_same_outputs(tmp_path):
    model = tiny_model()
    path = save_package(model, tmp_path / "tiny.th")
    loaded = load_model_file(path)
    assert type(loaded) is HTDemucs and loaded.sources == SOURCES
    assert torch.equal(outputs(loaded), outputs(model))


def test_float16_package_with_fraction_segment_loads(tmp_path):
    model = tiny_model(segment=Fraction(1, 1))
    path = save_package(model, tmp_path / "half.th", half=True)
    package = load_package(path)
    assert isinstance(package["kwargs"]["segment"], Fraction)
    assert all(v.dtype == torch.float16 for v in package["state"].values() if v.is_floating_point())
    loaded = load_model_file(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref, out = outputs(model), outputs(loaded)
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3


def test_malicious_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = save_package(tiny_model(), tmp_path / "evil.th", training_args={"x": Evil(marker)})
    for loader in (load_package, load_model_file):
        with pytest.raises(ModelLoadError) as info:
            loader(path)
        msg = str(info.value)
        assert str(path) in msg and "posix.system" in msg and "trust_remote_code=true" in msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about protocol 4
def test_malicious_plain_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.th"
    path.write_bytes(pickle.dumps({"klass": HTDemucs, "x": Evil(marker)}))
    with pytest.raises(ModelLoadError, match="trust_remote_code=true"):
        load_model_file(path)
    assert not marker.exists()


def test_untrusted_global_loads_only_with_trust_remote_code(tmp_path, caplog):
    model = tiny_model()
    path = save_package(model, tmp_path / "dated.th", training_args={"when": datetime.date(2024, 1, 2)})
    with pytest.raises(ModelLoadError, match="datetime.date"):
        load_model_file(path)
    with caplog.at_level(logging.WARNING, logger="demucs_lora.model_files.safe_load"):
        loaded = load_model_file(path, trust_remote_code=True)
    assert "trust_remote_code" in caplog.text
    assert same_state(loaded, model)


def test_extra_globals_widen_the_allowlist(tmp_path):
    path = save_package(tiny_model(), tmp_path / "dated.th", training_args={"when": datetime.date(2024, 1, 2)})
    package = load_package(path, extra_globals=[datetime.date])
    assert package["training_args"]["when"] == datetime.date(2024, 1, 2)
    assert datetime.date not in SAFE_GLOBALS


def test_unknown_kwargs_are_an_error_unless_not_strict(tmp_path, caplog):
    model = tiny_model()
    package = serialize_model(model, training_args=OmegaConf.create({}), half=False)
    package["kwargs"] = {**package["kwargs"], "bogus_option": 3}
    torch.save(package, tmp_path / "kw.th")
    with pytest.raises(ModelLoadError, match="bogus_option"):
        load_model_file(tmp_path / "kw.th")
    with caplog.at_level(logging.WARNING, logger="demucs_lora.model_files.safe_load"):
        loaded = load_model_file(tmp_path / "kw.th", strict=False)
    assert "bogus_option" in caplog.text
    assert same_state(loaded, model)


def test_state_mismatch_is_an_error(tmp_path):
    model = tiny_model()
    package = serialize_model(model, training_args=OmegaConf.create({}), half=False)
    del package["state"]["encoder.0.conv.weight"]
    torch.save(package, tmp_path / "missing.th")
    with pytest.raises(ModelLoadError, match="encoder.0.conv.weight"):
        load_model_file(tmp_path / "missing.th")


def test_missing_file_and_non_package_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_file(tmp_path / "nope.th")
    torch.save(tiny_model().state_dict(), tmp_path / "bare.th")
    with pytest.raises(ModelLoadError, match="not a demucs model package"):
        load_model_file(tmp_path / "bare.th")
    (tmp_path / "junk.th").write_bytes(b"not a torch file at all")
    with pytest.raises(ModelLoadError, match="junk.th"):
        load_model_file(tmp_path / "junk.th")


def test_stock_get_model_loads_our_file_by_stem(tmp_path):
    # The stock CLI (`demucs -n NAME --repo DIR`) finds DIR/NAME.th; a '-' in the stem
    # would be read as NAME-CHECKSUM.
    model = tiny_model()
    save_package(model, tmp_path / "tinyht.th")
    stock = get_model("tinyht", repo=Path(tmp_path))
    assert type(stock) is HTDemucs and not stock.training
    assert same_state(stock, model) and same_state(stock, load_model_file(tmp_path / "tinyht.th"))
