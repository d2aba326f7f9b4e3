"""Change the rank of a LoRA layer in place, keeping what it computes.

Used by dynamic rank adaptation (`rank_adaptation`), and usable alone: ``resize_layer(layer,
r)`` shrinks by truncating the SVD of the layer's delta ``scaling * B @ A`` (the weight
changes by exactly the dropped singular values) or grows with new components whose B side
is zero (the weight does not change). The scaling follows the rank (``alpha / r`` or
``alpha / sqrt(r)``) and the factors are rescaled so the delta does not. Resized factors are
new Parameters (their shapes change): ``replace_in_optimizer`` puts them where the old ones
were, dropping only their state.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.layers import LoRAConvTranspose1d, LoRAConvTranspose2d, LoRALayer
from demucs_lora.lora.layers_attention import LoRAMultiheadAttention

NEW_A_NORM = 1 / math.sqrt(3)
"""Row norm of a new A component: the expected row norm of LoRA's kaiming-uniform init."""


class _Pair(tp.NamedTuple):
    """One low-rank matrix of a layer: ``delta = scaling * L @ R``.

    ``a``/``b`` name the factors; ``transposed`` (ConvTranspose) means L = A.T, R = B
    (else L = B, R = A). The B side of new components is zero."""
    a: str
    b: str
    transposed: bool
    weight: str      # base parameter whose gradient is this matrix's gradient
    rows: tp.Optional[slice]  # rows of that parameter (q/k/v slices of in_proj_weight)


def matrix_pairs(layer: LoRALayer) -> tp.List[_Pair]:
    if isinstance(layer, LoRAMultiheadAttention):
        dim = layer.base.embed_dim
        out = [_Pair(f"lora_A_{p}", f"lora_B_{p}", False, "in_proj_weight",
                     slice(i * dim, (i + 1) * dim))
               for i, (p, on) in enumerate(zip("qkv", layer.enable_qkv)) if on]
        return out + [_Pair("lora_A_o", "lora_B_o", False, "out_proj.weight", None)]
    transposed = isinstance(layer, (LoRAConvTranspose1d, LoRAConvTranspose2d))
    return [_Pair("lora_A", "lora_B", transposed, "weight", None)]


def factors(layer: LoRALayer, pair: _Pair) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(L (m, r), R (r, n)) in float64, detached."""
    return factors_of(pair, getattr(layer, pair.a), getattr(layer, pair.b))


def factors_of(pair: _Pair, a: torch.Tensor, b: torch.Tensor
               ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(L, R) in float64 of factor tensors `a`, `b` laid out as the pair's A and B."""
    a, b = a.detach(), b.detach()
    if pair.transposed:
        return a.double().t(), b.double().reshape(b.shape[0], -1)
    return b.double().reshape(b.shape[0], b.shape[1]), a.double().reshape(a.shape[0], -1)


def factor_tensors(layer: LoRALayer, pair: _Pair, left: torch.Tensor, right: torch.Tensor
                   ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) laid out as the layer's factors (any rank) from L (m, r), R (r, n)."""
    a, b = getattr(layer, pair.a), getattr(layer, pair.b)
    rank = left.shape[1]
    if pair.transposed:
        return left.t(), right.reshape(rank, *b.shape[1:])
    return right.reshape(rank, *a.shape[1:]), left.reshape(b.shape[0], rank, *b.shape[2:])


def _set_factors(layer: LoRALayer, pair: _Pair, left: torch.Tensor, right: torch.Tensor
                 ) -> tp.List[tp.Tuple[nn.Parameter, nn.Parameter]]:
    """Replace the pair's factors by new Parameters holding L, R; returns (old, new) pairs."""
    a, b = getattr(layer, pair.a), getattr(layer, pair.b)
    new_a, new_b = factor_tensors(layer, pair, left, right)
    swaps = []
    for name, old, value in ((pair.a, a, new_a), (pair.b, b, new_b)):
        new = nn.Parameter(value.to(device=old.device, dtype=old.dtype).contiguous(),
                           requires_grad=old.requires_grad)
        setattr(layer, name, new)  # same key of _parameters: parameter order is kept
        swaps.append((old, new))
    return swaps


def low_rank_svd(left: torch.Tensor, right: torch.Tensor
         ) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``left @ right`` through QR of the thin factors: (U (m,r), S (r,), V (n,r))."""
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.t())
    u, s, vh = torch.linalg.svd(r_l @ r_r.t(), full_matrices=False)
    return q_l @ u, s, q_r @ vh.t()


def _scaling(layer: LoRALayer, rank: int) -> float:
    return layer.scaling_for(rank)


def gradient_matrix(layer: LoRALayer, pair: _Pair) -> torch.Tensor:
    """The full-weight gradient of the pair's matrix, oriented like ``L @ R``."""
    param = layer.base.get_parameter(pair.weight)
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return oriented(layer, pair, grad.detach().double())


