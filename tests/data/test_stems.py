"""Stem-folder dataset: metadata cache, segments, residual source, resampling, augment."""
import os

import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from demucs_lora.data import stems, synth
from demucs_lora.core.errors import ConfigError, DatasetError

SR = 8000
SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture
def dataset(synth_folder, tmp_path):
    return synth_folder(tmp_path / "ds", seconds=3, seed=0, samplerate=SR,
                        splits={"train": 2, "valid": 1, "test": 1})


def test_metadata_and_shapes(dataset, tmp_path):
    meta = stems.build_metadata(dataset, SOURCES, tmp_path / "cache")
    assert sorted(meta) == ["test", "train", "valid"]
    assert sorted(meta["train"]) == ["track000", "track001"]
    info = meta["train"]["track000"]
    assert (info["length"], info["samplerate"], info["channels"]) == (3 * SR, SR, 2)
    mix, _ = sf.read(str(dataset / "train/track000/mixture.wav"))
    assert info["mean"] == pytest.approx(mix.mean(1).mean(), abs=1e-9)
    assert info["std"] == pytest.approx(mix.mean(1).std(ddof=1), rel=1e-6)
    train = stems.StemDataset(dataset, "train", SOURCES, meta, segment=1.0, shift=0.5,
                              samplerate=SR, channels=2)
    assert len(train) == 2 * 5                       # ceil((3 - 1) / 0.5) + 1 per track
    item = train[3]
    assert item.shape == (5, 2, SR) and item.dtype == torch.float32
    assert torch.allclose(item[0], item[1:].sum(0), atol=1e-5)   # normalized, still a sum
    valid = stems.StemDataset(dataset, "valid", SOURCES, meta, samplerate=SR, channels=2)
    assert len(valid) == 1 and valid[0].shape == (5, 2, 3 * SR)
    with pytest.raises(IndexError):
        train[len(train)]


def test_residual_source(dataset, tmp_path):
    meta = stems.build_metadata(dataset, ["drums", "rest"], tmp_path / "c", residual_source="rest")
    two = stems.StemDataset(dataset, "valid", ["drums", "rest"], meta, samplerate=SR,
                            channels=2, normalize=False, residual_source="rest")
    full_meta = stems.build_metadata(dataset, SOURCES, tmp_path / "c")
    four = stems.StemDataset(dataset, "valid", SOURCES, full_meta, samplerate=SR, channels=2,
                             normalize=False)
    a, b = two[0], four[0]
    assert a.shape == (3, 2, 3 * SR)
    assert torch.allclose(a[2], a[0] - a[1])
    assert torch.allclose(a[2], b[2:].sum(0), atol=1e-6)       # bass + other + vocals
    with pytest.raises(ConfigError):
        stems.StemDataset(dataset, "valid", ["drums"], meta, residual_source="rest")


def test_resampling_and_channels(dataset, tmp_path):
    meta = stems.build_metadata(dataset, SOURCES, tmp_path / "c")
    up = stems.StemDataset(dataset, "train", SOURCES, meta, segment=1.0, shift=1.0,
                           samplerate=2 * SR, channels=1)
    assert len(up) == 2 * 3 and up[0].shape == (5, 1, 2 * SR)
    whole = stems.StemDataset(dataset, "test", SOURCES, meta, samplerate=2 * SR, channels=2)
    assert whole[0].shape == (5, 2, 6 * SR)
    mono = synth.generate_dataset(tmp_path / "mono", seconds=1, samplerate=SR, channels=1,
                                  splits={"train": 1})
    mono_meta = stems.build_metadata(mono, SOURCES, tmp_path / "c")
    item = stems.StemDataset(mono, "train", SOURCES, mono_meta, samplerate=SR, channels=2)[0]
    assert item.shape == (5, 2, SR) and torch.equal(item[:, 0], item[:, 1])


