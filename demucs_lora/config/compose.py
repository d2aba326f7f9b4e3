"""``conf/config.yaml`` composed with overrides outside a Hydra run (the CLIs, the tests).

Why one function: ``tools.test_pretrained``, ``tools.verify_dataset``, the benchmarks and
the tests compose the same config the same way as ``dora run`` does (the guide's spellings
accepted, unknown keys refused), and Hydra's own errors become one ``ConfigError``.
"""
from __future__ import annotations

import contextlib
import typing as tp

from demucs_lora.config.keys import (canonical_checked, check_one_spelling, hydra_error,
                                     is_hydra_error, prepare_argv)
from demucs_lora.core.errors import ConfigError, ModelLoadError
from demucs_lora.core.paths import CONF_DIR

if tp.TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from omegaconf import DictConfig


def compose(overrides: tp.Sequence[str] = ()) -> "DictConfig":
    """The config of ``overrides`` (no Hydra run, no chdir); ConfigError on a bad one."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    check_one_spelling(overrides)
    overrides = prepare_argv(overrides)
    if not CONF_DIR.is_dir():
        raise ConfigError(f"no Hydra config folder at {CONF_DIR}: run from a source checkout")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with hydra_errors_as_config_errors(), initialize_config_dir(
            config_dir=str(CONF_DIR), version_base="1.3", job_name="demucs_lora"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return canonical_checked(cfg, overrides)


@contextlib.contextmanager
def hydra_errors_as_config_errors():
    """A Hydra/OmegaConf/YAML error raised inside (bad override syntax, unknown group or
    value) becomes one ConfigError, so that a CLI boundary reports it as a config error."""
    try:
        yield
    except Exception as exc:
        if not is_hydra_error(exc):
            raise
        raise hydra_error(exc) from None


def load_xp_config(path: "Path") -> "DictConfig":
    """An XP's saved ``config.yaml``; ModelLoadError when it is torn or not YAML."""
    from omegaconf import OmegaConf
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # yaml errors of a torn or edited file
        raise ModelLoadError(f"{path} is not readable YAML ({exc}); run the XP again "
                             "(`dora run` rewrites it) or restore it") from None
