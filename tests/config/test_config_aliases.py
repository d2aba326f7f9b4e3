"""The guide's keys: each spelling takes effect under its canonical key with the same XP
signature as the canonical spelling, or is a ConfigError naming it; never a no-op.
The same for the guide's YAML blocks written as variant files, with and without the
`# @package _global_` header."""
import shutil
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from demucs_lora.config.aliases import ALIASES, canonical_config, normalize_argv
from demucs_lora.config.keys import CONF_DIR, canonical_checked
from demucs_lora.config.schema import known_schema
from demucs_lora.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# (guide spelling, value as typed, canonical key, resolved value)
GUIDE_KEYS = [
    ("dset.sources", '["other", "kick", "vocals", "bass", "hihat"]', "dset.sources",
     ["other", "kick", "vocals", "bass", "hihat"]),
    ("sources", "[drums,bass]", "dset.sources", ["drums", "bass"]),
    ("dset.sample_rate", "48000", "dset.samplerate", 48000),
    ("dset.num_workers", "4", "misc.num_workers", 4),
    ("dset.prefetch_factor", "4", "misc.prefetch_factor", 4),
    ("dset.pin_memory", "true", "misc.pin_memory", True),
    ("segment", "10", "dset.segment", 10),
    ("use_train_segment", "false", "htdemucs.use_train_segment", False),
    ("htdemucs.segment", "12", "dset.segment", 12),
    ("htdemucs.hop_length", "1024", "htdemucs.hop_length", 1024),
    ("htdemucs.batch_size", "32", "batch_size", 32),
    ("htdemucs.gradient_clip", "0.5", "optim.clip_grad", 0.5),
    ("htdemucs.mixed_precision", "true", "mixed_precision", True),
    ("htdemucs.precision", "float16", "mixed_precision", "fp16"),
    ("htdemucs.enable_checkpointing", "true", "enable_checkpointing", True),
    ("htdemucs.enable_profiling", "true", "enable_profiling", True),
    ("htdemucs.profile_memory", "true", "profile_memory", True),
    ("optim.scheduler", "linear", "optim.schedule", "linear"),
    ("htdemucs.lora_rank_adaptation", "true", "htdemucs.lora_rank_adaptation", True),
    ("htdemucs.min_rank", "2", "htdemucs.min_rank", 2),
    ("htdemucs.max_rank", "16", "htdemucs.max_rank", 16),
    ("lora_max_rank", "16", "htdemucs.lora_max_rank", 16),
    ("htdemucs.nfft", "2048", "htdemucs.nfft", 2048),
    ("htdemucs.channels", "64", "htdemucs.channels", 64),
    ("htdemucs.t_dropout", "0.1", "htdemucs.t_dropout", 0.1),
    ("continue_from", "955717e8", "continue_from", "955717e8"),
    ("continue_from", "12345678", "continue_from", "12345678"),
]


def _other_value(value):
    """A value of the same type as a default, different from it."""
    if isinstance(value, bool):
        return ("true" if not value else "false"), not value
    if isinstance(value, int):
        return str(value + 1), value + 1
    if isinstance(value, float):
        return str(value + 0.5), value + 0.5
    return None


def _lora_keys():
    """Every htdemucs.lora_* key of conf/ (whoever added it), with a non-default value."""
    rows = []
    for key, default in known_schema(str(CONF_DIR))["htdemucs"].items():
        if key.startswith("lora_") and _other_value(default) is not None:
            typed, value = _other_value(default)
            rows.append((f"htdemucs.{key}", typed, f"htdemucs.{key}", value))
            if key in ALIASES:                         # the top-level spelling too
                rows.append((key, typed, f"htdemucs.{key}", value))
    return rows


ALL_KEYS = GUIDE_KEYS + _lora_keys()


@pytest.fixture(scope="module")
def main():
    from demucs_lora.train import main
    return main


