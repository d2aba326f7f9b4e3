"""Group options that inherit another one (`defaults: [x]`) compose as if written out.

A key is written once (wav.yaml holds the dset keys, adam.yaml the optim keys); these tests
pin what each option composes to, and that keys.py reads a group file as Hydra does."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from demucs_lora.core.paths import CONF_DIR


def composed(*overrides: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


def changed(a: dict, b: dict, prefix: str = "") -> dict:
    """The dotted keys whose values differ between a and b: {key: (a's, b's)}."""
    out = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(changed(x, y, f"{prefix}{key}."))
        elif x != y:
            out[f"{prefix}{key}"] = (x, y)
    return out


@pytest.mark.parametrize("base, option, delta", [
    ("dset=synth", "dset=wav", {"dset.wav": (None, "???"), "dset.segment": (2.0, 7.8)}),
    ("dset=synth", "dset=five_stem", {"dset.synth.domain": ("A", "B"),
                                      "dset.synth.stems": (None, 5)}),
    ("optim=adam", "optim=adamw", {"optim.optim": ("adam", "adamw"),
                                   "optim.weight_decay": (0.0, 0.01)}),
])
def test_an_inheriting_option_changes_only_its_own_keys(base, option, delta):
    assert changed(composed(base), composed(option)) == delta


def test_the_wav_option_keeps_its_required_folder():
    """`???` never overrides a set value in a merge: wav.yaml must be the base of synth."""
    cfg = composed("dset=wav")
    assert cfg["dset"]["wav"] == "???" and cfg["dset"]["augment"]["remix"] is True


@pytest.mark.parametrize("group", ["dset", "optim"])
def test_keys_reads_each_group_file_as_hydra_composes_it(group):
    from demucs_lora.config.schema import load_group_file
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        read = load_group_file(path)[group]
        assert read == composed(f"{group}={path.stem}")[group], path
