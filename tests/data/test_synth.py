"""Synthetic multi-stem generator: determinism, exact sums, layouts, domains, caching."""
import time

import numpy as np
import pytest
import soundfile as sf

from demucs_lora.data import synth
from demucs_lora.core.errors import ConfigError

SR = 8000


def _read(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.T, sr


def _track(seed=0, domain="A", stems=4, seconds=3, sr=SR, index=0):
    return synth.synth_track(synth._track_rng(seed, domain, "train", index), seconds, sr,
                             domain, stems)


def test_deterministic_per_seed(tmp_path):
    kw = dict(tracks=2, seconds=2, domain="A", stems=4, samplerate=SR,
              splits={"train": 2, "valid": 1})
    a = synth.generate_dataset(tmp_path / "a", seed=3, **kw)
    b = synth.generate_dataset(tmp_path / "b", seed=3, **kw)
    c = synth.generate_dataset(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.wav"))
    assert len(files) == 3 * 5
    for rel in files:          # equal up to float rounding (numpy sums depend on alignment)
        assert np.abs(_read(a / rel)[0] - _read(b / rel)[0]).max() < 1e-6, rel
    mix_a, _ = _read(a / "train/track000/mixture.wav")
    mix_c, _ = _read(c / "train/track000/mixture.wav")
    assert not np.allclose(mix_a, mix_c)
    # a track does not depend on how many tracks the other splits have
    d = synth.generate_dataset(tmp_path / "d", seed=3, tracks=1, seconds=2, samplerate=SR,
                               splits={"train": 1})
    alone, _ = _read(d / "train/track000/vocals.wav")
    assert np.abs(alone - _read(a / "train/track000/vocals.wav")[0]).max() < 1e-6


@pytest.mark.parametrize("stems", [4, 5, 6])
def test_stems_sum_to_mixture(tmp_path, stems):
    root = synth.generate_dataset(tmp_path, tracks=2, seconds=2, seed=0, domain="B",
                                  stems=stems, samplerate=SR, splits={"train": 2})
    for folder in sorted((root / "train").iterdir()):
        mix, sr = _read(folder / "mixture.wav")
        assert sr == SR and mix.shape == (2, 2 * SR) and mix.dtype == np.float32
        assert sf.info(str(folder / "mixture.wav")).subtype == "FLOAT"
        stems_ = [_read(folder / f"{s}.wav")[0] for s in synth.LAYOUTS[stems]]
        total = np.sum([s.astype(np.float64) for s in stems_], axis=0)
        assert np.abs(mix - total).max() < 1e-6
        assert np.abs(mix).max() < 1.0
        assert all(np.abs(s).max() < 1.0 and np.abs(s).max() > 1e-3 for s in stems_)


def test_five_stem_layout_puts_snare_in_other(tmp_path):
    root = synth.generate_dataset(tmp_path, tracks=1, seconds=2, seed=1, stems=5,
                                  samplerate=SR, splits={"train": 1})
    names = sorted(p.stem for p in (root / "train/track000").glob("*.wav"))
    assert names == sorted(["mixture", "other", "kick", "vocals", "bass", "hihat"])
    assert synth.LAYOUTS[5] == ["other", "kick", "vocals", "bass", "hihat"]
    # Same seed, same music: drums(4) = kick + hihat + snare, the snare being other(5) - other(4)
    four, five = _track(seed=1, stems=4), _track(seed=1, stems=5)
    m4, m5 = four["mixture"].astype(np.float64), five["mixture"].astype(np.float64)
    ratio = np.vdot(m5, m4) / np.vdot(m4, m4)              # the common gains may differ
    snare = five["other"] - four["other"] * ratio
    assert np.abs(snare).max() > 1e-3
    rebuilt = five["kick"] + five["hihat"] + snare
    assert np.abs(four["drums"] * ratio - rebuilt).max() < 1e-5


def _centroid(x, sr):
    spec = np.abs(np.fft.rfft(x.mean(0)))
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / sr)
    return float((spec * freqs).sum() / spec.sum())


def test_domains_differ():
    sr = 22050
    cents = {d: [_centroid(_track(seed=s, domain=d, sr=sr, seconds=3)["mixture"], sr)
                 for s in range(3)] for d in "AB"}
    print("spectral centroid A", np.round(cents["A"]), "B", np.round(cents["B"]))
    assert min(cents["B"]) > 1.2 * max(cents["A"])
    # balance differs too: the vocals are a larger share of the mixture in A
    share = {d: np.mean([np.sum(t["vocals"] ** 2) / np.sum(t["mixture"] ** 2) for t in
                         (_track(seed=s, domain=d, sr=sr) for s in range(3))]) for d in "AB"}
    assert share["A"] > 1.5 * share["B"]


def test_speed():
    """Generated on first use, so it must not cost more than the audio lasts (measured ~5x
    faster than real time on a loaded 2-core box)."""
    begin = time.perf_counter()
    track = _track(seconds=5, sr=44100)
    elapsed = time.perf_counter() - begin
    print(f"synth: 5 s of 44.1 kHz stereo 4-stem audio in {elapsed:.2f} s "
          f"({5 / elapsed:.0f}x real time)")
    assert elapsed < 5
    assert len(track) == 5 and all(v.shape == (2, 5 * 44100) for v in track.values())


def test_cli_single_split(tmp_path, capsys):
    synth.main([str(tmp_path / "ds"), "--tracks", "2", "--seconds", "1", "--seed", "5",
                "--domain", "B", "--stems", "5", "--samplerate", str(SR), "--split", "train"])
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["synth.json", "train"]
    assert len(list((tmp_path / "ds/train").iterdir())) == 2
    assert "wrote 2 tracks" in capsys.readouterr().out


def _cfg(tmp_path, **synth_kw):
    block = dict(tracks=2, valid_tracks=1, test_tracks=1, seconds=1, domain="A", seed=0,
                 stems=4)
    block.update(synth_kw)
    return {"synth": block, "samplerate": SR, "channels": 2, "metadata": str(tmp_path / "m")}


def test_ensure_synth_cached_and_atomic(tmp_path):
    cfg = _cfg(tmp_path)
    root = synth.ensure_synth(cfg, ["drums", "bass", "other", "vocals"], progress=False)
    assert root.parent == tmp_path / "m" / "synth"
    assert sorted(p.name for p in root.iterdir()) == ["synth.json", "test", "train", "valid"]
    stamp = (root / "train/track000/mixture.wav").stat().st_mtime_ns
    again = synth.ensure_synth(cfg, ["drums", "rest"], residual_source="rest", progress=False)
    assert again == root
    assert (root / "train/track000/mixture.wav").stat().st_mtime_ns == stamp
    other = synth.ensure_synth({**cfg, "channels": 1}, ["vocals"], progress=False)
    assert other != root and sf.info(str(other / "valid/track000/bass.wav")).channels == 1
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp")]


def test_ensure_synth_rejects_unknown_sources(tmp_path):
    with pytest.raises(ConfigError, match="kick"):
        synth.ensure_synth(_cfg(tmp_path), ["drums", "kick"], progress=False)
    with pytest.raises(ConfigError, match="domain"):
        synth.ensure_synth(_cfg(tmp_path, domain="C"), ["drums"], progress=False)


def test_six_stem_layout_keeps_the_four_stem_music():
    """htdemucs_6s' layout: guitar and piano join; the 4 other parts are the same music."""
    assert synth.LAYOUTS[6] == ["drums", "bass", "other", "vocals", "guitar", "piano"]
    four, six = _track(seed=2, stems=4), _track(seed=2, stems=6)
    for name in ("drums", "bass", "vocals"):
        a, b = four[name].astype(np.float64), six[name].astype(np.float64)
        ratio = np.vdot(b, a) / np.vdot(a, a)
        assert np.abs(b - a * ratio).max() < 1e-4 * np.abs(b).max(), name


def test_layout_follows_the_sources(tmp_path):
    assert synth.choose_layout(None, ["drums", "bass", "other", "vocals"]) == 4
    assert synth.choose_layout(None, ["other", "kick", "vocal", "bass", "hihat"]) == 5
    assert synth.choose_layout(None, ["drums", "guitar", "piano"]) == 6
    assert synth.choose_layout(5, ["drums"]) == 5
    root = synth.ensure_synth(_cfg(tmp_path, stems=None), ["drums", "piano"], progress=False)
    assert (root / "valid/track000/piano.wav").is_file()
    with pytest.raises(ConfigError, match=r"the synthetic files have \[.*\]; set dset.sources"):
        synth.ensure_synth(_cfg(tmp_path, stems=None), ["drums", "cowbell"], progress=False)
