"""`ModelSpec`: the models room's piece of the run config (which base, which stems, which
adapters), typed. Built once at the door (`demucs_lora.config.run_config.model_spec`) from
the composed `continue_from` / `htdemucs.*` / `dset.sources` / `source_init` keys, after
they were resolved against the base; `build_model(spec)` reads nothing else.
"""
from __future__ import annotations

import dataclasses
import typing as tp
from types import MappingProxyType

from demucs_lora.lora.config import LoraConfig


def sources_or_base(sources: tp.Optional[tp.Sequence[str]], base: tp.Any) -> tp.List[str]:
    """A run's stems: `sources` when set, else the base's, else (a new model) the 4
    demucs stems. The one rule, for the typed spec and the config's resolution."""
    if sources is not None:
        return list(sources)
    from demucs_lora.core.sources import DEFAULT_SOURCES
    return list(base.sources) if base is not None else list(DEFAULT_SOURCES)


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """The model to adapt: `continue_from` (None: a new model) and how it may be loaded."""
    continue_from: tp.Optional[str] = None
    pretrained_repo: tp.Optional[str] = None
    trust_remote_code: bool = False
    bag_member: tp.Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    base: BaseSpec
    architecture: tp.Mapping[str, tp.Any]  # HTDemucs kwargs of a new model (the format too)
    sources: tp.Optional[tp.Tuple[str, ...]]  # the run's stems (None: the base's)
    lora: LoraConfig
    source_init: tp.Optional[tp.Mapping[str, tp.Any]] = None  # new source -> base source(s)
    train_heads: tp.Optional[bool] = None  # None: train the heads iff the sources change
    lora_checkpoint: tp.Optional[str] = None  # start the factors from this adapter

    def __post_init__(self):
        object.__setattr__(self, "architecture", MappingProxyType(dict(self.architecture)))
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(self.sources))
        if self.source_init is not None:
            object.__setattr__(self, "source_init", MappingProxyType(dict(self.source_init)))

    def sources_of(self, base: tp.Any) -> tp.List[str]:
        """The run's stems given its base (None: a new model)."""
        return sources_or_base(self.sources, base)

    @property
    def samplerate(self) -> int:
        return int(self.architecture["samplerate"])

    @property
    def channels(self) -> int:
        return int(self.architecture["audio_channels"])
