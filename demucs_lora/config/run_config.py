"""The typed run config: the composed Hydra config turned, once, into frozen dataclasses.

The raw `DictConfig` stops here and at the entry points (`train.py`, the commands): each
room gets its own piece, typed, and is testable without Hydra:

    data  -> DataConfig  (data/settings.py: dset.* + residual_source)
    model -> ModelSpec   (models/spec.py: continue_from, htdemucs.*, sources, source_init)
    lora  -> LoraConfig  (lora/config.py: htdemucs.lora_*; also model.lora)
    optim, test, misc    (here: the training loop's pieces, read by training/)

Defaults live once, in conf/ YAML (settings.yaml and the groups): users read and paste
YAML, Dora signs command-line overrides against it, and `dora grid` sweeps its keys. The
dataclasses below declare no defaults, so a key missing from conf/ is a loud TypeError
here, not a second default (docs/development.md, "Config: defaults in YAML, typed pieces
at the door").
Values are checked before this (config/check.py, config/values.py, LoraConfig); building
a piece only converts.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from omegaconf import DictConfig, OmegaConf

from demucs_lora.core.plain import plain
from demucs_lora.data.settings import DataConfig, from_node
from demucs_lora.lora.config import LoraConfig
from demucs_lora.models.spec import BaseSpec, ModelSpec, sources_or_base


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optim.* (conf/optim/*.yaml)."""
    optim: str
    lr: float
    betas: tp.Tuple[float, float]
    weight_decay: float
    warmup_steps: int
    schedule: str
    clip_grad: float
    ema: float
    loss: str
    accumulate: int
    lora_plus_ratio: float
    skip_nonfinite: int


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """test.* (conf/settings.yaml): validation and test separation."""
    __test__ = False  # not a pytest test class
    every: int
    shifts: int
    overlap: float
    split: bool
    best: bool
    initial: bool


@dataclasses.dataclass(frozen=True)
class MiscConfig:
    """misc.*: loader workers and logging (not part of the XP signature)."""
    num_workers: int
    prefetch_factor: int
    pin_memory: bool
    num_prints: int
    show: bool


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, typed. Top-level names mirror conf/settings.yaml's keys."""
    model: ModelSpec
    dset: DataConfig
    optim: OptimConfig
    test: TestConfig
    misc: MiscConfig
    seed: int
    epochs: int
    batch_size: int
    max_batches: tp.Optional[int]
    train_budget_seconds: tp.Optional[float]
    mixed_precision: tp.Union[bool, str]
    enable_checkpointing: bool
    enable_profiling: bool
    profile_memory: bool
    device: str
    weights: tp.Optional[tp.Tuple[float, ...]]
    # The composed config itself, stored with best.th as demucs' `training_args` (what
    # demucs.pretrained users find there); no room reads it.
    training_args: tp.Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def lora(self) -> LoraConfig:
        return self.model.lora

    @property
    def base(self) -> BaseSpec:
        return self.model.base


def _typed(cls, node) -> tp.Any:
    """`cls` from its node, field for key: a key without a field (or a field without a
    key in conf/) is a TypeError naming it, so the YAML and the class cannot drift."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in dict(plain(node)).items()})


def data_config(cfg: DictConfig, sources: tp.Optional[tp.Sequence[str]] = None
                ) -> DataConfig:
    """The data room's piece (`sources`: the run's stems, else dset.sources or the 4
    demucs stems)."""
    return from_node(plain(cfg.dset), cfg.get("residual_source"), sources)


def architecture_kwargs(cfg: DictConfig) -> tp.Dict[str, tp.Any]:
    """HTDemucs constructor kwargs from the config (the htdemucs.* keys that HTDemucs
    takes; the lora keys and the derived hop_length are not among them) + the format."""
    from demucs_lora.models.build import htdemucs_kwargs
    known = htdemucs_kwargs()
    kwargs = {k: v for k, v in plain(cfg.htdemucs).items() if k in known}
    kwargs.update(samplerate=int(cfg.dset.samplerate), audio_channels=int(cfg.dset.channels),
                  segment=float(cfg.dset.segment))
    return kwargs


def run_sources(cfg: DictConfig, base: tp.Optional[tp.Any] = None) -> tp.List[str]:
    """dset.sources, or (null) the base's sources, or the 4 demucs stems for a new model."""
    return sources_or_base(cfg.dset.get("sources"), base)


def base_spec(cfg: DictConfig) -> BaseSpec:
    bag = cfg.get("bag_member")
    return BaseSpec(continue_from=None if cfg.continue_from is None else str(cfg.continue_from),
                    pretrained_repo=cfg.get("pretrained_repo"),
                    trust_remote_code=bool(cfg.get("trust_remote_code")),
                    bag_member=None if bag is None else int(bag))


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The models room's piece (dset.sources null: the base's; a run has resolved it
    against its base before: config.resolve)."""
    checkpoint = cfg.get("lora_checkpoint")
    sources = cfg.dset.get("sources")
    return ModelSpec(base=base_spec(cfg), architecture=architecture_kwargs(cfg),
                     sources=None if sources is None else tuple(sources),
                     lora=LoraConfig.from_cfg(cfg.htdemucs),
                     source_init=plain(cfg.get("source_init")),
                     train_heads=cfg.get("train_heads"),
                     lora_checkpoint=None if checkpoint is None else str(checkpoint))


def optim_config(**overrides: tp.Any) -> OptimConfig:
    """An OptimConfig from conf/optim/adam.yaml's defaults and `overrides` (code that
    builds an optimizer without Hydra: the API, tests)."""
    from demucs_lora.core.paths import CONF_DIR
    node = OmegaConf.load(CONF_DIR / "optim" / "adam.yaml").optim
    return _typed(OptimConfig, OmegaConf.merge(node, overrides))


def run_config(cfg: DictConfig) -> RunConfig:
    """The typed config of a run, from the composed (checked, resolved) one."""
    spec = model_spec(cfg)
    weights = cfg.get("weights")
    return RunConfig(
        model=spec, dset=data_config(cfg, spec.sources), optim=_typed(OptimConfig, cfg.optim),
        test=_typed(TestConfig, cfg.test), misc=_typed(MiscConfig, cfg.misc),
        seed=int(cfg.seed), epochs=int(cfg.epochs), batch_size=int(cfg.batch_size),
        max_batches=cfg.max_batches, train_budget_seconds=cfg.train_budget_seconds,
        mixed_precision=cfg.mixed_precision, enable_checkpointing=bool(cfg.enable_checkpointing),
        enable_profiling=bool(cfg.enable_profiling), profile_memory=bool(cfg.profile_memory),
        device=str(cfg.device),
        weights=None if weights is None else tuple(float(w) for w in weights),
        training_args=cfg)
