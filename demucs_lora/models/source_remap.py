"""An adapter on a model whatever the model's sources: the heads follow the adapter's.

`lora.state.load_adapter` loads an adapter onto a model of the adapter's own sources;
this layer first re-slices (or copies, per the header's ``source_init``) the heads of a
model trained for other sources, member by member for a bag (`remap_model`).
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

from demucs.apply import BagOfModels
from torch import nn

from demucs_lora.core.errors import AdapterMismatch, ConfigError
from demucs_lora.lora.adapter_file import read_header
from demucs_lora.lora.inject import has_lora
from demucs_lora.lora.state import load_adapter
from demucs_lora.models.heads import remap_sources


def remap_model(model: nn.Module, sources: tp.Sequence[str],
                source_init: tp.Optional[tp.Mapping] = None) -> nn.Module:
    """``heads.remap_sources`` for an HTDemucs, member by member for a bag."""
    if isinstance(model, BagOfModels):
        from demucs_lora.models.bag import remap_bag
        return remap_bag(model, sources, source_init)
    return remap_sources(model, sources, source_init)


def _to_adapter_sources(model: nn.Module, header: dict, path) -> nn.Module:
    """`model`, remapped to the header's sources when they differ from its own."""
    sources = header.get("sources") or []
    if not sources or list(getattr(model, "sources", sources)) == sources:
        return model
    if has_lora(model):
        raise AdapterMismatch(
            f"{path}: adapter sources {sources} differ from the model's {model.sources}; "
            "load it on the plain base model instead")
    try:
        return remap_model(model, sources, header.get("source_init"))
    except ConfigError as exc:
        raise AdapterMismatch(f"{path}: header keys 'sources'/'source_init' do not fit "
                              f"this model: {exc}") from None


def load_adapter_any_sources(model: nn.Module, path: tp.Union[str, Path],
                             check_base: bool = True) -> nn.Module:
    """`lora.state.load_adapter` after remapping the heads to the adapter's sources, so a
    new model object may be returned: always use the return value."""
    model = _to_adapter_sources(model, read_header(path), path)
    return load_adapter(model, path, check_base=check_base)
