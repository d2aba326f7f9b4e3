"""The calibration pass: full-weight gradients of the LoRA targets on a few train batches.

One pass serves every method that reads gradients before training: the ``gradient`` rank
mode (the singular values of each layer's summed gradient), the ``sensitivity`` mode
(|W * G| summed over the weights and over the batches, as AdaLoRA / GoRA score a layer)
and ``htdemucs.lora_init=gradient`` (LoRA-GA: factors from the SVD of the summed
gradient). It runs the frozen model in eval mode under a forked RNG seeded with 0, so it
neither shifts the run's random draws nor depends on them, and leaves the model's
``requires_grad``, ``.grad`` and train/eval flags as it found them.
"""
from __future__ import annotations

import dataclasses
import itertools
import typing as tp

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.rank_table import target_matrices


@dataclasses.dataclass
class Calibration:
    """Per target layer: its summed gradient matrices, in `target_matrices` order (q, k, v
    as enabled, then out_proj for attention; one matrix otherwise), and its sensitivity."""
    grads: tp.Dict[str, tp.List[torch.Tensor]]
    sensitivity: tp.Dict[str, float]
    batches: int

    def spectrum(self, name: str) -> torch.Tensor:
        """Squared singular values of the layer's gradient, summed over its matrices."""
        total = None
        for grad in self.grads[name]:
            s2 = torch.linalg.svdvals(grad.double()) ** 2
            total = s2 if total is None else total + s2
        return total


def calibrate(model: nn.Module, names: tp.Sequence[str], enable_qkv, batches: tp.Iterable,
              loss_fn: tp.Callable, n_batches: int, what: str = "the calibration pass"
              ) -> Calibration:
    """Gradients of the `names` layers of `model` (not yet wrapped) over the first
    `n_batches` of `batches` ((mix, sources) pairs); `what` names the key that asked."""
    mats = {n: target_matrices(model.get_submodule(n), enable_qkv) for n in names}
    targets = list({id(p): p for ms in mats.values() for p, _ in ms}.values())
    all_params = list(model.parameters())
    saved_rg = [p.requires_grad for p in all_params]
    saved_grad = [p.grad for p in targets]
    saved_training = [(m, m.training) for m in model.modules()]
    device = all_params[0].device if all_params else torch.device("cpu")
    fork = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    sums: tp.Dict[int, torch.Tensor] = {}
    sensitivity = {n: 0.0 for n in names}
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in targets:
            p.grad = None
            p.requires_grad_(True)
        model.eval()
        seen = 0
        with torch.random.fork_rng(devices=fork), torch.enable_grad():
            torch.manual_seed(0)
            for mix, sources in itertools.islice(iter(batches), n_batches):
                loss_fn(model(mix.to(device)), sources.to(device)).backward()
                _collect(mats, targets, sums, sensitivity)
                seen += 1
        if seen == 0:
            raise ConfigError(f"{what}: the calibration data yielded no batch")
        grads = {n: [fn(sums.get(id(p), torch.zeros_like(p))).detach().cpu()
                     for p, fn in mats[n]] for n in names}
        return Calibration(grads, sensitivity, seen)
    finally:
        for p, rg in zip(all_params, saved_rg):
            p.requires_grad_(rg)
        for p, g in zip(targets, saved_grad):
            p.grad = g
        for m, training in saved_training:
            m.training = training


@torch.no_grad()
def _collect(mats, targets, sums: tp.Dict[int, torch.Tensor],
             sensitivity: tp.Dict[str, float]) -> None:
    """After one batch's backward: add |W * G_batch| to each layer's sensitivity, add
    G_batch to the running sums (the same float32 sums autograd's accumulation makes), and
    clear the gradients."""
    for name, pairs in mats.items():
        for p, fn in pairs:
            if p.grad is not None:
                sensitivity[name] += float((fn(p.detach()) * fn(p.grad)).abs().sum())
    for p in targets:
        if p.grad is None:
            continue
        if id(p) in sums:
            sums[id(p)].add_(p.grad)
        else:
            sums[id(p)] = p.grad.detach().clone()
        p.grad = None
