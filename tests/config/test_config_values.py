"""Config values that were accepted and did nothing, or failed after an epoch, are refused
before any compute (naming the key); the checks that need the base run before any data is
generated; dataset layouts that silently lost tracks or channels are reported."""
import numpy as np
import pytest
import soundfile as sf

from demucs_lora.config.check import check_config
from demucs_lora.core.errors import ConfigError
from demucs_lora.config.compose import compose

QUICK = ["model=htdemucs_tiny", "variant=debug"]


@pytest.fixture(scope="module")
def base_cfg():
    return compose(QUICK)


@pytest.mark.parametrize("override, key", [
    ("test.every=0", "test.every"), ("test.overlap=1.0", "test.overlap"),
    ("test.overlap=-0.1", "test.overlap"), ("test.shifts=-1", "test.shifts"),
    ("dset.shift=-1", "dset.shift"), ("misc.num_workers=-2", "misc.num_workers"),
    ("optim.ema=1.0", "optim.ema"), ("epochs=0", "epochs"), ("max_batches=0", "max_batches"),
    ("max_batches=-3", "max_batches"), ("train_budget_seconds=-1", "train_budget_seconds"),
    ("dset.sum_tolerance=-0.1", "dset.sum_tolerance"), ("optim.lr=0", "optim.lr"),
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("optim.skip_nonfinite=-1", "optim.skip_nonfinite"), ("test.every=1.5", "test.every"),
    ("batch_size=0", "batch_size"), ("batch_size=2.5", "batch_size"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("dset.segment=0.005", "dset.segment"),
    ("optim.clip_grad=-1", "optim.clip_grad"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
])
def test_config_holes_are_refused_naming_the_key(base_cfg, override, key):
    from omegaconf import OmegaConf
    cfg = OmegaConf.merge(base_cfg, OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert str(info.value).startswith(f"{key}=")


def test_residual_source_has_one_rule_and_one_message(base_cfg):
    """The config check, the dataset check and the dataset itself refuse a residual source
    that is not a source with the same words (data.layout.check_residual_source)."""
    from omegaconf import OmegaConf
    from demucs_lora.data.stems import StemDataset
    from demucs_lora.config.run_config import data_config
    from demucs_lora.data.verify import verify_config
    cfg = OmegaConf.merge(base_cfg, OmegaConf.from_dotlist(["dset.sources=[drums,bass]",
                                                            "residual_source=rest"]))
    messages = set()
    for check in (lambda: check_config(cfg),
                  lambda: verify_config(data_config(cfg), progress=False),
                  lambda: StemDataset(None, "train", ["drums", "bass"], {},
                                      residual_source="rest")):
        with pytest.raises(ConfigError) as info:
            check()
        messages.add(str(info.value))
    assert messages == {"residual_source='rest' must be one of dset.sources=['drums', 'bass']"}


def test_defaults_and_variants_pass():
    for overrides in ([], QUICK, ["variant=finetune"], ["variant=five_stem"]):
        check_config(compose(overrides))


def test_base_checks(tmp_path):
    from demucs_lora.config.values import check_base_values
    from solver_helpers import tiny_base
    base = tiny_base()
    check_base_values(compose([*QUICK, "htdemucs.lora_rank=4",
                               "htdemucs.layer_ranks={encoder.0.*:2}"]), base)
    with pytest.raises(ConfigError, match="matches no layer"):
        check_base_values(compose([*QUICK, "htdemucs.lora_rank=4",
                                   "htdemucs.layer_ranks={nothing.*:2}"]), base)
    with pytest.raises(ConfigError, match="source_init"):
        check_base_values(compose([*QUICK, "sources=[kick,bass]",
                                   "source_init={kick:snare}"]), base)


def test_base_checks_run_before_any_data_is_made(tmp_path, monkeypatch):
    """train.run loads the base and checks layer_ranks before verify_or_raise
    (training/run.py; it generates the synthetic data)."""
    from types import SimpleNamespace
    import torch
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora import train
    from demucs_lora.training import run
    from solver_helpers import tiny_base
    base_path = tmp_path / "base.th"
    torch.save(serialize_model(tiny_base(), OmegaConf.create({}), half=False), base_path)
    cfg = compose([*QUICK, f"continue_from={base_path}", "htdemucs.lora_rank=4",
                   "dset.samplerate=8000", "htdemucs.layer_ranks={nothing.*:2}",
                   f"dset.metadata={tmp_path / 'metadata'}"])
    monkeypatch.setattr(train, "get_xp", lambda: SimpleNamespace(folder=tmp_path / "xp",
                                                                sig="x"))
    (tmp_path / "xp").mkdir()

    def no_data(cfg):
        raise AssertionError("the data was touched before the base checks")
    monkeypatch.setattr(run, "verify_or_raise", no_data)
    with pytest.raises(ConfigError, match="matches no layer"):
        train.run(cfg)
    assert not (tmp_path / "metadata").exists()


def test_segment_warnings():
    from demucs_lora.config.values import segment_warnings
    assert segment_warnings({"a": 10.0, "b": 12.0}, 4.0) == []
    (line,) = segment_warnings({"a": 1.0, "b": 1.5, "c": 9.0}, 4.0)
    assert "longer than most train tracks" in line
    (line,) = segment_warnings({"a": 1.0, "b": 10.0, "c": 9.0}, 4.0)
    assert "1 train track(s) are shorter" in line and "a" in line


def _track(folder, channels=2, sr=8000, seconds=0.2):
    folder.mkdir(parents=True, exist_ok=True)
    stems = {s: 0.1 * np.random.default_rng(i).standard_normal((int(sr * seconds), channels))
             for i, s in enumerate(["drums", "bass", "other", "vocals"])}
    for name, data in stems.items():
        sf.write(str(folder / f"{name}.wav"), data, sr, subtype="FLOAT")
    sf.write(str(folder / "mixture.wav"), sum(stems.values()), sr, subtype="FLOAT")


def test_a_subfolder_does_not_hide_its_track(tmp_path):
    from demucs_lora.data.stems import list_tracks
    _track(tmp_path / "train" / "song1")
    (tmp_path / "train" / "song1" / "stems_backup").mkdir()
    _track(tmp_path / "train" / "artist" / "song2")
    assert list_tracks(tmp_path / "train") == ["artist/song2", "song1"]


def test_six_channel_tracks_get_an_info_line(tmp_path):
    from demucs_lora.data.verify import verify_dataset
    _track(tmp_path / "ds" / "train" / "t6", channels=6)
    _track(tmp_path / "ds" / "valid" / "t2", channels=2)
    report = verify_dataset(tmp_path / "ds", ["drums", "bass", "other", "vocals"], 8000, 2,
                            tmp_path / "meta", progress=False)
    infos = [p for p in report.problems if p.level == "info" and "6 channels" in p.message]
    assert report.ok and len(infos) == 1 and "first 2 channels" in infos[0].message
