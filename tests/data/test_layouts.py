"""Every dataset layout users hold, checked as a user runs it (`tools.verify_dataset`) and
read by the dataset builder: FLAC without mixtures, mixed formats, part folders, two
roots, hold-out, MUSDB18-HQ as downloaded; and each one's bad input as a one-line error."""
import importlib.util

import numpy as np
import pytest
import soundfile as sf
import torch

from demucs_lora.commands.verify_dataset import main
from demucs_lora.config.compose import compose
from demucs_lora.core.errors import DatasetError
from demucs_lora.data import roots, stems

SR = 8000
FOUR = ["drums", "bass", "other", "vocals"]
SUBTYPE = {"wav": "FLOAT", "flac": "PCM_24", "aiff": "FLOAT", "ogg": "VORBIS"}


def write_track(folder, spec, mixture="wav", seconds=0.5, seed=0, rates=None):
    """Write the files of `spec` ({name inside the track: extension}); the mixture is the
    sum of the decoded stems (so lossy formats still sum), none when `mixture` is None."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0.0
    for name, ext in spec.items():
        rate = (rates or {}).get(name, SR)
        path = folder / f"{name}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (rng.standard_normal((int(seconds * rate), 2)) * 0.05).astype(np.float32)
        sf.write(str(path), data, rate, subtype=SUBTYPE[ext])
        total = total + sf.read(str(path), dtype="float64", always_2d=True)[0]
    if mixture is not None:
        sf.write(str(folder / f"mixture.{mixture}"), total, SR, subtype=SUBTYPE[mixture])
    return folder


def flat(ext="wav"):
    return {s: ext for s in FOUR}


def dataset_tree(root, splits, spec, **kwargs):
    for split, count in splits.items():
        for i in range(count):
            write_track(root / split / f"track{i:03d}", spec, seed=i, **kwargs)
    return root


def datasets(tmp_path, *overrides):
    cfg = compose([f"dset.samplerate={SR}", f"dset.metadata={tmp_path / 'm'}",
                   "dset.segment=0.2", "dset.shift=0.1", *overrides])
    from demucs_lora.config.run_config import data_config
    return stems.get_datasets(data_config(cfg, list(cfg.dset.sources or FOUR)))


def rows(out):
    """{split: tracks} of the printed table."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("train", "valid", "test") and len(parts) == 5:
            table[parts[0]] = int(parts[1])
    return table


