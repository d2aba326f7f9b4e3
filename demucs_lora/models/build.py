"""Build the model a run trains: load the base strictly, remap sources, attach LoRA.

`build_model(spec)` = load base -> remap sources (heads sliced / copied per `source_init`)
-> allocate ranks -> inject LoRA -> freeze. `lora_rank: 0` means full fine-tuning through
the same path, so LoRA and full fine-tuning are compared like for like.
"""
from __future__ import annotations

import inspect
import logging
import typing as tp
from pathlib import Path

from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LoraConfig
from demucs_lora.lora.targets import head_names
from demucs_lora.models.load import load_model, put_adapter
from demucs_lora.models.source_remap import remap_model
from demucs_lora.models.spec import ModelSpec

logger = logging.getLogger(__name__)

# HTDemucs arguments that come from elsewhere in the config (dset.*), not htdemucs.*.
NOT_HTDEMUCS = ("self", "sources", "samplerate", "audio_channels", "segment")


def htdemucs_kwargs() -> tp.Dict[str, tp.Any]:
    """HTDemucs constructor arguments that `htdemucs.*` may set, with their defaults."""
    params = inspect.signature(HTDemucs.__init__).parameters
    return {name: p.default for name, p in params.items() if name not in NOT_HTDEMUCS}


def load_base(continue_from: tp.Optional[str], pretrained_repo: tp.Optional[str] = None,
              trust_remote_code: bool = False, root: tp.Optional[Path] = None,
              bag_member: tp.Optional[int] = None) -> tp.Optional[nn.Module]:
    """The base ``continue_from`` names (`models.load.load_model`), or None: null means a
    fresh model."""
    return None if continue_from is None else load_model(
        continue_from, pretrained_repo, None, trust_remote_code, root, bag_member)


def build_base(spec: ModelSpec, root: tp.Optional[Path] = None) -> HTDemucs:
    """The base model of a run: loaded from `continue_from` or freshly initialised."""
    b = spec.base
    base = load_base(b.continue_from, b.pretrained_repo, b.trust_remote_code, root,
                     b.bag_member)
    if base is None:
        return HTDemucs(sources=spec.sources_of(None), **spec.architecture)
    check_audio_format(base, spec.samplerate, spec.channels)
    return base


def check_audio_format(base: nn.Module, samplerate: int, channels: int) -> None:
    """ConfigError unless the run's dset.samplerate / dset.channels are the base's."""
    if base.samplerate != samplerate or base.audio_channels != channels:
        raise ConfigError(
            f"the base model works at {base.samplerate} Hz / {base.audio_channels} channels but "
            f"dset.samplerate={samplerate} dset.channels={channels}: set "
            "them to the model's values")


def should_train_heads(spec: ModelSpec, base_sources: tp.Sequence[str]) -> bool:
    if spec.train_heads is not None:
        return bool(spec.train_heads)
    return spec.sources is not None and list(spec.sources) != list(base_sources)


