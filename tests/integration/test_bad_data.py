"""`dora run dset.wav=BAD`: each malformed dataset stops the run with its message, a non-zero
exit, and no checkpoint (the checks run before any model is built)."""
import shutil

import numpy as np
import pytest
import soundfile as sf

from demucs_lora.data import synth

from .dora_helpers import QUICK, dora

SR = 16000
TRACK = "train/track000"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpl") / "ds"
    return synth.generate_dataset(root, seconds=2, seed=1, samplerate=SR,
                                  splits={"train": 2, "valid": 1, "test": 1})


def _rewrite(path, fn, sr=SR):
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    data, rate = fn(data), sr
    sf.write(str(path), data, rate, subtype="FLOAT")


def _nan(data):
    data[100:110] = np.nan
    return data


CASES = {
    "missing_stem": (lambda t: (t / "bass.wav").unlink(), "bass.wav"),
    "samplerate": (lambda t: _rewrite(t / "bass.wav", lambda d: d, sr=22050), "bass.wav"),
    "channels": (lambda t: _rewrite(t / "bass.wav", lambda d: d[:, :1]), "bass.wav"),
    "length": (lambda t: _rewrite(t / "bass.wav", lambda d: d[: len(d) // 2]), "bass.wav"),
    "empty": (lambda t: (t / "vocals.wav").write_bytes(b""), "vocals.wav"),
    "corrupt": (lambda t: (t / "vocals.wav").write_bytes(b"RIFF garbage" * 50), "vocals.wav"),
    "nan": (lambda t: _rewrite(t / "drums.wav", _nan), "drums.wav"),
    "no_sum": (lambda t: _rewrite(t / "other.wav", lambda d: d * 3), "mixture"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_dataset_stops_before_training(case, template, tmp_path):
    data = shutil.copytree(template, tmp_path / "ds")
    break_it, culprit = CASES[case]
    break_it(data / TRACK)
    proc = dora(tmp_path, "run", *QUICK, f"dset.wav={data}", f"dset.samplerate={SR}",
                check=False, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-2000:]
    assert "DatasetError" in text and culprit in text, text[-3000:]
    assert "track000" in text
    assert not list(tmp_path.glob("outputs/xps/*/checkpoint.th"))
    assert not list(tmp_path.glob("outputs/xps/*/best.th"))
