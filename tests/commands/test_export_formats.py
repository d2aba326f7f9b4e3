"""tools.export --format uvr / msst / all: each in its real client or its exact loading rule.

- uvr: the real audio-separator (a test extra) runs the export offline (every download
  is sent to a dead proxy) and each stem it labels must be ours of that name; the layouts
  those tools mislabel are refused in one line, a permuted layout is reordered.
- msst: the model is built as MSST's ``get_model_from_config`` builds it from our YAML
  (OmegaConf, ``HTDemucs(sources=, samplerate=, audio_channels=, segment=, **htdemucs)``),
  the checkpoint loaded strictly; one segment's output must equal ours exactly.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from helpers import FOUR, SIX, forward, make_xp, our_stems, tiny_htdemucs, write_mix

PERMUTED = ["vocals", "drums", "other", "bass"]


def export(*argv):
    from demucs_lora.commands.export import main
    main([str(a) for a in argv])


def with_model(xp, model):
    """The XP's best.th replaced by ``model`` (another stem layout, another segment)."""
    from demucs_lora.training.checkpoint import save_best_model
    save_best_model(model.eval(), None, xp.cfg, xp.folder / "best.th")
    return xp


@pytest.fixture(scope="module")
def xps(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {
        "four": make_xp(root, sig="four0001"),
        "permuted": with_model(make_xp(root, sig="perm0001"), tiny_htdemucs(PERMUTED, seed=7)),
        "five": with_model(make_xp(root, sig="five0001"),
                           tiny_htdemucs(["kick", "hihat", "bass", "other", "vocals"], seed=8)),
        "six": with_model(make_xp(root, sig="six00001"), tiny_htdemucs(SIX, seed=9)),
        "frac": with_model(make_xp(root, sig="frac0001"), tiny_htdemucs(FOUR, seed=4,
                                                                         segment=1.5)),
        "bag": bag_xp(make_xp(root, sig="bag00001")),
    }


def bag_xp(xp):
    """The XP as an adapted bag: best.yaml + best_m0/1.th (as the solver writes a bag)."""
    from demucs.apply import BagOfModels
    bag = BagOfModels([tiny_htdemucs(FOUR, seed=s).eval() for s in (11, 12)])
    with_model(xp, bag)
    (xp.folder / "best.th").unlink()
    return xp


@pytest.fixture
def root(xps, monkeypatch):
    monkeypatch.chdir(xps["four"].root)
    return xps["four"].root


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        export(*argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ConfigError:") and "\n" not in err
    return err


def test_uvr_refuses_layouts_the_tools_mislabel(root, tmp_path, capsys):
    err = refused(capsys, "five0001", "--format", "uvr", "-o", tmp_path)
    assert "['kick', 'hihat', 'bass', 'other', 'vocals']" in err
    assert "by position" in err and "dropped" in err
    assert "[drums, bass, other, vocals]" in err and "guitar, piano" in err
    err = refused(capsys, "five0001", "--format", "uvr", "--reorder-stems", "-o", tmp_path)
    assert "cannot be labelled right" in err  # not a permutation: no reorder either
    err = refused(capsys, "perm0001", "--format", "uvr", "-o", tmp_path)
    assert str(PERMUTED) in err and "--reorder-stems" in err
    err = refused(capsys, "six00001", "--format", "uvr", "--name", "six", "-o", tmp_path)
    assert "'6s'" in err
    err = refused(capsys, "four0001", "--format", "uvr", "--name", "my6s", "-o", tmp_path)
    assert "must not contain '6s'" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    export("five0001", "-o", tmp_path)  # --format th: written, with a word for UVR users
    assert "audio-separator/UVR would not" in capsys.readouterr().out


def test_uvr_six_stems_named_6s_and_entry_files(root, tmp_path, capsys):
    import json
    import yaml
    export("six00001", "--format", "uvr", "-o", tmp_path)
    printed = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["download_checks.json", "six00001_6s.download_checks.json",
                     "six00001_6s.th", "six00001_6s.yaml"]
    assert f"audio-separator SONG -m six00001_6s.yaml --model_file_dir {tmp_path}" in printed
    assert f"python -m demucs --repo {tmp_path} -n six00001_6s SONG" in printed
    entry = json.loads((tmp_path / "six00001_6s.download_checks.json").read_text())
    files = {"six00001_6s.th": "six00001_6s.th", "six00001_6s.yaml": "six00001_6s.yaml"}
    assert entry["demucs_download_list"] == {"Demucs v4: six00001_6s": files}
    assert yaml.safe_load((tmp_path / "six00001_6s.yaml").read_text()) == {
        "models": ["six00001_6s"]}
    export("four0001", "--format", "uvr", "-o", tmp_path)  # a 2nd model: entry merged in
    checks = json.loads((tmp_path / "download_checks.json").read_text())
    assert sorted(checks["demucs_download_list"]) == ["Demucs v4: four0001",
                                                      "Demucs v4: six00001_6s"]
    assert all(isinstance(checks[k], dict) for k in ("vr_download_list", "mdx_download_list",
                                                     "mdx23c_download_list"))
    merge = next(line for line in capsys.readouterr().out.splitlines() if "merge" in line)
    target = tmp_path / "uvr_checks.json"
    target.write_text(json.dumps({"demucs_download_list": {"Demucs v4: x": {}},
                                  "vr_download_list": {"a": "b"}}))
    command = merge.split("entry: ", 1)[1].replace("UVR_OR_MODEL_DIR/download_checks.json",
                                                   str(target))
    subprocess.run(command, shell=True, check=True, timeout=60)  # the printed one-liner
    merged = json.loads(target.read_text())
    assert sorted(merged["demucs_download_list"]) == ["Demucs v4: four0001", "Demucs v4: x"]
    assert merged["vr_download_list"] == {"a": "b"}


@pytest.mark.slow  # audio-separator in a subprocess
def test_audio_separator_labels_reordered_stems_like_ours(root, xps, tmp_path, capsys):
    from demucs_lora import get_model
    if shutil.which("audio-separator", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("audio-separator is missing: `make install` installs it (test extra)")
    out = tmp_path / "models"
    export("perm0001", "--format", "uvr", "--reorder-stems", "-o", out)
    assert f"heads reordered from {PERMUTED}" in capsys.readouterr().out
    mix = tmp_path / "mix.wav"
    write_mix(mix, seconds=1.2)
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               NO_PROXY="", no_proxy="")  # offline: any download fails
    tool = Path(sys.executable).parent / "audio-separator"
    proc = subprocess.run([str(tool), str(mix), "-m", "perm0001.yaml", "--model_file_dir",
                           str(out), "--output_dir", str(tmp_path / "sep"), "--output_format",
                           "WAV", "--demucs_shifts", "0", "--use_soundfile"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = get_model(xps["permuted"].folder / "best.th")  # stems in PERMUTED order
    ours = dict(zip(original.sources, our_stems(original, mix)))
    labelled = sorted(p.name for p in (tmp_path / "sep").iterdir())
    assert labelled == [f"mix_({s.capitalize()})_perm0001.wav" for s in sorted(FOUR)]
    for source, want in ours.items():
        data, sr = sf.read(str(tmp_path / "sep" / f"mix_({source.capitalize()})_perm0001.wav"),
                           dtype="float32", always_2d=True)
        got = torch.from_numpy(data.T.copy())
        assert sr == 44100 and got.shape == want.shape
        assert (got - want).abs().max() < 1e-6, source
        assert want.abs().max() > 1e-3  # a real stem, not silence


def msst_model(config_path, ckpt_path):
    """The model as MSST builds and loads it (get_model_from_config for htdemucs:
    OmegaConf.load, demucs4ht.get_model, load_start_checkpoint's strict load_state_dict).
    MSST's HTDemucs is demucs' with ``num_subbands`` (default 1) added."""
    from demucs.htdemucs import HTDemucs
    from omegaconf import OmegaConf
    config = OmegaConf.load(config_path)
    extra = {"sources": list(config.training.instruments),
             "audio_channels": config.training.channels,
             "samplerate": config.training.samplerate,
             "segment": config.training.segment}
    kw = OmegaConf.to_container(getattr(config, config.model), resolve=True)
    model = HTDemucs(**extra, **kw)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "state" in state:
        state = state["state"]
    model.load_state_dict(state)  # strict, as MSST's inference does
    return model.eval(), config


def test_msst_config_builds_the_model_and_one_segment_matches(root, xps, tmp_path, capsys):
    from demucs_lora import get_model
    export("four0001", "--format", "msst", "-o", tmp_path)
    printed = capsys.readouterr().out
    config_path, ckpt = tmp_path / "four0001.msst.yaml", tmp_path / "four0001.msst.ckpt"
    assert (f"python inference.py --model_type htdemucs --config_path {config_path} "
            f"--start_check_point {ckpt}") in printed
    model, config = msst_model(config_path, ckpt)
    ours = get_model("four0001")
    assert config.training.segment == 1 and isinstance(config.training.segment, int)
    assert config.training.samplerate * config.training.segment == 44100  # MSST's chunk
    assert config.inference.num_overlap >= 1 and config.inference.batch_size >= 1
    assert config.audio.sample_rate == 44100  # the rate inference.py loads songs at
    htdemucs_keys = set(config.htdemucs)
    assert {"use_train_segment", "dconv_mode", "bottom_channels", "t_layers",
            "channels", "depth"} <= htdemucs_keys
    chunk = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(0)) * 0.1
    assert torch.equal(forward(model, chunk), forward(ours, chunk))


def test_msst_fractional_segment_written_whole_and_bag_refused(root, xps, tmp_path, capsys):
    from demucs_lora import get_model
    export("frac0001", "--format", "msst", "-o", tmp_path)
    printed = capsys.readouterr().out
    assert "the model's 1.5 s is written as 1 s, so MSST runs it on 1 s windows" in printed
    model, config = msst_model(tmp_path / "frac0001.msst.yaml", tmp_path / "frac0001.msst.ckpt")
    assert config.training.segment == 1
    ours = get_model("frac0001")
    assert float(ours.segment) == 1.5
    ours.segment = 1  # what MSST builds: the same weights, 1 s windows
    chunk = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(1)) * 0.1
    assert torch.equal(forward(model, chunk), forward(ours, chunk))
    err = refused(capsys, "bag00001", "--format", "msst", "-o", tmp_path / "bag")
    assert "bag of 2 models and MSST runs one model" in err


def test_all_writes_every_format_and_a_readme(root, tmp_path, capsys):
    export("four0001", "--format", "all", "-o", tmp_path, "--name", "tiny", "--include-lora")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.txt", "download_checks.json", "tiny.download_checks.json",
                     "tiny.lora.json", "tiny.lora.safetensors", "tiny.msst.ckpt",
                     "tiny.msst.yaml", "tiny.onnx", "tiny.th", "tiny.yaml"]
    readme = (tmp_path / "README.txt").read_text()
    for line in (f"python -m demucs --repo {tmp_path} -n tiny SONG",
                 f"audio-separator SONG -m tiny.yaml --model_file_dir {tmp_path}",
                 "python inference.py --model_type htdemucs",
                 f"python -m demucs_lora.commands.separate -n {tmp_path / 'tiny.onnx'} SONG"):
        assert line in readme, line
    with pytest.raises(SystemExit) as exc:  # nothing overwritten without --force
        export("four0001", "--format", "all", "-o", tmp_path, "--name", "tiny")
    assert exc.value.code == 1 and "refusing to overwrite" in capsys.readouterr().err
    export("five0001", "--format", "all", "-o", tmp_path / "five")  # uvr skipped, said why
    printed = capsys.readouterr().out
    assert "skipped uvr: --format uvr: a model with stems" in printed
    assert "five0001.th" in printed and (tmp_path / "five" / "five0001.msst.yaml").is_file()
    assert "skipped uvr" in (tmp_path / "five" / "README.txt").read_text()
