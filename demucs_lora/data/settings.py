"""`DataConfig`: the data room's piece of the run config, typed, paths absolute.

Built once, at the door (`demucs_lora.config.run_config.data_config`), from the composed
`dset.*` keys plus `residual_source`, so the dataset code reads attributes and never the
Hydra config: rooms below `config/` are testable with a plain `DataConfig(...)`. The
defaults live once, in conf/dset/*.yaml; this class has none but `DataConfig.of`, the
tests' and the API's way to write one by hand.
"""
from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path
from types import MappingProxyType


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tp.Tuple[str, ...]          # the stems a run separates (resolved, never null)
    wav: tp.Tuple[Path, ...]             # dset.wav roots ((): none)
    musdb: tp.Optional[Path]             # dset.musdb
    wav_required: bool                   # dset=wav without dset.wav: `???` (refused when read)
    stem_files: tp.Mapping[str, tp.Any]  # source -> file name(s) when they differ
    mixture: str                         # auto | file | sum
    valid_tracks: tp.Union[None, int, float]
    segment: float
    shift: float
    samplerate: int
    channels: int
    metadata: Path                       # the cache of track metadata (and synthetic data)
    sum_tolerance: float
    residual_source: tp.Optional[str]
    synth: tp.Mapping[str, tp.Any]       # dset.synth (its keys: conf/dset/wav.yaml)
    augment: tp.Mapping[str, tp.Any]     # dset.augment (checked by data.augment)

    def __post_init__(self):
        for name in ("stem_files", "synth", "augment"):  # frozen all the way down
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def synthetic(self) -> bool:
        """No dset.wav and no dset.musdb: the embedded generator's tracks."""
        return not self.wav and self.musdb is None and not self.wav_required

    def synth_dset(self) -> dict:
        """The `dset`-shaped dict `data.synth.ensure_synth` hashes (synth + format)."""
        return {"synth": dict(self.synth), "samplerate": self.samplerate,
                "channels": self.channels, "metadata": str(self.metadata)}

    def with_sources(self, sources: tp.Sequence[str]) -> "DataConfig":
        return dataclasses.replace(self, sources=tuple(sources))

    @classmethod
    def of(cls, **values) -> "DataConfig":
        """A DataConfig from keyword values, the rest from conf/dset/wav.yaml's defaults
        (for code that builds one without Hydra: tests, benchmarks)."""
        from demucs_lora.core.paths import CONF_DIR
        from omegaconf import OmegaConf
        node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dset" / "wav.yaml").dset)
        node.update(wav=None, sources=None)
        node.update({k: v for k, v in values.items() if k != "residual_source"})
        return from_node(node, values.get("residual_source"))


def _paths(value) -> tp.Tuple[Path, ...]:
    from demucs_lora.core.paths import user_path
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(user_path(v) for v in values)


def from_node(node: tp.Mapping[str, tp.Any], residual_source: tp.Optional[str] = None,
              sources: tp.Optional[tp.Sequence[str]] = None) -> DataConfig:
    """A DataConfig from a plain `dset` mapping (the composed node as a container, `???`
    as the string '???'); `sources` overrides dset.sources (else the 4 demucs stems)."""
    from demucs_lora.core.paths import user_path
    from demucs_lora.core.sources import DEFAULT_SOURCES
    wav = node.get("wav")
    musdb = node.get("musdb")
    return DataConfig(
        sources=tuple(sources if sources is not None else
                      node.get("sources") or DEFAULT_SOURCES),
        wav=() if wav == "???" else _paths(wav),
        musdb=None if musdb is None else user_path(musdb),
        wav_required=wav == "???",
        stem_files=dict(node.get("stem_files") or {}),
        mixture=str(node.get("mixture") or "auto"),
        valid_tracks=node.get("valid_tracks"),
        segment=float(node["segment"]), shift=float(node.get("shift") or 0),
        samplerate=int(node["samplerate"]), channels=int(node["channels"]),
        metadata=user_path(node["metadata"]),
        sum_tolerance=float(node.get("sum_tolerance", 1e-3)),
        residual_source=residual_source,
        synth=dict(node.get("synth") or {}), augment=dict(node.get("augment") or {}))
