"""Validate a composed config before anything heavy starts, and resolve user paths.

Every error names the key, the bad value and the allowed values. Hydra keeps the
working directory here (hydra.job.chdir=false) but Slurm jobs may not, so user paths
are made absolute once, against the directory the user ran the command from.
"""
from __future__ import annotations

import json
import os
import re
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.values import check_choices, check_value_ranges, config_value
from demucs_lora.core.checks import is_number
from demucs_lora.core.errors import ConfigError
from demucs_lora.data.layout import check_residual_source
from demucs_lora.lora.config import LoraConfig

PATH_KEYS = ("dset.wav", "dset.musdb", "dset.metadata", "pretrained_repo")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad key (before data or model are touched); the
    htdemucs LoRA keys are checked by building their `LoraConfig`."""
    LoraConfig.from_cfg(cfg.htdemucs).check_for_run()
    check_choices(cfg)
    sources = cfg.dset.sources  # null: the base's (resolved once the base is loaded)
    sources = list(sources) if sources is not None else None
    if sources is not None and (len(set(sources)) != len(sources) or not sources):
        raise ConfigError(f"dset.sources={sources}: names must be unique and non-empty")
    check_residual_source(cfg.residual_source, sources)
    check_weights(cfg.weights, sources)
    if cfg.source_init is not None and not isinstance(cfg.source_init, DictConfig):
        raise ConfigError(f"source_init={cfg.source_init!r}: give a mapping new_source -> "
                          "base source(s), e.g. source_init='{kick: drums, hihat: drums}'")
    check_value_ranges(cfg)  # every number's range


def check_weights(weights: tp.Any, sources: tp.Optional[tp.Sequence[str]]) -> None:
    """`weights` (per-source loss weights): null, or finite numbers >= 0 with a positive
    sum, one per source once the sources are known (`sources` None: not yet, the base's:
    checked again against them, config.resolve.resolve_with_base)."""
    if weights is None:
        return
    values = list(weights) if OmegaConf.is_list(weights) or isinstance(weights, (list, tuple)) \
        else None
    if values is None or not all(is_number(w) and w >= 0 for w in values) \
            or not sum(values) > 0:
        raise ConfigError(f"weights={weights!r}: give a list of finite numbers >= 0 (not all "
                          "0), one per source, or null")
    if sources is not None and len(values) != len(sources):
        raise ConfigError(f"weights={values}: give one weight per source "
                          f"({len(sources)}: {list(sources)}) or null")


def resolve_paths(cfg: DictConfig, cwd: tp.Optional[Path] = None) -> DictConfig:
    """A copy of `cfg` whose user paths are absolute (relative to `cwd`)."""
    cwd = Path(cwd or os.environ.get("DEMUCS_LORA_CWD") or Path.cwd())
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(out, False)
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else cwd / path)

    for key in PATH_KEYS:
        value = config_value(cfg, key)
        if isinstance(value, str) and value and not value.startswith("???"):
            OmegaConf.update(out, key, absolute(value))
        elif OmegaConf.is_list(value):              # dset.wav=[A, B]
            OmegaConf.update(out, key, [absolute(str(v)) for v in value], merge=False)
    cont = cfg.continue_from
    if isinstance(cont, str) and (cont.endswith(".th") or "/" in cont):
        path = Path(cont).expanduser()
        out.continue_from = str(path if path.is_absolute() else cwd / path)
    return out


_DICT_OVERRIDE = re.compile(r"^([+~]*[\w.]+)=(\{.*\})$")


def _hydra_dict(value: dict) -> str:
    def item(v):
        if isinstance(v, dict):
            return _hydra_dict(v)
        if isinstance(v, list):
            return "[" + ",".join(item(x) for x in v) + "]"
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return "{" + ",".join(f"{k}:{item(v)}" for k, v in value.items()) + "}"


def normalize_overrides(argv: tp.Sequence[str]) -> tp.List[str]:
    """Accept JSON-style dict overrides (`htdemucs.layer_ranks='{"encoder.0.*":4}'`, as the
    demucs LoRA guides write them): Hydra's grammar has no quoted dict keys, so they are
    rewritten to its own form `{encoder.0.*:4}`. Everything else is left as is."""
    out = []
    for arg in argv:
        match = _DICT_OVERRIDE.match(arg)
        if match and '"' in match.group(2):
            try:
                value = json.loads(match.group(2))
            except json.JSONDecodeError:
                out.append(arg)
                continue
            arg = f"{match.group(1)}={_hydra_dict(value)}"
        out.append(arg)
    return out
