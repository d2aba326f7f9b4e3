"""A model for other stems: new heads sliced, summed or zeroed from the base's.

`source_plan` says, for each new source, which base heads it starts from;
`remap_sources` builds the new HTDemucs (a bag: member by member, ``models.bag``).
"""
from __future__ import annotations

import logging
import typing as tp

import torch
from demucs.htdemucs import HTDemucs
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.targets import head_names

logger = logging.getLogger(__name__)


def _head_blocks(conv: nn.Module, n_sources: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Split a head ConvTranspose (weight (in, S*k, ...), bias (S*k)) into per-source
    blocks: HTDemucs reshapes the output channels as (S, k) with k = channels(*2 for cac)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    w = weight.reshape(weight.shape[0], n_sources, -1, *weight.shape[2:])
    b = bias.reshape(n_sources, -1) if bias is not None else None
    return w, b


def _new_head(w_blocks, b_blocks, plan: tp.List[tp.List[int]], head: nn.Module) -> None:
    """Fill `head` (new model) with, per new source, the sum of the listed base blocks."""
    with torch.no_grad():
        w_new = head.weight.reshape(head.weight.shape[0], len(plan), -1, *head.weight.shape[2:])
        w_new.zero_()
        for s, srcs in enumerate(plan):
            for i in srcs:
                w_new[:, s] += w_blocks[:, i]
        if head.bias is not None and b_blocks is not None:
            b_new = head.bias.reshape(len(plan), -1)
            b_new.zero_()
            for s, srcs in enumerate(plan):
                for i in srcs:
                    b_new[s] += b_blocks[i]


def source_plan(base_sources: tp.Sequence[str], sources: tp.Sequence[str],
                source_init: tp.Optional[tp.Mapping] = None) -> tp.List[tp.List[int]]:
    """For each new source, the indices of the base heads it starts from: `source_init`,
    else the base's head of that name or spelling, else the default taxonomy
    (demucs_lora.core.sources: kick -> drums, guitar -> other, ...), else zero."""
    from demucs_lora.core.sources import plan_sources
    source_init = dict(source_init or {})
    for new, old in source_init.items():
        olds = [old] if isinstance(old, str) else list(old)
        bad = [o for o in olds if o not in base_sources]
        if new not in sources or bad:
            raise ConfigError(
                f"source_init={{{new}: {old}}}: keys must be in dset.sources={list(sources)} "
                f"and values in the base model's sources={list(base_sources)}")
    plan = plan_sources(base_sources, sources, source_init)
    for choice in plan:
        if choice.why == "zero":
            logger.info(choice.line)
    return [[list(base_sources).index(o) for o in choice.init] for choice in plan]


def remap_sources(model: HTDemucs, sources: tp.Sequence[str],
                  source_init: tp.Optional[tp.Mapping] = None) -> HTDemucs:
    """A new HTDemucs for `sources` whose heads are sliced/copied from `model`'s.
    Kept sources keep their weights (in the new order); every other weight is copied.
    (A bag: ``adapters.remap_model``.)"""
    base_sources = list(model.sources)
    if list(sources) == base_sources and not source_init:
        return model
    plan = source_plan(base_sources, sources, source_init)
    args, kwargs = model._init_args_kwargs
    kwargs = dict(kwargs, sources=list(sources))
    new = type(model)(*args, **kwargs).to(next(model.parameters()).dtype)
    new.segment = model.segment
    heads = head_names(model)
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(h + ".") for h in heads)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(any(m.startswith(h + ".") for h in heads) for m in missing)
    for head in heads:
        w_blocks, b_blocks = _head_blocks(model.get_submodule(head), len(base_sources))
        _new_head(w_blocks, b_blocks, plan, new.get_submodule(head))
    return new
