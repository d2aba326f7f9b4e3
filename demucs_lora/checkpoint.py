"""What a run writes to disk, atomically: resume state, the best model, adapters.

`checkpoint.th` holds only what training changes (trainable tensors, optimizer, scheduler,
EMA, RNG, epoch, history); the frozen base is rebuilt from the config on resume.
`best.th` is a plain demucs package (adapters merged) that the stock CLI loads.
"""
from __future__ import annotations

import copy
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.states import serialize_model
from omegaconf import DictConfig
from torch import nn

from .utils import atomic_write
from .lora.inject import has_lora, remove_lora
from .lora.state import save_adapter


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def trainable_state(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: tp.Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]} (was the config changed?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_model(model: nn.Module, state: tp.Optional[tp.Mapping] = None) -> nn.Module:
    """A deep copy of `model` with `state` (trainable tensors) loaded and LoRA merged away."""
    model = getattr(model, "module", model)
    plain = copy.deepcopy(model).cpu().float()
    if state is not None:
        load_trainable_state(plain, state)
    if has_lora(plain):
        remove_lora(plain)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


def save_best_model(model: nn.Module, state, cfg: DictConfig, path: Path,
                    half: bool = False) -> None:
    """demucs' own serialized format (klass, args, kwargs, state, training_args); a bag
    is written as demucs lays bags out: ``best.yaml`` + ``best_mK.th`` (``bag.write_bag``)."""
    plain = plain_model(model, state)
    if isinstance(plain, BagOfModels):
        from .bag import write_bag
        write_bag(plain, path.parent, path.stem, cfg, half=half)
        return
    package = serialize_model(plain, cfg, half=half)
    atomic_torch_save(package, path)


def save_adapter_with_state(model: nn.Module, state, path: Path, **header) -> None:
    """Write the adapter of `model` as it would be with `state` loaded."""
    model = getattr(model, "module", model)
    if not has_lora(model):
        return
    if state is None:
        save_adapter(model, path, **header)
        return
    current = trainable_state(model)
    load_trainable_state(model, state)
    try:
        save_adapter(model, path, **header)
    finally:
        load_trainable_state(model, current)