def oriented(layer: LoRALayer, pair: _Pair, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (shaped as the pair's base weight) as the matrix ``L @ R`` approximates;
    a view when it can be (``weight_matrix(...).sub_(...)`` then edits the weight)."""
    if pair.rows is not None:
        tensor = tensor[pair.rows]
    if isinstance(layer.base, nn.Embedding):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def base_weights(layer: LoRALayer) -> tp.List[nn.Parameter]:
    return list({id(p): p for p in (layer.base.get_parameter(pair.weight)
                                    for pair in matrix_pairs(layer))}.values())


def resize_layer(layer: LoRALayer, rank: int,
                 grad_perp: tp.Optional[tp.Sequence[tp.Optional[torch.Tensor]]] = None
                 ) -> dict:
    """Set ``layer`` to ``rank``: truncated SVD to shrink, zero-B components to grow.

    ``grad_perp`` (one matrix per pair, optional): the new A components start along its
    top singular vectors (else along the orthogonal complement of the current A rows).
    Returns {"swaps": [(old, new) Parameters], "dropped": [per-pair dropped sigmas]}.
    """
    old_rank = layer.r
    if rank == old_rank:
        return {"swaps": [], "dropped": []}
    if rank < 1:
        raise ConfigError(f"rank adaptation: rank {rank} < 1 for {type(layer).__name__}")
    old_s, new_s = layer.scaling, _scaling(layer, rank)
    swaps, dropped = [], []
    for i, pair in enumerate(matrix_pairs(layer)):
        left, right = factors(layer, pair)
        if rank < old_rank:
            u, s, v = low_rank_svd(left * old_s, right)
            root = (s[:rank] / new_s).sqrt()
            left, right = u[:, :rank] * root, (v[:, :rank] * root).t()
            dropped.append(s[rank:].float())
        else:
            extra = rank - old_rank
            g = grad_perp[i] if grad_perp is not None else None
            left = left * (old_s / new_s)
            if pair.transposed:  # A = L.T: new columns of L along G's left vectors
                new_a = _new_directions(left, g, extra, side="left")
                left = torch.cat([left, new_a], 1)
                right = torch.cat([right, right.new_zeros(extra, right.shape[1])], 0)
            else:  # A = R: new rows of R along G's right vectors, zero columns of B = L
                new_a = _new_directions(right.t(), g, extra, side="right")
                left = torch.cat([left, left.new_zeros(left.shape[0], extra)], 1)
                right = torch.cat([right, new_a.t()], 0)
        swaps += _set_factors(layer, pair, left, right)
    layer.r, layer.scaling = rank, new_s
    return {"swaps": swaps, "dropped": dropped}


def _new_directions(current: torch.Tensor, grad: tp.Optional[torch.Tensor], count: int,
                    side: str) -> torch.Tensor:
    """``count`` unit columns (scaled to NEW_A_NORM) for new A components.

    ``current`` (dim, r) holds the existing A vectors as columns. Taken from the top
    singular vectors of ``grad`` on ``side`` when it has energy, completed by the
    orthogonal complement of ``current`` (deterministic: no random draw)."""
    dim = current.shape[0]
    columns = []
    if grad is not None and float(grad.abs().max()) > 0:
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        vectors = u if side == "left" else vh.t()
        columns = [vectors[:, k] for k in range(min(count, int((s > 0).sum())))]
    if len(columns) < count:
        basis = torch.cat([current, *(c[:, None] for c in columns)], 1) if columns else current
        q, _ = torch.linalg.qr(torch.cat([basis, torch.eye(dim, dtype=current.dtype,
                                                             device=current.device)], 1))
        complement = q[:, basis.shape[1]:]
        columns += [complement[:, k] for k in range(min(count - len(columns),
                                                        complement.shape[1]))]
    while len(columns) < count:  # more components than dimensions: cannot happen below caps
        columns.append(current.new_zeros(dim))
    return torch.stack(columns, 1) * NEW_A_NORM


def replace_in_optimizer(optimizer: torch.optim.Optimizer,
                         swaps: tp.Sequence[tp.Tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Put each new Parameter where the old one was; only their state is dropped."""
    mapping = {id(old): new for old, new in swaps}
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    for old, _ in swaps:
        optimizer.state.pop(old, None)