def _value_text(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(value) + "]"
    if isinstance(value, str) and value[:1].isdigit():
        return f"'{value}'"
    return str(value)


@pytest.mark.parametrize("spelling,typed,canonical,value", ALL_KEYS,
                         ids=[f"{r[0]}={r[1]}" for r in ALL_KEYS])
def test_each_guide_key_takes_effect_or_is_refused(main, spelling, typed, canonical, value):
    try:
        xp = main.get_xp([f"{spelling}={typed}"])
    except ConfigError as exc:
        assert spelling in str(exc)
        return
    cfg = canonical_checked(xp.cfg, xp.argv)
    assert OmegaConf.select(cfg, canonical) == value
    if spelling != canonical:
        assert OmegaConf.select(cfg, spelling, default="<absent>") == "<absent>"
    same = main.get_xp([f"{canonical}={_value_text(value)}"])
    assert xp.sig == same.sig
    if not canonical.startswith("misc."):      # misc.* is not part of the signature
        assert xp.sig != main.get_xp([]).sig


def test_alias_and_canonical_give_one_signature_in_any_order(main):
    a = main.get_xp(["htdemucs.batch_size=8", "optim.scheduler=linear", "sources=[a,b]"])
    b = main.get_xp(["dset.sources=[a,b]", "batch_size=8", "optim.schedule=linear"])
    assert a.sig == b.sig
    # Two spellings of one key: refused, naming both (one spelling twice: last wins).
    for argv in (["htdemucs.segment=12", "dset.segment=1"], ["lora_rank=4",
                                                             "htdemucs.lora_rank=8"]):
        with pytest.raises(ConfigError, match=rf"{argv[0].split('=')[0]} and "
                                              rf"{argv[1].split('=')[0]} are two spellings"):
            main.get_xp(argv)
    assert main.get_xp(["dset.segment=12", "dset.segment=1"]).sig == \
        main.get_xp(["dset.segment=1"]).sig


def test_unknown_keys_on_the_command_line(main):
    with pytest.raises(ConfigError, match=r"htdemucs.lora_rnk .*did you mean htdemucs.lora_rank"):
        main.get_xp(["htdemucs.lora_rnk=8"])
    with pytest.raises(ConfigError, match=r"unknown key htdemucs.foo"):
        main.get_xp(["+htdemucs.foo=1"])
    with pytest.raises(ConfigError, match=r"lr .*did you mean optim.lr"):
        main.get_xp(["lr=1e-4"])
    with pytest.raises(ConfigError, match=r"htdemucs.precision='int4': allowed values"):
        main.get_xp(["htdemucs.precision=int4"])


def test_hydra_errors_are_one_screen(main):
    with pytest.raises(ConfigError) as exc:
        main.get_xp(["model=nope"])
    text = str(exc.value)
    assert "Could not find 'model/nope'" in text and "htdemucs_tiny" in text
    assert len(text.splitlines()) < 12 and "provider=" not in text
    with pytest.raises(ConfigError, match="override"):
        main.get_xp(["epochs=[1"])


def test_signature_values_stay_strings(main):
    for sig in ("955717e8", "12345678", "1e5", "0x1f", "true"):
        xp = main.get_xp([f"continue_from={sig}", f"pretrained_repo={sig}"])
        assert xp.cfg.continue_from == sig and xp.cfg.pretrained_repo == sig
    assert main.get_xp(["continue_from=null"]).cfg.continue_from is None
    assert normalize_argv(["dset.wav=/my data/it's"]) == ["dset.wav='/my data/it\\'s'"]
    assert main.get_xp(["dset.wav=/my data/it's"]).cfg.dset.wav == "/my data/it's"


def test_dset_wav_group_signs(main):
    """`dset=wav` has a required (???) dset.wav: Dora's comparison must not read it."""
    a = main.get_xp(["dset=wav", "dset.wav=/data/a"])
    b = main.get_xp(["dset=wav", "dset.wav=/data/b"])
    assert a.sig != b.sig and a.cfg.dset.wav == "/data/a"
    assert main.get_xp(["dset=wav"]).sig not in (a.sig, b.sig)


def test_every_group_option_only_uses_known_keys():
    """The known keys come from the default composition: other options add none."""
    from demucs_lora.config.keys import unknown_keys
    from demucs_lora.config.schema import load_group_file
    for group in ("model", "dset", "optim", "variant"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            data = load_group_file(path)
            assert unknown_keys(OmegaConf.create(data)) == [], path


def test_alias_doc_lists_every_alias():
    readme = (REPO / "docs" / "aliases.md").read_text()
    for alias, entry in ALIASES.items():
        assert f"| `{alias}` | `{entry.canonical}` |" in readme, alias


# ----------------------------------------------------------------------------- YAML
GUIDE_BLOCKS = {
    # "Extended Source Separation Configuration"
    "five_source": ("""
dset:
  sources: ["other", "kick", "vocals", "bass", "hihat"]  # 5-source configuration
  sample_rate: 44100  # Match your audio files
  channels: 2  # Stereo processing
htdemucs:
  lora_rank_mode: heuristic
  lora_rank: 8
  layer_ranks:
    "encoder.0.*": 16
    "encoder.1.*": 12
    "transformer.*": 12
    "decoder.0.*": 12
    "decoder.1.*": 8
    "decoder.2.*": 6
  nfft: 4096
  segment: 12
  hop_length: 1024
  batch_size: 32
  gradient_clip: 0.5
  mixed_precision: true
""", {"dset.sources": ["other", "kick", "vocals", "bass", "hihat"],
      "dset.samplerate": 44100, "dset.channels": 2, "htdemucs.lora_rank_mode": "heuristic",
      "htdemucs.lora_rank": 8, "htdemucs.layer_ranks": {
          "encoder.0.*": 16, "encoder.1.*": 12, "transformer.*": 12, "decoder.0.*": 12,
          "decoder.1.*": 8, "decoder.2.*": 6},
      "htdemucs.nfft": 4096, "dset.segment": 12, "htdemucs.hop_length": 1024,
      "batch_size": 32, "optim.clip_grad": 0.5, "mixed_precision": True}),
    # "Configuration Setup"
    "dataset": ("""
dset:
  wav: "path/to/tech_house_data"
  sources: ["drums", "bass", "other", "vocals"]
  sample_rate: 44100
  channels: 2
""", {"dset.wav": str(Path.cwd() / "path/to/tech_house_data"), "dset.samplerate": 44100,
      "dset.sources": ["drums", "bass", "other", "vocals"]}),
    # "Basic Parameters"
    "basic": ("""
htdemucs:
  lora_rank: 4
  lora_alpha: 1.0
  lora_dropout: 0.1
  lora_rank_mode: heuristic
  layer_ranks:
    "encoder.0.*": 16
    "transformer.*": 12
    "decoder.*": 4
  lora_max_rank: 16
""", {"htdemucs.lora_rank": 4, "htdemucs.lora_alpha": 1.0, "htdemucs.lora_dropout": 0.1,
      "htdemucs.lora_rank_mode": "heuristic", "htdemucs.lora_max_rank": 16}),
    # "Rank Allocation Modes" (dotted keys written inside YAML)
    "uniform": ("htdemucs.lora_rank_mode: uniform\nhtdemucs.lora_rank: 4\n",
                {"htdemucs.lora_rank_mode": "uniform", "htdemucs.lora_rank": 4}),
    "heuristic": ("htdemucs.lora_rank_mode: heuristic\nhtdemucs.lora_rank: 4\n",
                  {"htdemucs.lora_rank_mode": "heuristic", "htdemucs.lora_rank": 4}),
    # ... without lora_rank: LoRA-only keys on a full fine-tune are refused
    "gradient": ("htdemucs.lora_rank_mode: gradient\nhtdemucs.min_rank: 2\n"
                 "htdemucs.max_rank: 16\n",
                 ConfigError("htdemucs.lora_rank_mode, htdemucs.min_rank, htdemucs.max_rank "
                             "set, but htdemucs.lora_rank=0")),
    # "Genre-Optimized Configuration"
    "genre": ("""
htdemucs:
  nfft: 4096
  segment: 15
  hop_length: 1024
  lora_rank: 8
  lora_alpha: 0.8
  lora_dropout: 0.1
  layer_ranks:
    "encoder.0.*": 16
    "encoder.1.*": 12
    "transformer.*": 12
    "decoder.*": 8
  batch_size: 32
  gradient_clip: 0.5
  mixed_precision: true
""", {"dset.segment": 15, "htdemucs.lora_alpha": 0.8, "batch_size": 32,
      "optim.clip_grad": 0.5, "mixed_precision": True, "htdemucs.hop_length": 1024}),
    # "Training Configuration" (t_dropout: an HTDemucs argument outside conf/)
    "training": ("""
htdemucs:
  channels: 48
  growth: 2
  depth: 4
  t_layers: 5
  t_heads: 8
  t_dropout: 0.0
  lora_rank: 4
  lora_alpha: 1.0
  lora_dropout: 0.1
  enable_checkpointing: true
  enable_profiling: false
""", {"htdemucs.channels": 48, "htdemucs.t_dropout": 0.0, "htdemucs.lora_alpha": 1.0,
      "htdemucs.lora_rank": 4, "enable_checkpointing": True, "enable_profiling": False}),
    # "Layer-Specific Ranks": the block alone leaves lora_rank at 0, a full fine-tune
    "layer_ranks": ("""
htdemucs:
  layer_ranks:
    # Encoder layers
    "encoder.0.*": 16    # First encoder (critical)
    "encoder.1.*": 12    # Second encoder
    # Transformer layers
    "transformer.self_attn.*": 8
    "transformer.cross_attn.*": 12
    # Decoder layers
    "decoder.0.*": 8     # First decoder
    "decoder.1.*": 6     # Second decoder
    "decoder.2.*": 4     # Final decoder
""", ConfigError("htdemucs.layer_ranks set, but htdemucs.lora_rank=0 is a full fine-tune")),
    "checkpointing": ("htdemucs.enable_checkpointing: true\n", {"enable_checkpointing": True}),
    "mixed_precision": ("htdemucs.mixed_precision: true\n", {"mixed_precision": True}),
    "batch": ("batch_size: 32  # Reduce if OOM errors occur\n", {"batch_size": 32}),
    "profiling": ("htdemucs:\n  enable_profiling: true\n  profile_memory: true\n",
                  {"enable_profiling": True, "profile_memory": True}),
    "segments": ("segment: 10\nuse_train_segment: true\n",
                 {"dset.segment": 10, "htdemucs.use_train_segment": True}),
    "convergence": ("optim.lr: 2e-4\noptim.warmup_steps: 2000\n",
                    {"optim.lr": 2e-4, "optim.warmup_steps": 2000}),
    "data_loading": ("dset:\n  num_workers: 4\n  prefetch_factor: 2\n  pin_memory: True\n",
                     {"misc.num_workers": 4, "misc.prefetch_factor": 2,
                      "misc.pin_memory": True}),
    # Refused, each naming its key: an expression, a value that is not a number, a
    # mapping that repeats a key.
    "oom": ("htdemucs.enable_checkpointing: true\nbatch_size: batch_size // 2\n",
            ConfigError("batch_size")),
    "instability": ("htdemucs.lora_alpha: min(lora_alpha, dim // n_heads)\n"
                    "htdemucs.gradient_clip: 1.0\n", ConfigError("htdemucs.lora_alpha")),
    "lr_guidelines": ("optim:\n  lr: 1e-4\n  warmup_steps: 1000\n  scheduler: cosine\n"
                      "  lr: 5e-5\n  warmup_steps: 500\n  scheduler: linear\n",
                      ConfigError("lr")),
}
PACKAGE = "# @package _global_\n"


@pytest.fixture(scope="module")
def guide_conf(tmp_path_factory):
    """A copy of conf/ whose variant group holds each guide block, with and without the
    package header, and a Dora main on it."""
    root = tmp_path_factory.mktemp("guide_conf")
    conf = root / "conf"
    shutil.copytree(CONF_DIR, conf)
    for name, (text, _) in GUIDE_BLOCKS.items():
        (conf / "variant" / f"guide_{name}.yaml").write_text(PACKAGE + text)
        (conf / "variant" / f"guide_{name}_nohead.yaml").write_text(text)
    pkg = root / "guide_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "entry.py").write_text("def main(cfg):\n    return cfg\n")
    sys.path.insert(0, str(root))
    try:
        from guide_pkg.entry import main as entry
        from demucs_lora.train import _LoRAHydraMain
        yield _LoRAHydraMain(entry, config_name="config", config_path=str(conf),
                             version_base="1.3")
    finally:
        sys.path.remove(str(root))


def _run_config(main, variant):
    """The config a run would use (prepare_config: canonical, known, checked)."""
    from demucs_lora.config.resolve import prepare_config
    argv = [f"variant={variant}", "continue_from=htdemucs"]
    xp = main.get_xp(argv)
    return prepare_config(xp.cfg)


@pytest.mark.parametrize("name", sorted(GUIDE_BLOCKS))
def test_guide_yaml_block_as_variant(guide_conf, name):
    text, expected = GUIDE_BLOCKS[name]
    if isinstance(expected, ConfigError):
        with pytest.raises(ConfigError, match=str(expected).replace(".", r"\.")):
            _run_config(guide_conf, f"guide_{name}")
        return
    cfg = _run_config(guide_conf, f"guide_{name}")
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, key
    for alias in ALIASES:                     # only canonical keys in the resolved config
        if alias not in (e.canonical for e in ALIASES.values()):
            assert OmegaConf.select(cfg, alias, default="<absent>") == "<absent>", alias


@pytest.mark.parametrize("name", sorted(GUIDE_BLOCKS))
def test_guide_yaml_block_without_package_header_is_refused(guide_conf, name):
    text, _ = GUIDE_BLOCKS[name]
    with pytest.raises(ConfigError) as exc:
        _run_config(guide_conf, f"guide_{name}_nohead")
    message = str(exc.value)
    if "duplicate key" not in message:
        assert "variant." in message and "# @package _global_" in message


def test_yaml_alias_loses_to_the_canonical_key_on_the_command_line():
    cfg = OmegaConf.create({"batch_size": 4, "htdemucs": {"batch_size": 32}})
    assert canonical_config(cfg).batch_size == 32
    assert canonical_config(cfg, cli_keys=["batch_size"]).batch_size == 4


# ------------------------------------------------------------ pasted into config.yaml
def _main_on(conf):
    from demucs_lora.train import _LoRAHydraMain, run
    return _LoRAHydraMain(run, config_name="config", config_path=str(conf),
                          version_base="1.3")


@pytest.mark.parametrize("name", sorted(GUIDE_BLOCKS))
def test_guide_yaml_block_pasted_into_config_yaml(tmp_path, name):
    """Where the guide says to put its blocks: at the end of conf/config.yaml (`_self_` is
    last in its defaults list, so they win over the groups and the variant)."""
    text, expected = GUIDE_BLOCKS[name]
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / "config.yaml", "a") as file:
        file.write(text)
    if isinstance(expected, ConfigError):
        with pytest.raises(ConfigError, match=str(expected).replace(".", r"\.")):
            _run_config(_main_on(conf), "default")
        return
    main = _main_on(conf)
    for variant in ("default", "debug", "finetune"):
        cfg = _run_config(main, variant)
        for key, value in expected.items():
            got = OmegaConf.select(cfg, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == value, (variant, key)


def test_config_yaml_keys_win_over_groups_and_variants_and_lose_to_the_command_line(
        tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / "config.yaml", "a") as file:
        file.write("epochs: 7\nhtdemucs:\n  lora_rank: 4\n")
    main = _main_on(conf)
    assert main.get_xp(["variant=debug"]).cfg.epochs == 7          # debug sets epochs: 2
    assert main.get_xp(["variant=debug"]).cfg.batch_size == 2      # the variant's own
    assert main.get_xp(["model=htdemucs_tiny"]).cfg.htdemucs.lora_rank == 4
    assert main.get_xp(["epochs=3"]).cfg.epochs == 3
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text() + "epochz: 1\n")
    with pytest.raises(ConfigError, match="unknown key epochz .*did you mean epochs"):
        _main_on(conf).get_xp([])
