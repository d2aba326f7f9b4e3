"""demucs-lora (separate): one folder per adapter, stems of the right shape, adapters that
differ give different stems, --merge equals unmerged, mono/other-rate input, mp3."""
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from helpers import REPO, adapted_copy, make_xp, our_stems, tiny_htdemucs, write_mix


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An XP (its lora_best) plus a second adapter on the same base, and a stereo mix."""
    from demucs_lora import save_adapter
    xp = make_xp(tmp_path_factory.mktemp("sep"))
    save_adapter(adapted_copy(tiny_htdemucs().eval(), 33), xp.root / "adapters" / "second")
    mix = xp.root / "song.wav"
    write_mix(mix)
    return xp


def read(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def separate(*argv):
    from demucs_lora.commands.separate import main
    main([str(a) for a in argv])


def stems_of(folder):
    return torch.stack([read(folder / f"{s}.wav")[0] for s in ("drums", "bass", "other",
                                                                "vocals")])


def test_one_folder_per_adapter_different_stems_and_merge(setup, tmp_path, monkeypatch, capsys):
    from demucs_lora import get_model
    xp = setup
    monkeypatch.chdir(xp.root)
    out = tmp_path / "sep"
    separate("song.wav", "-n", xp.base_path, "--adapter", xp.sig, "--float32",
             "--clip-mode", "none", "--adapter", "adapters/second", "-o", out, "--shifts",
             "0", "--merge")
    assert "wrote 8 files" in capsys.readouterr().out
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [f"base_{xp.sig}", "base_second"]
    mix, _ = read("song.wav")
    stems = {}
    for folder in folders:
        files = sorted(p.name for p in (out / folder / "song").iterdir())
        assert files == sorted(f"{s}.wav" for s in ("drums", "bass", "other", "vocals"))
        stems[folder] = stems_of(out / folder / "song")
        assert stems[folder].shape == (4, *mix.shape)
    assert (stems[folders[0]] - stems[folders[1]]).abs().max() > 1e-3
    # the XP's adapter merged on the fly == the XP's best.th (base + adapter merged)
    want = our_stems(get_model(xp.sig), xp.root / "song.wav")
    assert (stems[f"base_{xp.sig}"] - want).abs().max() < 1e-4
    # unmerged (the default) gives the same stems up to float error
    separate("song.wav", "--base", xp.base_path, "--adapter", "adapters/second",
             "-o", tmp_path / "unmerged", "--shifts", "0", "--float32", "--clip-mode", "none")
    unmerged = stems_of(tmp_path / "unmerged" / "base_second" / "song")
    assert 0 < (unmerged - stems["base_second"]).abs().max() < 1e-4


def test_base_alone_mono_input_at_another_rate_and_mp3(setup, tmp_path, monkeypatch):
    xp = setup
    monkeypatch.chdir(xp.root)
    mono = tmp_path / "mono.wav"
    write_mix(mono, seconds=0.5, samplerate=22050, channels=1)
    separate(mono, "--base", xp.sig, "-o", tmp_path / "o", "--shifts", "0", "--mp3")
    files = sorted((tmp_path / "o" / xp.sig / "mono").iterdir())
    assert [p.name for p in files] == ["bass.mp3", "drums.mp3", "other.mp3", "vocals.mp3"]
    assert all(p.stat().st_size > 500 for p in files)
    separate(mono, "--base", xp.sig, "-o", tmp_path / "w", "--shifts", "0")
    stem, sr = read(tmp_path / "w" / xp.sig / "mono" / "drums.wav")
    assert sr == 44100 and stem.shape == (2, 22050)  # stereo at the model rate


def test_errors_exit_1_with_message(setup, tmp_path, monkeypatch, capsys):
    xp = setup
    monkeypatch.chdir(xp.root)
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "--base", xp.base_path, "--adapter", "no/such/adapter",
                 "-o", tmp_path)
    assert exc.value.code == 1 and "adapter no/such/adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        separate("missing.wav", "--base", xp.base_path, "-o", tmp_path)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and "missing.wav" in err
    assert err.startswith("error: AudioError:") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "--base", "nothing", "-o", tmp_path)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: ModelLoadError:") and "\n" not in err
    assert "'nothing'" in err
    sf.write(str(xp.root / "silence.wav"), torch.zeros(0, 2).numpy(), 44100)
    sf.write(str(xp.root / "nan.wav"), torch.full((441, 2), float("nan")).numpy(), 44100,
             subtype="FLOAT")
    for name, say in (("silence.wav", "holds no samples (0 frames)"),
                      ("nan.wav", "holds NaN/inf samples")):
        with pytest.raises(SystemExit) as exc:  # was torch's RuntimeError, demucs' assert
            separate(name, "--base", xp.base_path, "-o", tmp_path)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and err == f"error: AudioError: {name} {say}: re-export it"
    assert not any(tmp_path.iterdir())


def test_config_and_usage_errors_exit_2_with_one_line(setup, tmp_path, monkeypatch, capsys):
    """A bad --device is a ConfigError (not torch's error in the first forward); a bad
    --overlap or --shifts is refused by the parser; nothing is loaded or written."""
    monkeypatch.chdir(setup.root)
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "--base", setup.base_path, "-d", "gpu", "-o", tmp_path)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ConfigError: --device 'gpu'")
    assert "\n" not in err and "use cpu or cuda" in err
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:  # -o names a file: refused before separating
        separate("song.wav", "--base", setup.base_path, "-o", tmp_path / "afile")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ConfigError: -o") and "\n" not in err
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err
    for option, value, say in (("--overlap", "1.5", "in [0, 1)"), ("--shifts", "-1", ">= 0")):
        with pytest.raises(SystemExit) as exc:
            separate("song.wav", "--base", setup.base_path, option, value, "-o", tmp_path)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and option in last and say in last, last
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "demucs_lora.commands.separate", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0
    for flag in ("--base", "--repo", "--adapter", "--merge", "--mp3", "--shifts", "--overlap",
                 "-n NAME", "--two-stems", "--flac", "--int24", "--float32", "--filename",
                 "--segment", "--jobs", "--clip-mode", "--other-method", "--mp3-preset"):
        assert flag in proc.stdout


def test_adapter_folder_names_are_unique_and_readable():
    from pathlib import Path
    from demucs_lora.commands.separate import adapter_names
    paths = [Path("/o/outputs/xps/a1/lora_best"), Path("/r/demo.lora"),
             Path("/o/outputs/xps/b2/lora_best"), Path("/p/outputs/xps/c3/lora_best")]
    given = ["a1", "r/demo.lora.safetensors", "outputs/xps/b2/lora_best", "c3/lora_best"]
    assert adapter_names(paths, given) == ["a1", "demo", "b2_lora_best", "c3_lora_best"]


def test_folder_input_two_stems_and_demucs_tree(setup, tmp_path, monkeypatch, capsys):
    """A folder is its audio files; --two-stems writes STEM + no_STEM (the sum of the
    others); 16-bit wav by default; OUT/NAME/TRACK/STEM.wav, hf:// names as demucs."""
    from demucs_lora.commands.separate import output_name
    monkeypatch.chdir(setup.root)
    songs = tmp_path / "songs"
    songs.mkdir()
    wav = write_mix(songs / "one.wav", seconds=0.4)
    sf.write(str(songs / "two.flac"), wav.T.numpy(), 44100, subtype="PCM_16")
    (songs / "notes.txt").write_text("not audio")
    separate(songs, "-n", setup.base_path, "-o", tmp_path / "o", "--shifts", "0",
             "--two-stems", "vocals")
    assert "wrote 4 files" in capsys.readouterr().out
    got = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*.*"))
    assert got == ["base/one/no_vocals.wav", "base/one/vocals.wav", "base/two/no_vocals.wav",
                   "base/two/vocals.wav"]
    assert sf.info(str(tmp_path / "o" / "base" / "one" / "vocals.wav")).subtype == "PCM_16"
    assert output_name("hf://someone/model") == "someone_model"
    assert output_name("models/tiny.onnx.json") == output_name("tiny.th") == "tiny"


@pytest.mark.parametrize("flags,say", [
    (["--two-stems", "piano"], "--two-stems piano: not a stem of"),
    (["--segment", "2"], "--segment 2: longer than the model was trained for"),
    (["--filename", "{track}/{source}.{ext}"], "--filename '{track}/{source}.{ext}': KeyError"),
    (["--filename", "../{stem}.{ext}"], "leaves the output folder"),
])
def test_demucs_flags_checked_before_separating(setup, tmp_path, monkeypatch, capsys, flags,
                                                say):
    monkeypatch.chdir(setup.root)
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "-n", setup.base_path, "-o", tmp_path / "o", *flags)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ConfigError:") and say in err, err
    assert "\n" not in err and not (tmp_path / "o").exists()


def test_empty_folder_refused(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(setup.root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        separate(tmp_path / "empty", "-n", setup.base_path, "-o", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and "holds no audio file" in err