# ----------------------------------------------------------------------------- formats
def test_flac_without_mixtures(tmp_path, cli):
    root = dataset_tree(tmp_path / "ds", {"train": 2, "valid": 1}, flat("flac"), mixture=None)
    code, out = cli(root)
    assert code == 0, out
    assert "formats: flac 12 files" in out and "mixture = sum of the stems in 3 tracks" in out
    train, valid, _ = datasets(tmp_path, f"dset.wav={root}")
    item = valid[0]
    assert item.shape == (5, 2, SR // 2)
    assert torch.allclose(item[0], item[1:].sum(0), atol=1e-5)
    code, out = cli(root, "dset.mixture=file")           # a mixture is required: refused
    assert code == 1 and "missing file mixture.*" in out and "dset.mixture=auto" in out


def test_mixed_formats_and_two_files_for_one_stem(tmp_path, cli):
    spec = {"drums": "wav", "bass": "flac", "other": "ogg", "vocals": "aiff"}
    root = dataset_tree(tmp_path / "ds", {"train": 1, "valid": 1}, spec, mixture="flac")
    code, out = cli(root)
    assert code == 0, out
    assert "formats: aiff 2 files, flac 4 files, ogg 2 files, wav 2 files" in out
    _, valid, _ = datasets(tmp_path, f"dset.wav={root}")
    want = sf.read(str(root / "valid/track000/other.ogg"), dtype="float32")[0].T
    mean, std = valid.metadata["track000"]["mean"], valid.metadata["track000"]["std"]
    assert torch.allclose(valid[0][3], (torch.from_numpy(want) - mean / 4) / std, atol=1e-5)
    write_track(root / "train/track000", {"bass": "wav"}, mixture=None)
    code, out = cli(root)
    assert code == 1 and "bass.flac and bass.wav are two files for the stem bass" in out
    with pytest.raises(DatasetError, match="bass.flac and bass.wav are two files") as err:
        datasets(tmp_path, f"dset.wav={root}")
    assert "\n" not in str(err.value)


def test_unreadable_flac_is_one_error_naming_it(tmp_path, cli):
    root = dataset_tree(tmp_path / "ds", {"train": 1, "valid": 1}, flat("flac"))
    bad = root / "train/track000/vocals.flac"
    bad.write_bytes(b"fLaC" + b"\x00" * 200)
    code, out = cli(root)
    assert code == 1 and f"{bad}: cannot read vocals.flac" in out
    with pytest.raises(DatasetError, match=f"cannot read {bad}.*Fix: re-export") as err:
        datasets(tmp_path, f"dset.wav={root}")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- part folders
PARTS = {"drums/kick": "wav", "drums/snare": "flac", "drums/hihat": "wav", "bass": "wav",
         "other": "wav", "vocals": "wav"}


def test_part_folders_summed_and_parts_as_sources(tmp_path, cli):
    root = dataset_tree(tmp_path / "ds", {"train": 1, "valid": 1}, PARTS)
    code, out = cli(root)
    assert code == 0, out
    _, valid, _ = datasets(tmp_path, f"dset.wav={root}")
    folder = root / "valid/track000"
    parts = sum(sf.read(str(folder / f"drums/{p}"), dtype="float64")[0]
                for p in ("kick.wav", "snare.flac", "hihat.wav"))
    meta = valid.metadata["track000"]
    assert meta["files"]["drums"] == ["drums/hihat.wav", "drums/kick.wav", "drums/snare.flac"]
    drums = torch.from_numpy(parts.T).float()
    assert torch.allclose(valid[0][1], (drums - meta["mean"] / 4) / meta["std"], atol=1e-5)
    split = "dset.sources=[kick,snare,hihat,bass,other,vocals]"     # kick from drums/kick.wav
    code, out = cli(root, split)
    assert code == 0, out
    _, valid6, _ = datasets(tmp_path, f"dset.wav={root}", split)
    assert valid6[0].shape[0] == 7
    m, sd = meta["mean"], meta["std"]                # normalization: stem - mean / S
    assert torch.allclose(valid6[0][1:4].sum(0) + 3 * m / 6 / sd, valid[0][1] + m / 4 / sd,
                          atol=1e-5)


def test_stem_files_list_is_summed(tmp_path, cli):
    spec = {"kick": "wav", "snare": "wav", "toms": "flac", "bass": "wav", "other": "wav",
            "vocals": "wav"}
    root = dataset_tree(tmp_path / "ds", {"train": 1, "valid": 1}, spec)
    code, out = cli(root)
    assert code == 1 and "missing file drums.wav" in out
    code, out = cli(root, "dset.stem_files={drums:[kick,snare,toms]}")
    assert code == 0, out


def test_part_folder_with_mismatched_rates(tmp_path, cli):
    root = dataset_tree(tmp_path / "ds", {"train": 1, "valid": 1}, PARTS)
    write_track(root / "train/track000", {"drums/snare": "flac"}, mixture=None,
                rates={"drums/snare": 2 * SR})
    code, out = cli(root)
    snare = root / "train/track000/drums/snare.flac"
    assert code == 1 and f"{snare}: sample rate {2 * SR} Hz of drums/snare.flac differs" in out
    assert "tools.prepare_dataset" in out
    with pytest.raises(DatasetError, match=f"{snare}: samplerate {2 * SR} differs") as err:
        datasets(tmp_path, f"dset.wav={root}")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- roots, hold-out
def test_two_roots_with_duplicate_names(tmp_path, cli):
    a = dataset_tree(tmp_path / "mine", {"train": 1, "valid": 1}, flat("flac"), mixture=None)
    b = dataset_tree(tmp_path / "other", {"train": 2, "test": 1}, flat())
    code, out = cli(f"dset.wav=[{a},{b}]")
    assert code == 0, out
    assert rows(out) == {"train": 3, "valid": 1, "test": 1}
    train, valid, test = datasets(tmp_path, f"dset.wav=[{a},{b}]")
    assert list(train.metadata) == ["mine:track000", "other:track000", "other:track001"]
    assert list(valid.metadata) == ["mine:track000"] and len(test.metadata) == 1
    caches = sorted(p.name.split("_")[0] for p in (tmp_path / "m").glob("*.json"))
    assert caches == ["stems", "stems", "verify", "verify"]    # one cache file per root


def test_hold_out(tmp_path, cli):
    root = dataset_tree(tmp_path / "ds", {"train": 5}, flat())
    code, out = cli(root)
    assert code == 1 and "missing split folder valid/" in out and "dset.valid_tracks=N" in out
    code, out = cli(root, "dset.valid_tracks=2")
    assert code == 0, out
    assert rows(out)["train"] == 3 and rows(out)["valid"] == 2
    _, valid, _ = datasets(tmp_path, f"dset.wav={root}", "dset.valid_tracks=2")
    _, by_fraction, _ = datasets(tmp_path, f"dset.wav={root}", "dset.valid_tracks=0.4")
    held = list(valid.metadata)
    assert held == list(by_fraction.metadata) and len(held) == 2
    assert held == roots.held_out([f"track{i:03d}" for i in (4, 2, 0, 3, 1)], 2, "x")
    with pytest.raises(DatasetError, match="dset.valid_tracks=5: .* leaves none"):
        datasets(tmp_path, f"dset.wav={root}", "dset.valid_tracks=5")
    code, out = cli(root, "dset.valid_tracks=1.5")
    assert code == 2 and "dset.valid_tracks=1.5" in out


# ----------------------------------------------------------------------------- MUSDB18-HQ
def musdb_tree(root):
    official = roots.musdb_validation_tracks()
    assert len(official) == 14 and "Actions - One Minute Smile" in official
    for i, name in enumerate([official[0], "A Classic Education - NightOwl", official[3]]):
        write_track(root / "train" / name, flat(), seed=i)
    write_track(root / "test" / "Al James - Schoolboy Facination", flat(), seed=9)
    return root, official


def test_musdb18hq_as_downloaded(tmp_path, cli):
    root, official = musdb_tree(tmp_path / "musdb18hq")
    code, out = cli(f"dset.musdb={root}")
    assert code == 0, out
    assert rows(out) == {"train": 1, "valid": 2, "test": 1}
    train, valid, test = datasets(tmp_path, f"dset.musdb={root}")
    assert list(train.metadata) == ["A Classic Education - NightOwl"]
    assert set(valid.metadata) == {official[0], official[3]}
    mine = dataset_tree(tmp_path / "mine", {"train": 2}, flat("flac"), mixture=None)
    train, valid, _ = datasets(tmp_path, f"dset.wav={mine}", f"dset.musdb={root}")
    assert len(train.metadata) == 3 and len(valid.metadata) == 2


def test_musdb_errors(tmp_path, cli, monkeypatch):
    empty = tmp_path / "not_musdb"
    (empty / "test").mkdir(parents=True)
    code, out = cli(f"dset.musdb={empty}")
    assert code == 1 and f"dset.musdb={empty}: no train/ folder" in out
    assert "MUSDB18-HQ" in out and len(out.strip().splitlines()) == 1
    compressed = tmp_path / "musdb18"
    (compressed / "train").mkdir(parents=True)
    (compressed / "train" / "A - B.stem.mp4").write_bytes(b"\x00" * 16)
    code, out = cli(f"dset.musdb={compressed}")
    assert code == 1 and "compressed MUSDB18" in out and "musdbconvert" in out
    root, _ = musdb_tree(tmp_path / "musdb18hq")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "musdb" else real(name, *a))
    code, out = cli(f"dset.musdb={root}")
    assert code == 1 and "pip install musdb" in out


# ----------------------------------------------------------------------------- signature
def test_signature_follows_the_data_not_the_cache():
    from demucs_lora.train import main
    base = main.get_xp(["dset.wav=/data/a"]).sig
    changed = [["dset.wav=[/data/a,/data/b]"], ["dset.wav=/data/a", "dset.musdb=/data/m"],
               ["dset.wav=/data/a", "dset.valid_tracks=2"],
               ["dset.wav=/data/a", "dset.mixture=sum"],
               ["dset.wav=/data/a", "optim.accumulate=4"]]
    sigs = {main.get_xp(argv).sig for argv in changed}
    assert len(sigs) == len(changed) and base not in sigs
    assert main.get_xp(["dset.wav=/data/a", "dset.metadata=/tmp/elsewhere"]).sig == base
