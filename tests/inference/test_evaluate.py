"""tools.test_pretrained: the printed table is the JSON, configs come from the XP."""
import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO, check_table_matches_json



def test_xp_with_shifts_prints_table_equal_to_json(xp, monkeypatch, capsys):
    from demucs_lora.commands.score_model import main
    monkeypatch.chdir(xp.root)
    main(["-n", xp.sig, "test.shifts=2", "--no-progress"])
    printed = capsys.readouterr().out
    results = json.loads((xp.folder / "test_results.json").read_text())
    assert results["settings"]["shifts"] == 2 and results["xp"] == xp.sig
    assert results["metrics"] == ["nsdr", "si_sdr", "l1_freq", "bleedless", "fullness"]
    table = check_table_matches_json(printed, results)
    assert all(v is not None and math.isfinite(v) for row in table.values() for v in row.values())
    assert 0 < table["mean"]["bleedless"] <= 100 and 0 < table["mean"]["fullness"] <= 100
    assert len(results["tracks"]) == 1
    track = next(iter(results["tracks"].values()))
    assert sorted(track) == sorted(results["sources"])


def test_base_plus_adapter_equals_xp_and_json_option(xp, tmp_path, monkeypatch, capsys):
    """best.th is base + lora_best merged: both routes give the same scores (shifts 0);
    the adapter's header names the XP, so its config (dataset) is used."""
    from demucs_lora.commands.score_model import main
    monkeypatch.chdir(xp.root)
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    main(["-n", xp.sig, "--split", "valid", "--json", str(out_a), "--no-progress"])
    main(["-n", str(xp.base_path), "--adapter", str(xp.folder / "lora_best"), "--split",
          "valid", "--json", str(out_b), "--no-progress", "seed=3"])
    printed = capsys.readouterr().out
    a, b = json.loads(out_a.read_text()), json.loads(out_b.read_text())
    assert b["xp"] == xp.sig and b["settings"]["seed"] == 3 and a["settings"]["seed"] == 42
    check_table_matches_json(printed.split(str(xp.base_path))[-1], b)
    assert list(a["tracks"]) == list(b["tracks"])
    assert a["summary"]["nsdr"] == pytest.approx(b["summary"]["nsdr"], abs=2e-3)
    assert not (xp.folder / "valid_results.json").exists()  # --json given: only there


def test_xp_config_overrides(xp):
    from demucs_lora.core.errors import ConfigError
    from demucs_lora.commands.score_model import xp_config
    file = xp.folder / "config.yaml"
    cfg = xp_config(file, ["test.shifts=3", "optim=adamw", "dset.wav=/elsewhere"])
    saved = OmegaConf.load(file)
    assert cfg.test.shifts == 3 and cfg.dset.wav == "/elsewhere"
    assert cfg.optim.optim == "adamw"                        # the group's delta applied
    assert cfg.htdemucs.channels == saved.htdemucs.channels  # the rest kept from the XP
    assert cfg.dset.sources == saved.dset.sources
    with pytest.raises(ConfigError, match="test.shfts"):
        xp_config(file, ["test.shfts=2"])


@pytest.mark.slow  # the CLI in a subprocess
def test_unknown_model_exits_with_message(xp, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.test_pretrained", "-n", "nothing",
                           "--no-progress"], cwd=xp.root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 1
    assert "'nothing' not found" in proc.stderr and xp.sig in proc.stderr


def test_exit_status_per_kind_of_error(xp, monkeypatch, capsys):
    """2 and one line for a config error (an override the XP's config lacks), 1 and one
    line for a model that is not found."""
    from demucs_lora.commands.score_model import main
    monkeypatch.chdir(xp.root)
    with pytest.raises(SystemExit) as exc:
        main(["-n", xp.sig, "--no-progress", "test.shfts=2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ConfigError:") and "\n" not in err
    assert "'test.shfts'" in err
    with pytest.raises(SystemExit) as exc:  # a value out of range: before any separation
        main(["-n", xp.sig, "--no-progress", "test.overlap=2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == \
        "error: ConfigError: test.overlap=2: must be in [0, 1) (overlap between chunks)"
    with pytest.raises(SystemExit) as exc:  # was: zero tracks evaluated, an empty JSON
        main(["-n", xp.sig, "--no-progress", "--max-tracks", "-1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "--max-tracks" in last and ">= 1" in last
    with pytest.raises(SystemExit) as exc:
        main(["-n", "nothing", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: ModelLoadError:") and "\n" not in err
    assert "'nothing' not found" in err


def test_dataset_gives_raw_audio(xp):
    """Metrics are on the original scale: the test set is read un-normalized (the mixture
    is normalized per track in separate_tensor, like the demucs CLI)."""
    import soundfile as sf
    from demucs_lora.config.run_config import data_config
    from demucs_lora.inference.evaluation import build_dataset
    data = build_dataset(data_config(xp.cfg, ["drums", "bass", "other", "vocals"]), "test",
                         44100, 2, progress=False)
    item = data[0]
    mix, _ = sf.read(str(xp.data / "test" / next(iter(data.metadata)) / "mixture.wav"),
                     dtype="float32")
    assert torch.equal(item[0], torch.from_numpy(mix.T.copy()))
    assert torch.allclose(item[1:].sum(0), item[0], atol=1e-5)
