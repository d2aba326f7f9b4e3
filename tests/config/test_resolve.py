"""The config a run uses, given its base (demucs_lora.config.resolve) and `dora run`'s flags
(demucs_lora.training.dora_cli): architecture keys, hop_length, LoRA without a base, sources and
their heads, dataset file spellings, mixed precision, `-d` without GPU, `-f NAME`."""
import pytest
import torch
from omegaconf import OmegaConf
from helpers import FOUR, tiny_htdemucs

from demucs_lora.config import resolve as rc
from demucs_lora.core.errors import ConfigError


@pytest.fixture(scope="module")
def base():
    return tiny_htdemucs(FOUR, t_heads=4)


def cfg(*overrides):
    from demucs_lora.config.compose import compose
    return compose(["continue_from=htdemucs", *overrides])


def test_architecture_key_equal_to_the_base_is_accepted_and_the_base_recorded(base):
    config = cfg("htdemucs.nfft=4096")           # channels 48 in conf/, 8 in the base
    record, lines = rc.check_architecture(config, base, explicit={"nfft"})
    assert record["htdemucs.nfft"] == 4096 and record["htdemucs.channels"] == 8
    assert record["htdemucs.t_heads"] == 4 and not lines


def test_architecture_key_that_differs_names_key_base_value_and_why(base):
    config = cfg("htdemucs.channels=48", "htdemucs.nfft=2048")
    with pytest.raises(ConfigError) as exc:
        rc.check_architecture(config, base, explicit={"channels", "nfft"})
    text = str(exc.value)
    assert "htdemucs.channels=48 but the base htdemucs has channels=8" in text
    assert "htdemucs.nfft=2048 but the base htdemucs has nfft=4096" in text
    assert "weights fix the architecture" in text
    # Not given by the user (the model group's default): the base's value is recorded.
    record, _ = rc.check_architecture(config, base, explicit=set())
    assert record["htdemucs.channels"] == 8


def test_weight_free_argument_is_applied_to_the_base():
    model = tiny_htdemucs(FOUR)
    config = cfg("htdemucs.use_train_segment=false")
    record, lines = rc.check_architecture(config, model, explicit={"use_train_segment"})
    assert record["htdemucs.use_train_segment"] is False and "applied to the base" in lines[0]
    rc.apply_runtime_kwargs(model, config)
    assert model.use_train_segment is False
    assert model._init_args_kwargs[1]["use_train_segment"] is False   # saved with the model


def test_hop_length_only_the_derived_value():
    assert rc.check_hop_length(cfg(), 4096) == {"htdemucs.hop_length": 1024}
    assert rc.check_hop_length(cfg("htdemucs.hop_length=1024"), 4096)
    with pytest.raises(ConfigError, match=r"hop_length=512: HTDemucs derives .* \(nfft // 4 = "
                                          r"1024 for nfft=4096\)"):
        rc.check_hop_length(cfg("htdemucs.hop_length=512"), 4096)


def test_lora_without_base_needs_the_opt_in():
    from demucs_lora.config.compose import compose
    with pytest.raises(ConfigError, match="continue_from=null") as exc:
        rc.check_lora_base(compose(["htdemucs.lora_rank=4"]))
    assert "\n" not in str(exc.value) and "lora_without_base=true" in str(exc.value)
    rc.check_lora_base(compose(["htdemucs.lora_rank=4", "lora_without_base=true"]))
    rc.check_lora_base(compose(["htdemucs.lora_rank=0"]))       # training from scratch
    rc.check_lora_base(compose(["htdemucs.lora_rank=4", "continue_from=x"]))


def test_what_is_trained_says_it():
    from demucs_lora.config.compose import compose
    from demucs_lora.config.run_config import run_config
    from demucs_lora.training.run import what_is_trained

    def line_of(config):
        return what_is_trained(run_config(config), report)
    report = {"trainable": {"trainable": 10, "total": 100, "percent": 10.0}, "train_heads": []}
    line = line_of(compose(["htdemucs.lora_rank=4", "lora_without_base=true"]))
    assert "LoRA adapters" in line and "RANDOMLY INITIALISED" in line and "frozen" in line
    assert "full fine-tune" in line_of(cfg())
    assert "lora_init" not in line and "LoRA+" not in line
    line = line_of(compose(["htdemucs.lora_rank=4", "htdemucs.lora_init=gradient",
                            "optim.lora_plus_ratio=4"]))
    assert "lora_init=gradient" in line and "LoRA+ ratio 4" in line