def build_model(spec: ModelSpec, root: tp.Optional[Path] = None,
                calibration: tp.Optional[tp.Callable[[], tp.Iterable]] = None,
                base: tp.Optional[HTDemucs] = None) -> tp.Tuple[HTDemucs, dict]:
    """Load base -> remap sources -> allocate ranks -> inject -> freeze.

    `calibration()` yields (mix, sources) batches (read by the gradient and sensitivity
    rank modes and ``htdemucs.lora_init=gradient``: `LoraConfig.needs_calibration`).
    `base`: the already loaded base (else loaded from spec.base / built fresh).
    Returns the model and a report {ranks, layers, trainable, train_heads}.
    """
    from demucs_lora.lora.inject import trainable_summary, wrap_layers
    base = build_base(spec, root) if base is None else base
    base_sources = list(base.sources)
    init = dict(spec.source_init) if spec.source_init is not None else None
    model = remap_model(base, spec.sources_of(base), init)
    if isinstance(model, BagOfModels):
        from demucs_lora.models.bag import TrainableBag
        model = model if isinstance(model, TrainableBag) else TrainableBag(
            list(model.models), model.weights)
        members = [(f"models.{k}.", m) for k, m in enumerate(model.models)]
        logger.info("continue_from=%s is a bag of %d models: each member gets its own "
                    "adapters and every step runs all %d (about %dx the time and activation "
                    "memory of one model; bag_member=K adapts one member alone)",
                    spec.base.continue_from, len(members), len(members), len(members))
    else:
        members = [("", model)]
    train_heads = should_train_heads(spec, base_sources)
    heads = [p + h for p, m in members for h in head_names(m)] if train_heads else []
    config, adapter = spec.lora, spec.lora_checkpoint
    report = {"ranks": {}, "layers": [], "train_heads": heads, "base_sources": base_sources}
    if config.lora_rank <= 0 and adapter:
        raise ConfigError(f"lora_checkpoint={adapter} starts LoRA factors, but "
                          "htdemucs.lora_rank=0 is full fine-tuning: set htdemucs.lora_rank "
                          "(and the other htdemucs.lora_* keys) to the adapter's")
    if config.lora_rank <= 0:
        for p in model.parameters():
            p.requires_grad_(True)
        report["trainable"] = trainable_summary(model)
        return model, report
    if config.lora_init == "gradient" and adapter:
        raise ConfigError(f"lora_checkpoint={adapter} starts the LoRA factors "
                          "from an adapter, htdemucs.lora_init=gradient from the gradient: "
                          "drop one (an adapter file is a plain adapter: lora_init=default)")
    tables, calibrations = _allocate(members, heads, config, calibration)
    ranks = {k: int(v) for t in tables for k, v in dict(t).items() if int(v) > 0}
    report["layers"] = wrap_layers(model, config.layout(ranks, heads))
    report["ranks"] = ranks
    report["rank_table"] = tables[0] if len(members) == 1 else \
        {k: v for t in tables for k, v in dict(t).items()}
    if config.lora_init == "gradient":
        from demucs_lora.lora.init_gradient import gradient_init
        for (prefix, _), calib in zip(members, calibrations):
            gradient_init(model, calib, prefix)
    if adapter:
        model = start_from_adapter(model, str(adapter), root)
        report["lora_checkpoint"] = str(adapter)
    report["trainable"] = trainable_summary(model)
    return model, report


def _allocate(members, heads, config: LoraConfig, calibration) -> tp.Tuple[list, list]:
    """Per member: its rank table (names prefixed) and its calibration (None when no
    method reads gradients). One calibration pass per member serves both the rank mode
    and ``lora_init=gradient``."""
    from demucs_lora.lora.calibration import calibrate
    from demucs_lora.lora.ranks import allocate_ranks
    from demucs_lora.lora.targets import lora_target_names
    from torch.nn import functional as F
    tables, calibrations = [], []
    for prefix, member in members:
        names = [n for n in lora_target_names(member, config.lora_targets)
                 if prefix + n not in heads]
        calib = None
        if config.needs_calibration and calibration is not None:
            what = f"htdemucs.lora_rank_mode={config.lora_rank_mode}, " \
                f"htdemucs.lora_init={config.lora_init}"
            calib = calibrate(member, names, config.lora_enable_qkv, calibration(), F.l1_loss,
                              config.lora_gradient_batches, what)
        elif config.lora_init == "gradient":
            raise ConfigError("htdemucs.lora_init=gradient needs calibration data (the "
                              "train batches): build_model(spec, calibration=...)")
        table = allocate_ranks(member, config, names=names, calibration=calib)
        tables.append(table if not prefix else {prefix + k: v for k, v in dict(table).items()})
        calibrations.append(calib)
    return tables, calibrations


def start_from_adapter(model: nn.Module, adapter: str, root: tp.Optional[Path] = None
                       ) -> nn.Module:
    """``lora_checkpoint=PATH``: the injected LoRA factors (and heads) start from an
    existing adapter, loaded strictly: same layout (ranks, alpha, ...), same keys and
    shapes, and trained on this very base (fingerprint), else AdapterMismatch."""
    from demucs_lora.model_files.resolve import resolve_adapter
    path = resolve_adapter(adapter, root)
    model = put_adapter(model, path, prefix=f"lora_checkpoint={adapter}: ",
                        suffix=" [set htdemucs.lora_* (and continue_from) to what its .json "
                        "header records]")
    logger.info("LoRA factors start from lora_checkpoint=%s", path)
    return model
