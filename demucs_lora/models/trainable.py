"""The trainable tensors of a model (LoRA factors, trained heads): read, load, swap.

Validation under EMA, the best-model save and adapter writes all need "load these
trainable tensors, do X, put the model back"; `swapped_trainables` is that one step, and
restores the model even when X raises (as ``demucs.states.swap_state`` and audiocraft's
``swap_ema_state`` do for whole state dicts).
"""
from __future__ import annotations

import contextlib
import typing as tp

import torch
from torch import nn


def trainable_state(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """A CPU copy of every parameter that requires grad, by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: tp.Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters; RuntimeError unless it names exactly
    them with the same shapes."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]} (was the config changed?)")
    shapes = [f"{n}: {tuple(v.shape)} vs model {tuple(params[n].shape)}"
              for n, v in state.items() if tuple(v.shape) != tuple(params[n].shape)]
    if shapes:  # copy_ would broadcast a wrong shape silently
        raise RuntimeError(f"checkpoint tensors do not match the model's shapes: {shapes[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@contextlib.contextmanager
def swapped_trainables(model: nn.Module,
                       state: tp.Optional[tp.Mapping[str, torch.Tensor]]) -> tp.Iterator[nn.Module]:
    """`model` with `state` loaded in its trainable tensors for the body of the block,
    its own tensors back afterwards, also when the body raises; None changes nothing."""
    if state is None:
        yield model
        return
    current = trainable_state(model)
    load_trainable_state(model, state)
    try:
        yield model
    finally:
        load_trainable_state(model, current)