def test_sources_default_to_the_base_and_new_ones_follow_the_taxonomy(base):
    updates, lines = rc.resolve_sources(cfg(), base)
    assert updates["dset.sources"] == FOUR and updates["source_init"] is None
    assert lines == [f"dset.sources not set: the base's {FOUR}"]
    wanted = '["other", "kick", "vocal", "bass", "hihat", "accompaniment", "guitar"]'
    updates, lines = rc.resolve_sources(cfg(f"dset.sources={wanted}",
                                            "source_init={guitar: [other, bass]}"), base)
    assert updates["source_init"] == {"kick": "drums", "vocal": "vocals", "hihat": "drums",
                                      "accompaniment": ["drums", "bass", "other"],
                                      "guitar": ["other", "bass"]}
    assert "source accompaniment: new stem, head = the sum of drums + bass + other" in \
        "\n".join(lines)
    assert "source guitar: head from other + bass (source_init)" in lines
    fresh, lines = rc.resolve_sources(cfg("continue_from=null"), None)
    assert fresh["dset.sources"] == FOUR and "new model" in lines[0]


def test_taxonomy_prefers_the_base_s_own_instrument_heads():
    from demucs_lora.core.sources import plan_sources
    six = FOUR + ["guitar", "piano"]
    plan = {c.source: c.init for c in plan_sources(six, ["keys", "gtr", "strings", "Drums"])}
    assert plan == {"keys": ["piano"], "gtr": ["guitar"], "strings": ["other"],
                    "Drums": ["drums"]}


def test_stem_files_follow_the_dataset_spelling(tmp_path):
    import soundfile as sf
    import numpy as np
    for split in ("train", "valid"):
        folder = tmp_path / split / "t1"
        folder.mkdir(parents=True)
        for name in ("mixture", "vocals", "Kick"):
            sf.write(str(folder / f"{name}.wav"), np.zeros((100, 2), "float32"), 44100)
    config = cfg("dset=wav", f"dset.wav={tmp_path}")
    updates, lines = rc.resolve_stem_files(config, ["vocal", "kick", "bass"])
    assert updates == {"dset.stem_files": {"vocal": "vocals", "kick": "Kick"}}
    assert lines[0] == "source vocal: the dataset has vocals.wav and no vocal.wav: reading " \
                       "vocals.wav for vocal"
    # Synthetic data: the layout names are the files.
    updates, _ = rc.resolve_stem_files(cfg(), ["other", "kick", "vocal", "bass", "hihat"])
    assert updates == {"dset.stem_files": {"vocal": "vocals"}}


def test_mixed_precision_true_is_fp16_on_cuda_bf16_on_cpu():
    config = cfg("htdemucs.mixed_precision=true")
    assert config.mixed_precision is True
    assert rc.resolve_precision(config, "cpu")[0].mixed_precision == "bf16"
    assert rc.resolve_precision(config, "cuda")[0].mixed_precision == "fp16"
    assert rc.resolve_precision(cfg("htdemucs.precision=bfloat16"), "cpu")[0] \
        .mixed_precision == "bf16"


def test_data_banner_only_for_synthetic_data(tmp_path):
    assert "EMBEDDED SYNTHETIC DATA" in rc.data_banner(cfg())
    assert rc.data_banner(cfg(f"dset.wav={tmp_path}")) is None


def test_resolve_with_base_gives_the_config_that_runs(base):
    config = cfg("dset.sources=[drums,kick]", "htdemucs.hop_length=1024")
    out, lines = rc.resolve_with_base(config, base)
    assert out.htdemucs.channels == 8 and out.htdemucs.hop_length == 1024
    assert list(out.dset.sources) == ["drums", "kick"]
    assert OmegaConf.to_container(out.source_init) == {"kick": "drums"}
    assert config.htdemucs.channels == 48            # the input is left alone


# ----------------------------------------------------------------------------- dora_cli
def test_cpu_ddp_note():
    from demucs_lora.training.dora_cli import cpu_ddp_note
    assert cpu_ddp_note(None, 2) is None and cpu_ddp_note(4, 1) is None
    assert "one process on the CPU" in cpu_ddp_note(None, 0)
    assert "2 DDP processes on the CPU (gloo" in cpu_ddp_note(2, 0)


def test_f_name_resolves_a_model_or_says_what_f_takes(tmp_path, monkeypatch):
    from demucs.states import serialize_model
    from demucs_lora.training.dora_cli import argv_from_model
    repo = tmp_path / "models"
    repo.mkdir()
    model = tiny_htdemucs(FOUR)
    torch.save(serialize_model(model, OmegaConf.create({}), half=False),
               repo / "955717e8-8726e21a.th")
    (repo / "htdemucs.yaml").write_text("models: ['955717e8']\n")
    monkeypatch.chdir(tmp_path)
    argv = ["dora", "run", "-f", "htdemucs", f"pretrained_repo='{repo}'"]
    assert argv_from_model("htdemucs", argv, tmp_path / "outputs/xps") == \
        ["continue_from=htdemucs"]
    assert argv_from_model("955717e8", argv, tmp_path) == ["continue_from=955717e8"]
    with pytest.raises(ConfigError, match=r"-f htdemucs_ft: no XP .* -f takes an XP signature"):
        argv_from_model("htdemucs_ft", argv, tmp_path)
    with pytest.raises(ConfigError, match="pretrained_repo"):
        argv_from_model("htdemucs", ["dora", "run"], tmp_path)
