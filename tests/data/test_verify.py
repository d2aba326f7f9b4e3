"""verify_dataset / `python -m tools.verify_dataset`: one test per malformed case."""
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from demucs_lora.commands.verify_dataset import main
from demucs_lora.data.verify import verify_dataset

SR = 8000
SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture
def ds(synth_folder, tmp_path):
    return synth_folder(tmp_path / "ds", seconds=2, seed=1, samplerate=SR,
                        splits={"train": 2, "valid": 1, "test": 1})


def _read(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data, sr


def _write(path, data, sr=SR):
    sf.write(str(path), data, sr, subtype="FLOAT")


def _set_stem(track, name, data):
    """Replace a stem and rewrite the mixture as the new sum (only `name` is at fault)."""
    _write(track / f"{name}.wav", data)
    total = sum(_read(track / f"{s}.wav")[0].astype(np.float64) for s in SOURCES)
    _write(track / "mixture.wav", total.astype(np.float32))


def test_clean_dataset_exits_0_and_second_run_reuses(ds, cli):
    code, out = cli(ds)
    assert code == 0, out
    assert "OK: usable" in out and "0 tracks reused from cache" in out
    for split in ("train", "valid", "test"):
        assert split in out
    code, out = cli(ds)
    assert code == 0 and "4 tracks reused from cache" in out


def test_report_api_and_rescan_on_change(ds, tmp_path):
    report = verify_dataset(ds, SOURCES, SR, 2, tmp_path / "c", progress=False)
    assert report.ok and not report.problems and report.scanned == 4
    rows = {r.split: r for r in report.rows}
    assert rows["train"].tracks == 2 and rows["train"].hours == pytest.approx(4 / 3600)
    mix = ds / "test/track000/mixture.wav"
    st = os.stat(mix)
    os.utime(mix, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = verify_dataset(ds, SOURCES, SR, 2, tmp_path / "c", progress=False)
    assert (again.reused, again.scanned) == (3, 1) and again.ok
    looser = verify_dataset(ds, SOURCES, SR, 2, tmp_path / "c", sum_tolerance=0.1,
                            progress=False)
    assert looser.scanned == 4                     # other settings: checked again


def test_missing_stem(ds, cli):
    (ds / "train/track001/bass.wav").unlink()
    code, out = cli(ds)
    assert code == 1
    assert f"{ds}/train/track001/bass.wav: missing file bass.wav" in out
    assert "residual_source=bass" in out           # the fix
    # Files named after other stems: the fix names them.
    code, out = cli(ds, "dset.sources=[drums,kick,other,vocals]")
    assert code == 1 and "missing file kick.wav" in out
    assert "your files have bass, drums, other, vocals; set dset.sources=[bass, drums, " \
           "other, vocals]" in out


def test_stem_files_read_another_file_name(ds, cli):
    for track in ds.glob("*/*"):
        (track / "vocals.wav").rename(track / "vox.wav")
    code, out = cli(ds, "dset.stem_files={vocals:vox}")
    assert code == 0, out


def test_samplerate_mismatch(ds, cli):
    track = ds / "valid/track000"
    data, _ = _read(track / "vocals.wav")
    _write(track / "vocals.wav", data, sr=2 * SR)
    code, out = cli(ds)
    assert code == 1
    assert f"{track}/vocals.wav: sample rate {2 * SR} Hz of vocals.wav differs from " \
           f"mixture.wav ({SR} Hz)" in out


def test_channel_mismatch(ds, cli):
    track = ds / "train/track000"
    data, _ = _read(track / "bass.wav")
    _write(track / "bass.wav", data[:, :1])
    code, out = cli(ds)
    assert code == 1
    assert f"{track}/bass.wav: channels 1 channels of bass.wav differs from mixture.wav" in out


def test_length_mismatch(ds, cli):
    track = ds / "train/track000"
    data, _ = _read(track / "other.wav")
    _write(track / "other.wav", data[:-100])
    code, out = cli(ds)
    assert code == 1
    assert f"{track}/other.wav: length {2 * SR - 100} frames of other.wav differs from " \
           f"mixture.wav ({2 * SR} frames)" in out


def test_empty_file(ds, cli):
    (ds / "train/track000/drums.wav").write_bytes(b"")
    code, out = cli(ds)
    assert code == 1 and f"{ds}/train/track000/drums.wav: empty file" in out


def test_corrupt_file(ds, cli):
    (ds / "valid/track000/vocals.wav").write_bytes(b"RIFF\x00\x01garbage" * 50)
    code, out = cli(ds)
    assert code == 1 and f"{ds}/valid/track000/vocals.wav: cannot read vocals.wav" in out


def test_nan_samples(ds, cli):
    track = ds / "train/track001"
    data, _ = _read(track / "bass.wav")
    data[100:103] = np.nan
    _write(track / "bass.wav", data)
    code, out = cli(ds)
    assert code == 1 and f"{track}/bass.wav: 6 NaN/inf samples in bass.wav" in out


def test_stems_do_not_sum(ds, cli):
    track = ds / "train/track000"
    data, _ = _read(track / "vocals.wav")
    _write(track / "vocals.wav", data * 2)
    code, out = cli(ds)
    assert code == 1
    line = next(x for x in out.splitlines() if "do not sum" in x)
    assert line.startswith(f"ERROR   {track}/mixture.wav: stems drums.wav, bass.wav")
    rel = float(line.split("relative L1 error ")[1].split()[0])
    assert 1e-3 < rel < 2
    # a looser tolerance accepts it
    code, _ = cli(ds, f"dset.sum_tolerance={rel * 1.01}")
    assert code == 0


def test_silent_stem_warns_and_strict_fails(ds, cli):
    track = ds / "train/track000"
    data, _ = _read(track / "vocals.wav")
    _set_stem(track, "vocals", np.zeros_like(data))
    code, out = cli(ds)
    assert code == 0 and f"WARNING {track}/vocals.wav: vocals.wav is silent" in out
    code, out = cli(ds, "--strict")
    assert code == 1 and "warnings and --strict" in out


def test_clipping_warns(ds, cli):
    track = ds / "valid/track000"
    data, _ = _read(track / "bass.wav")
    data[:200] = 1.0                                   # 1.25% of the samples at full scale
    _set_stem(track, "bass", data)
    code, out = cli(ds)
    assert code == 0 and f"WARNING {track}/bass.wav: bass.wav clips: 1.25% of samples" in out


def test_missing_valid_split(ds, cli):
    shutil.rmtree(ds / "valid")
    code, out = cli(ds)
    assert code == 1 and f"ERROR   {ds}/valid: missing split folder valid/" in out
    shutil.rmtree(ds / "test")                         # test/ is optional
    assert "ERROR   " + str(ds / "test") not in cli(ds)[1]


def test_residual_source_and_other_sources(ds, cli):
    code, out = cli(ds, "sources=[drums,rest]", "residual_source=rest")
    assert code == 0, out
    code, out = cli(ds, "sources=[drums,bass]")        # other + vocals left out: no sum
    assert code == 1 and "files not in `sources`: other.wav, vocals.wav" in out


def test_synthetic_dataset_when_wav_is_null(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([f"dset.samplerate={SR}", f"dset.metadata={tmp_path / 'meta'}", "dset=five_stem",
              "sources=[other,kick,vocals,bass,hihat]", "variant=debug", "--no-progress"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert f"dataset {tmp_path / 'meta' / 'synth'}" in out


@pytest.mark.parametrize("argv", [["a", "b"], ["dset.no_such_key=1"], ["dset=wav"],
                                  ["residual_source=rest"]])
def test_usage_errors_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + [f"dset.metadata={tmp_path}", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error" in err
    if argv[0] != "a":  # a ConfigError: one line naming the key (argparse adds its usage)
        assert err.startswith("error: ConfigError:") and "\n" not in err
        assert argv[0].split("=")[0] in err