def test_metadata_cache_reuse_and_rescan(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = stems.build_metadata(dataset, SOURCES, cache)
    assert (first.scanned, first.reused) == (4, 0)
    assert len(list(cache.glob("stems_*.json"))) == 1
    second = stems.build_metadata(dataset, SOURCES, cache)
    assert (second.scanned, second.reused) == (0, 4) and second == first
    mix = dataset / "valid/track000/mixture.wav"
    data, sr = sf.read(str(mix))
    sf.write(str(mix), data * 0.5, sr, subtype="FLOAT")         # same size, new content
    st = os.stat(mix)
    os.utime(mix, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = stems.build_metadata(dataset, SOURCES, cache)
    assert (third.scanned, third.reused) == (1, 3)
    assert third["valid"]["track000"]["std"] == pytest.approx(
        first["valid"]["track000"]["std"] / 2, rel=1e-5)
    # other sources -> other files needed -> rescan
    assert stems.build_metadata(dataset, ["drums", "bass"], cache).scanned == 4


def test_missing_stem_is_a_dataset_error(dataset, tmp_path):
    (dataset / "train/track001/bass.wav").unlink()
    with pytest.raises(DatasetError, match="track001/bass.wav"):
        stems.build_metadata(dataset, SOURCES, tmp_path / "c")


def test_augmentation_keeps_mixture_the_sum(dataset, tmp_path):
    torch.manual_seed(0)
    meta = stems.build_metadata(dataset, SOURCES, tmp_path / "c")
    train = stems.StemDataset(dataset, "train", SOURCES, meta, segment=1.5, shift=0.5,
                              samplerate=SR, channels=2)
    batch = torch.stack([train[i] for i in range(4)])
    before = batch.clone()
    cfg = OmegaConf.create({"shift_same": False, "flip": True, "scale": [0.25, 1.25],
                            "remix": True})
    aug = stems.build_augment(cfg, SR, segment=1.0)
    names = [type(m).__name__ for m in aug]
    assert names == ["SegmentShift", "FlipChannels", "FlipSign", "Scale", "Remix"]
    out = stems.augment_batch(aug, batch)
    assert out.shape == (4, 5, 2, SR)
    assert torch.allclose(out[:, 0], out[:, 1:].sum(1), atol=1e-6)
    assert not torch.allclose(out[:, 1:], batch[:, 1:, :, :SR])
    assert torch.equal(batch, before)                       # the input is left alone
    aug.eval()
    assert torch.equal(stems.augment_batch(aug, batch)[:, 1:], batch[:, 1:, :, :SR])
    plain = stems.build_augment({"flip": False, "scale": None, "remix": False}, SR, 1.0)
    assert len(plain) == 1


def _compose(*overrides):
    from demucs_lora.config.compose import compose
    return compose(list(overrides))


def _data(cfg, sources=None):
    from demucs_lora.config.run_config import data_config
    return data_config(cfg, sources)


def test_get_datasets_synthetic_and_wav(dataset, tmp_path):
    meta = f"dset.metadata={tmp_path / 'meta'}"
    cfg = _compose("variant=debug", f"dset.samplerate={SR}", meta)
    assert cfg.dset.sources is None            # null: the base's, 4 stems for a new model
    train, valid, test = stems.get_datasets(_data(cfg, SOURCES))
    # debug: 2 x 3 s train tracks, segment 1 + shift 1 read per example, hop 1 s
    assert len(train) == 2 * 2 and train[0].shape == (5, 2, 2 * SR)
    assert len(valid) == 1 and valid[0].shape == (5, 2, 3 * SR)
    assert len(test) == 1
    assert (tmp_path / "meta" / "synth").is_dir()
    cfg = _compose("dset=wav", f"dset.wav={dataset}", f"dset.samplerate={SR}", meta,
                   "dset.segment=1.0", "dset.shift=0.5", "sources=[drums,rest]",
                   "residual_source=rest")
    train, valid, _ = stems.get_datasets(_data(cfg))
    assert len(train) == 2 * 4 and train[0].shape == (3, 2, int(1.5 * SR))  # (3-1.5)/.5+1
    with pytest.raises(ConfigError, match="dset.wav"):
        stems.get_datasets(_data(_compose("dset=wav", meta), SOURCES))
