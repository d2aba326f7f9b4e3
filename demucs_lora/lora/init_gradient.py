"""``htdemucs.lora_init=gradient``: LoRA-GA initialisation, and its plain-adapter form.

LoRA-GA (Wang et al. 2024) starts the factors along the calibration gradient G of each
adapted matrix instead of B = 0: with G = U S V^T, the output side gets U's first r columns
and the input side V's next r rows (r+1..2r), so that the first steps of A and B together
follow G's top 2r directions; both are scaled by ``rows ** 0.25 / sqrt(STABLE_GAMMA)`` (the
paper's "stable" scale). Since then ``scaling * B0 A0 != 0``, the frozen base weight is
offset by ``- scaling * B0 A0``: the model's output at step 0 is the base's (within float
rounding). Every layer kind is covered through the matrix each adapter approximates
(`lora.resize.matrix_pairs`): convs as (out, in*k), ConvTranspose as (in, out*k), the
enabled q/k/v slices of attention and its out_proj, Linear, Embedding.

The initial factors stay on the layer as buffers (``lora_A_init``, ``lora_B_init``, ...),
so that the original base weight is known exactly (``W' + scaling * B0 A0``) for the base
fingerprint, and so that an adapter *file* is a plain adapter on the **unmodified** base:
the trained delta ``scaling * (B A - B0 A0)`` is written as a rank-2r adapter
``[B, -B0] [A; A0]`` (the way PEFT saves PiSSA / LoRA-GA adapters), its output-side factor
rescaled to the scaling of rank 2r. Merging stays exact (``W' + scaling * B A`` is the
trained weight).
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from demucs_lora.lora.calibration import Calibration
from demucs_lora.lora.inject import iter_lora_layers
from demucs_lora.lora.layers import LoRALayer
from demucs_lora.lora.resize import (factor_tensors, factors, factors_of, matrix_pairs,
                                     oriented)

STABLE_GAMMA = 16.0
"""LoRA-GA's "stable" scale divides both factors by sqrt(gamma); 16 as in the paper."""
INIT_SUFFIX = "_init"


def gradient_factors(grad: torch.Tensor, rank: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(L (m, r), R (r, n)) in float64 from the SVD of `grad` (m, n): L = U[:, :r],
    R = V^T[r:2r] (wrapping round to V^T[0:] when the matrix has fewer than 2r singular
    directions), both times ``m ** 0.25 / sqrt(STABLE_GAMMA)``."""
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    k = vh.shape[0]
    rows = torch.tensor([(rank + i) % k for i in range(rank)], dtype=torch.long)
    scale = grad.shape[0] ** 0.25 / STABLE_GAMMA ** 0.5
    return u[:, :rank] * scale, vh[rows] * scale


def has_offset(layer: LoRALayer) -> bool:
    """True when `layer` was initialised from the gradient (its base carries an offset)."""
    return hasattr(layer, matrix_pairs(layer)[0].a + INIT_SUFFIX)


@torch.no_grad()
def init_layer(layer: LoRALayer, grads: tp.Sequence[torch.Tensor]) -> None:
    """LoRA-GA on one freshly injected layer; `grads` as `Calibration.grads` holds them
    (one per matrix pair, shaped as `rank_table.target_matrices` gives them)."""
    if has_offset(layer) or layer.merged:
        raise RuntimeError("gradient init on a layer that is merged or already initialised")
    for pair, grad in zip(matrix_pairs(layer), grads):
        if isinstance(layer.base, nn.Embedding):
            grad = grad.t()  # target_matrices gives (num, dim); the pair is (dim, num)
        left, right = gradient_factors(grad, layer.r)
        a_value, b_value = factor_tensors(layer, pair, left, right)
        for name, value in ((pair.a, a_value), (pair.b, b_value)):
            param = getattr(layer, name)
            param.copy_(value.to(param.dtype))
            layer.register_buffer(name + INIT_SUFFIX, param.detach().clone())
        left, right = factors(layer, pair)  # as stored, so the offset cancels exactly
        weight = layer.base.get_parameter(pair.weight)
        view = oriented(layer, pair, weight.data)
        view.sub_((left @ right * layer.scaling).to(weight.dtype))


def gradient_init(model: nn.Module, calibration: Calibration, prefix: str = "") -> int:
    """LoRA-GA on every LoRA layer of `model` under `prefix` whose name (without the
    prefix) `calibration` covers; returns how many layers it initialised."""
    done = 0
    for path, layer in iter_lora_layers(model):
        if path.startswith(prefix) and path[len(prefix):] in calibration.grads:
            init_layer(layer, calibration.grads[path[len(prefix):]])
            done += 1
    return done


def _offset(layer: LoRALayer, pair) -> torch.Tensor:
    """``scaling * B0 A0`` of one pair, as the float64 matrix L0 @ R0 (oriented)."""
    left, right = factors_of(pair, getattr(layer, pair.a + INIT_SUFFIX),
                             getattr(layer, pair.b + INIT_SUFFIX))
    return left @ right * layer.scaling


def original_weights(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """{state_dict key: base weight without the offset} of the offset layers (call it on
    unmerged layers: `lora.state.base_fingerprint` does)."""
    out: tp.Dict[str, torch.Tensor] = {}
    for path, layer in iter_lora_layers(model):
        if not has_offset(layer):
            continue
        for pair in matrix_pairs(layer):
            key = f"{path}.base.{pair.weight}"
            if key not in out:
                out[key] = layer.base.get_parameter(pair.weight).detach().double().clone()
            oriented(layer, pair, out[key]).add_(_offset(layer, pair))
    return out


def plain_adapter(model: nn.Module, tensors: tp.Dict[str, torch.Tensor]
                  ) -> tp.Tuple[tp.Dict[str, int], tp.Dict[str, torch.Tensor]]:
    """(ranks, tensors) of the adapter *file*: each offset layer of rank r as the rank-2r
    adapter ``[B, -B0] [A; A0]`` on the unmodified base, scaled for rank 2r; `tensors`
    (the trained state, `lora.state.get_lora_state`) are replaced where they change."""
    ranks: tp.Dict[str, int] = {}
    out = dict(tensors)
    for path, layer in iter_lora_layers(model):
        if not has_offset(layer):
            continue
        ratio = layer.scaling / layer.scaling_for(2 * layer.r)
        for pair in matrix_pairs(layer):
            left, right = factors(layer, pair)
            left0, right0 = factors_of(pair, getattr(layer, pair.a + INIT_SUFFIX),
                                       getattr(layer, pair.b + INIT_SUFFIX))
            a_value, b_value = factor_tensors(layer, pair,
                                              torch.cat([left, -left0], 1) * ratio,
                                              torch.cat([right, right0], 0))
            dtype = getattr(layer, pair.a).dtype
            out[f"{path}.{pair.a}"] = a_value.to(dtype).contiguous()
            out[f"{path}.{pair.b}"] = b_value.to(dtype).contiguous()
        ranks[path] = 2 * layer.r
    return ranks, out
