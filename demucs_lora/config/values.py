"""Config values that would be accepted and then do nothing, or fail after an epoch.

`check_value_ranges(cfg)` runs inside `config.check.check_config`, before any data or
model is touched; every error names the key, the value and what is allowed.
`check_base_values(cfg, base)` runs once the base is loaded and before the (synthetic)
data is generated and verified: the checks that need the base's sources and layers.
`segment_warnings` tells when ``dset.segment`` does not suit the tracks.
"""
from __future__ import annotations

import logging
import typing as tp

from omegaconf import DictConfig, OmegaConf

from demucs_lora.core.checks import check_choice, is_number, value_error
from demucs_lora.data.layout import MIXTURE_MODES
from demucs_lora.data.roots import check_valid_tracks
from demucs_lora.core.plain import plain
from demucs_lora.lora.config import LoraConfig

logger = logging.getLogger(__name__)


def config_value(cfg: DictConfig, key: str) -> tp.Any:
    """The value at dotted `key`, None when it is absent or `???` (never raises)."""
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _require(cfg: DictConfig, key: str, ok: tp.Callable[[tp.Any], bool], allowed: str,
             why: str = "", optional: bool = False) -> None:
    value = config_value(cfg, key)
    if optional and value is None:
        return
    if not ok(value):
        raise value_error(key, value, f"must be {allowed}" + (f" ({why})" if why else ""))


# The keys no lower room owns, with their allowed values (``dset.mixture``: data.layout's).
CHOICES = {
    "optim.optim": ("adam", "adamw"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.loss": ("l1", "mse"),
    "mixed_precision": (False, True, "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "dset.mixture": MIXTURE_MODES,
}
# (key, predicate, allowed, why, null allowed); dset.valid_tracks: data.roots' rule.
RANGES: tp.Sequence[tp.Tuple[str, tp.Callable[[tp.Any], bool], str, str, bool]] = (
    ("epochs", lambda v: is_number(v, True) and v >= 1, "an integer >= 1",
     "epochs=0 trains nothing", False),
    ("batch_size", lambda v: is_number(v, True) and v >= 1, "an integer >= 1", "", False),
    ("max_batches", lambda v: is_number(v, True) and v >= 1, "null or an integer >= 1",
     "batches per epoch", True),
    ("train_budget_seconds", lambda v: is_number(v) and v >= 0, "null or a number >= 0",
     "seconds of training", True),
    ("optim.lr", lambda v: is_number(v) and v > 0, "a finite number > 0",
     "lr=0 leaves the model as it started", False),
    ("optim.ema", lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)",
     "ema=1 never moves the averaged weights: the saved adapters would stay at lora_init",
     False),
    ("optim.clip_grad", lambda v: is_number(v) and v >= 0, "a finite number >= 0 (0 = off)",
     "", False),
    ("optim.weight_decay", lambda v: is_number(v) and v >= 0, "a finite number >= 0", "",
     False),
    ("optim.warmup_steps", lambda v: is_number(v, True) and v >= 0, "an integer >= 0",
     "", False),
    ("optim.accumulate", lambda v: is_number(v, True) and v >= 1, "an integer >= 1",
     "micro-batches per optimizer step", False),
    ("optim.lora_plus_ratio", lambda v: is_number(v) and v > 0, "a finite number > 0",
     "LoRA+: the lr of the B factors is this times the lr of A; 1 = plain LoRA", False),
    ("optim.skip_nonfinite", lambda v: is_number(v, True) and v >= 0, "an integer >= 0",
     "NaN/inf steps skipped per epoch", True),
    ("test.every", lambda v: is_number(v, True) and v >= 1, "an integer >= 1",
     "validate every N epochs", False),
    ("test.shifts", lambda v: is_number(v, True) and v >= 0, "an integer >= 0",
     "random shifts averaged at validation", False),
    ("test.overlap", lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)",
     "overlap between chunks", False),
    ("dset.segment", lambda v: is_number(v) and v >= 0.01,
     "a finite number of seconds >= 0.01", "", False),
    ("dset.shift", lambda v: is_number(v) and v >= 0, "a number of seconds >= 0",
     "hop between training segments", True),
    ("dset.sum_tolerance", lambda v: is_number(v) and v >= 0, "a number >= 0",
     "relative L1 error allowed between the stems' sum and the mixture", True),
    ("dset.augment.repitch.proba", lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]",
     "0 = off", True),
    ("dset.augment.repitch.max_pitch", lambda v: is_number(v, True) and 0 <= v <= 12,
     "an integer in [0, 12]", "semitones", True),
    ("dset.augment.repitch.max_tempo", lambda v: is_number(v) and 0 <= v < 50, "in [0, 50)",
     "percent", True),
    ("dset.augment.repitch.tempo_std", lambda v: is_number(v) and v >= 0, "a number >= 0",
     "percent", True),
    ("misc.num_workers", lambda v: is_number(v, True) and v >= 0, "an integer >= 0",
     "data loading processes", False),
    ("misc.prefetch_factor", lambda v: is_number(v, True) and v >= 1, "an integer >= 1", "",
     True),
)


def check_value_ranges(cfg: DictConfig, keys: tp.Optional[tp.Collection[str]] = None
                       ) -> None:
    """Raise ConfigError on the first key (of ``keys``, default all) whose value is out of
    range (see RANGES)."""
    for key, ok, allowed, why, optional in RANGES:
        if keys is None or key in keys:
            _require(cfg, key, ok, allowed, why, optional)
    if keys is None or "dset.valid_tracks" in keys:
        check_valid_tracks(config_value(cfg, "dset.valid_tracks"))


def check_choices(cfg: DictConfig) -> None:
    """ConfigError on the first key of CHOICES whose value is not one of its own."""
    for key, allowed in CHOICES.items():
        check_choice(config_value(cfg, key), key, allowed)


def check_base_values(cfg: DictConfig, base: tp.Any) -> None:
    """The checks that need the base model: `source_init` against its sources and the
    `htdemucs.layer_ranks` globs against its layers (ConfigError naming the key)."""
    from demucs_lora.lora.targets import lora_target_names
    from demucs_lora.models.heads import source_plan
    if base is None:  # a new model: its layers follow the config
        return
    base = getattr(base, "models", [base])[0]  # a bag: the globs apply to every member
    sources = list(config_value(cfg, "dset.sources") or config_value(cfg, "sources") or base.sources)
    source_init = config_value(cfg, "source_init")
    source_plan(list(base.sources), sources, plain(source_init))
    config = LoraConfig.from_cfg(cfg.htdemucs)
    if config.lora_rank <= 0 or config.layer_ranks is None:
        return
    from demucs_lora.lora.ranks import apply_layer_ranks
    apply_layer_ranks({n: 0 for n in lora_target_names(base, config.lora_targets)}, config)


def segment_warnings(durations: tp.Mapping[str, float], segment: float) -> tp.List[str]:
    """Warnings when dset.segment is longer than the tracks (training on zero padding)."""
    if not durations:
        return []
    short = sorted(name for name, seconds in durations.items() if seconds < segment)
    lines = []
    if len(short) * 2 > len(durations):
        median = sorted(durations.values())[len(durations) // 2]
        lines.append(f"dset.segment={segment:g}s is longer than most train tracks (median "
                     f"{median:.3g}s): examples are mostly zero padding, which costs "
                     "compute and teaches silence; lower dset.segment")
    elif short:
        lines.append(f"{len(short)} train track(s) are shorter than dset.segment={segment:g}s "
                     f"and are zero-padded (e.g. {', '.join(short[:3])})")
    return lines
