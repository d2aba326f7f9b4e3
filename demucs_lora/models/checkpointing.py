"""Activation checkpointing of an HTDemucs (``enable_checkpointing=true``): memory for time.

Why next to the model code: which layers are worth recomputing is a fact of the
architecture (each encoder/decoder layer of both branches and each cross-transformer
layer), used by training and by the benchmarks alike.
"""
from __future__ import annotations

import torch
from torch import nn


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing per encoder/decoder/transformer layer (every member of a
    bag); a no-op under ``torch.no_grad`` so evaluation keeps its speed."""
    from torch.utils.checkpoint import checkpoint
    layers = []
    for member in getattr(model, "models", [model]):  # every member of a bag
        layers += [*member.encoder, *member.decoder, *getattr(member, "tencoder", []),
                   *getattr(member, "tdecoder", [])]
        if getattr(member, "crosstransformer", None) is not None:
            layers += [*member.crosstransformer.layers, *member.crosstransformer.layers_t]
    for layer in layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = wrapped
