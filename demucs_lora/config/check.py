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

from demucs_lora.core.errors import ConfigError

CHOICES = {
    "htdemucs.lora_rank_mode": ("uniform", "heuristic", "gradient"),
    "htdemucs.lora_bias": ("none", "lora_only", "all"),
    "optim.optim": ("adam", "adamw"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.loss": ("l1", "mse"),
    "mixed_precision": (False, True, "bf16", "fp16"),
    "htdemucs.lora_save_dtype": ("float32", "float16", "bfloat16"),
    "device": ("auto", "cpu", "cuda"),
}
TARGET_GROUPS = ("encoder", "decoder", "transformer", "upsampler", "freq_emb")
PATH_KEYS = ("dset.wav", "dset.metadata", "pretrained_repo")


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check_number(cfg, key: str, low: float, integer: bool = False, high=None) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < low or (high is not None and value > high):
        bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r}: must be {kind} {bound}")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad key (before data or model are touched)."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values are {list(allowed)}")
    lcfg = cfg.htdemucs
    for key, low in (("htdemucs.lora_rank", 0), ("htdemucs.lora_max_rank", 1),
                     ("htdemucs.min_rank", 1), ("htdemucs.max_rank", 1),
                     ("htdemucs.lora_gradient_batches", 1), ("epochs", 0),
                     ("batch_size", 1), ("optim.warmup_steps", 0)):
        _check_number(cfg, key, low, integer=True)
    for key in ("optim.lr", "optim.clip_grad", "optim.weight_decay", "htdemucs.lora_alpha"):
        _check_number(cfg, key, 0.0)
    _check_number(cfg, "htdemucs.lora_dropout", 0.0, high=1.0)
    _check_number(cfg, "optim.ema", 0.0, high=1.0)
    _check_number(cfg, "dset.segment", 0.01)
    if lcfg.min_rank > lcfg.max_rank:
        raise ConfigError(f"htdemucs.min_rank={lcfg.min_rank} > htdemucs.max_rank="
                          f"{lcfg.max_rank}: min_rank must not exceed max_rank")
    targets = list(lcfg.lora_targets)
    bad = [t for t in targets if t not in TARGET_GROUPS]
    if bad or not targets:
        raise ConfigError(f"htdemucs.lora_targets={targets}: allowed groups are "
                          f"{list(TARGET_GROUPS)} (at least one)")
    qkv = list(lcfg.lora_enable_qkv)
    if len(qkv) != 3 or not all(isinstance(x, bool) for x in qkv):
        raise ConfigError(f"htdemucs.lora_enable_qkv={qkv}: give three booleans [q, k, v]")
    if lcfg.layer_ranks is not None and not isinstance(lcfg.layer_ranks, DictConfig):
        raise ConfigError(f"htdemucs.layer_ranks={lcfg.layer_ranks!r}: give a mapping "
                          "glob -> rank, e.g. htdemucs.layer_ranks='{encoder.0.*:4}'")
    sources = cfg.dset.sources  # null: the base's (resolved once the base is loaded)
    sources = list(sources) if sources is not None else None
    if sources is not None and (len(set(sources)) != len(sources) or not sources):
        raise ConfigError(f"dset.sources={sources}: names must be unique and non-empty")
    if cfg.residual_source is not None and sources is not None and \
            cfg.residual_source not in sources:
        raise ConfigError(f"residual_source={cfg.residual_source!r} must be one of "
                          f"dset.sources={sources}")
    if cfg.weights is not None and sources is not None and len(cfg.weights) != len(sources):
        raise ConfigError(f"weights={list(cfg.weights)}: give one weight per source "
                          f"({len(sources)}: {sources}) or null")
    if cfg.source_init is not None and not isinstance(cfg.source_init, DictConfig):
        raise ConfigError(f"source_init={cfg.source_init!r}: give a mapping new_source -> "
                          "base source(s), e.g. source_init='{kick: drums, hihat: drums}'")
    from demucs_lora.config.values import check_value_ranges  # value ranges (issue 15)
    check_value_ranges(cfg)


def resolve_paths(cfg: DictConfig, cwd: tp.Optional[Path] = None) -> DictConfig:
    """A copy of `cfg` whose user paths are absolute (relative to `cwd`)."""
    cwd = Path(cwd or os.environ.get("DEMUCS_LORA_CWD") or Path.cwd())
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(out, False)
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str) and value and not value.startswith("???"):
            path = Path(value).expanduser()
            OmegaConf.update(out, key, str(path if path.is_absolute() else cwd / path))
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
