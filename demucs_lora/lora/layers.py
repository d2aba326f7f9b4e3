"""LoRA wrappers for the layer types of HTDemucs, and the factory that picks one.

Every wrapper keeps the original module frozen as ``self.base`` and adds a
low-rank path ``scaling * B(A(dropout(x)))`` (never a dense delta per training step).
Without autograd (inference), Linear/Conv/ConvTranspose fold the delta into the weight
for the call instead (``LoRALayer._fold``): the cost of the base op, exact as merging.
Factor names and shapes (other modules rely on them):

=====================  ======================  ======================  ===============
layer                  lora_A                  lora_B                  params per rank
=====================  ======================  ======================  ===============
Linear                 (r, in)                 (out, r)                in + out
Conv1d / Conv2d        (r, in, *kernel)        (out, r, 1[, 1])        in*prod(k) + out
ConvTranspose1d / 2d   (r, in)  pointwise      (r, out, *kernel)       in + out*prod(k)
MultiheadAttention     lora_A_{q,k,v,o} (r,E)  lora_B_{q,k,v,o} (E,r)  2E*(n_qkv + 1)
Embedding              (r, num_embeddings)     (dim, r)                num + dim
=====================  ======================  ======================  ===============
"""
from __future__ import annotations

import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import DEFAULT_ENABLE_QKV, check_enable_qkv
from demucs_lora.lora.layers_attention import LoRAMultiheadAttention
from demucs_lora.lora.layers_base import LoRALayer

__all__ = [
    "LoRALayer", "LoRALinear", "LoRAConv1d", "LoRAConv2d",
    "LoRAConvTranspose1d", "LoRAConvTranspose2d", "LoRAMultiheadAttention",
    "LoRAEmbedding", "SUPPORTED_TYPES", "params_per_rank", "wrap_module",
]


def _kaiming(param: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))  # as loralib / PEFT


class LoRALinear(LoRALayer):
    """``y = base(x) + scaling * B A dropout(x)``; A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, bias: str = "none"):
        super().__init__(base, r, alpha, dropout, rslora, bias)
        self.lora_A = self._new_factor(r, base.in_features, like=base.weight)
        self.lora_B = self._new_factor(base.out_features, r, like=base.weight)
        _kaiming(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self._fold():
            return F.linear(x, self._folded_weight(), self.base.bias)
        result = self.base(x)
        if self.merged:
            return result
        h = F.linear(self.lora_dropout(x), self._cast(self.lora_A, x.dtype))
        return self._addmm(result, h, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


def _check_groups(base: nn.Module) -> None:
    if base.groups != 1:
        raise ConfigError(
            f"LoRA supports {type(base).__name__} with groups=1 only, got groups="
            f"{base.groups}; leave this layer out of lora_targets or give it rank 0")


def _channel_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as one batched GEMM: weight (o, c) on x (N, c, *spatial).

    Used for the A factor of a 1x1 base conv: on CPU, oneDNN's conv with few (r) output
    channels was up to 2x slower than bmm over the flattened spatial dims (fwd + bwd,
    HTDemucs shapes). For B, conv + in-place add measured faster end to end than an
    in-place baddbmm (whose backward through the view copies the full-size gradient).
    """
    n, c = x.shape[:2]
    out = torch.bmm(weight.expand(n, -1, -1), x.reshape(n, c, -1))
    return out.view(n, weight.shape[0], *x.shape[2:])


def _is_pointwise(base: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded conv: its A factor can run as a matmul."""
    padding = base.padding
    return (all(k == 1 for k in base.kernel_size) and all(s == 1 for s in base.stride)
            and (isinstance(padding, str) or all(p == 0 for p in padding)))


class _LoRAConvNd(LoRALayer):
    """A: conv with the base geometry (in -> r); B: 1x1 conv (r -> out).

    The scaling rides on B, the update is added in place to the base output, and A runs
    as a bmm when the base is itself 1x1 (see `_channel_matmul`). Measured on full
    HTDemucs (uniform r=8, CPU): -5..7% step time, peak memory 1.07x -> 0.86-0.91x of full FT.
    """

    _ndim = 0
    _conv = None

    def __init__(self, base, r: int, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, bias: str = "none"):
        _check_groups(base)
        super().__init__(base, r, alpha, dropout, rslora, bias)
        kernel = tuple(base.kernel_size)
        self.lora_A = self._new_factor(r, base.in_channels, *kernel, like=base.weight)
        self.lora_B = self._new_factor(base.out_channels, r, *([1] * self._ndim),
                                       like=base.weight)
        _kaiming(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self._fold():
            return self.base._conv_forward(x, self._folded_weight(), self.base.bias)
        result = self.base(x)
        if self.merged:
            return result
        x = self.lora_dropout(x)
        a = self._cast(self.lora_A, x.dtype)
        batched = x.dim() == self._ndim + 2
        if batched and _is_pointwise(self.base):
            h = _channel_matmul(a.flatten(1), x)
        else:  # _conv_forward applies the base stride/padding/dilation and padding_mode
            h = self.base._conv_forward(x, a, None)
        return self._add_(result, type(self)._conv(h, self._scaled(self.lora_B, h.dtype)))

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
        return delta.view(self.base.weight.shape) * self.scaling


class LoRAConv1d(_LoRAConvNd):
    _ndim = 1
    _conv = staticmethod(F.conv1d)


class LoRAConv2d(_LoRAConvNd):
    _ndim = 2
    _conv = staticmethod(F.conv2d)


class _LoRAConvTransposeNd(LoRALayer):
    """A: pointwise in -> r at input resolution; B: conv_transpose r -> out with
    the base stride/padding/output_padding/dilation. Costs about r/C of the base."""

    _ndim = 0
    _conv = None
    _conv_tr = None

    def __init__(self, base, r: int, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, bias: str = "none"):
        _check_groups(base)
        super().__init__(base, r, alpha, dropout, rslora, bias)
        kernel = tuple(base.kernel_size)
        self.lora_A = self._new_factor(r, base.in_channels, like=base.weight)
        self.lora_B = self._new_factor(r, base.out_channels, *kernel, like=base.weight)
        _kaiming(self.lora_A)

    def forward(self, x: torch.Tensor, output_size: tp.Optional[tp.List[int]] = None):
        base = self.base
        if not self.merged and self._fold():
            output_padding = base._output_padding(
                x, output_size, base.stride, base.padding, base.kernel_size,
                self._ndim, base.dilation)
            return type(self)._conv_tr(x, self._folded_weight(), base.bias, base.stride,
                                       base.padding, output_padding, 1, base.dilation)
        result = base(x, output_size)
        if self.merged:
            return result
        pointwise = self._cast(self.lora_A, x.dtype).view(*self.lora_A.shape, *([1] * self._ndim))
        h = type(self)._conv(self.lora_dropout(x), pointwise)
        output_padding = base._output_padding(
            x, output_size, base.stride, base.padding, base.kernel_size,
            self._ndim, base.dilation)
        update = type(self)._conv_tr(h, self._scaled(self.lora_B, h.dtype), None, base.stride,
                                     base.padding, output_padding, 1, base.dilation)
        return self._add_(result, update)

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_A.t() @ self.lora_B.flatten(1)
        return delta.view(self.base.weight.shape) * self.scaling


class LoRAConvTranspose1d(_LoRAConvTransposeNd):
    _ndim = 1
    _conv = staticmethod(F.conv1d)
    _conv_tr = staticmethod(F.conv_transpose1d)


class LoRAConvTranspose2d(_LoRAConvTransposeNd):
    _ndim = 2
    _conv = staticmethod(F.conv2d)
    _conv_tr = staticmethod(F.conv_transpose2d)


class LoRAEmbedding(LoRALayer):
    """``y = base(x) + scaling * dropout(A.T[x]) B.T``; A (r, num), B (dim, r).

    The input is a tensor of indices, so dropout acts on the rank-r lookup.
    A starts normal (the lookup has no fan-in, as in loralib), B at zero; the
    column of A at ``padding_idx`` starts at zero and gets no gradient, so the
    padding row of the merged weight never moves.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, bias: str = "none"):
        super().__init__(base, r, alpha, dropout, rslora, bias)
        self.lora_A = self._new_factor(r, base.num_embeddings, like=base.weight)
        self.lora_B = self._new_factor(base.embedding_dim, r, like=base.weight)
        nn.init.normal_(self.lora_A)
        if base.padding_idx is not None:
            with torch.no_grad():
                self.lora_A[:, base.padding_idx] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        dtype = result.dtype
        h = F.embedding(x, self._cast(self.lora_A, dtype).t(), self.base.padding_idx,
                        None, 2.0, self.base.scale_grad_by_freq, False)
        update = self.lora_dropout(h) @ self._cast(self.lora_B, h.dtype).t()
        return self._add(result, update * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scaling


# Most specific first: NonDynamicallyQuantizableLinear is a Linear.
_WRAPPERS: tp.Tuple[tp.Tuple[type, type], ...] = (
    (nn.MultiheadAttention, LoRAMultiheadAttention),
    (nn.Linear, LoRALinear),
    (nn.Conv1d, LoRAConv1d),
    (nn.Conv2d, LoRAConv2d),
    (nn.ConvTranspose1d, LoRAConvTranspose1d),
    (nn.ConvTranspose2d, LoRAConvTranspose2d),
    (nn.Embedding, LoRAEmbedding),
)
SUPPORTED_TYPES: tp.Tuple[type, ...] = tuple(t for t, _ in _WRAPPERS)


def _unsupported(module: nn.Module) -> ConfigError:
    names = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
    return ConfigError(f"LoRA cannot wrap a {type(module).__name__}; supported types: {names}")


def params_per_rank(module: nn.Module,
                    enable_qkv: tp.Sequence[bool] = DEFAULT_ENABLE_QKV) -> int:
    """Adapter parameters added per unit of rank when ``module`` is wrapped."""
    if isinstance(module, LoRALayer):
        module = module.base
    if isinstance(module, nn.MultiheadAttention):
        n_enabled = sum(check_enable_qkv(enable_qkv))
        return 2 * module.embed_dim * (n_enabled + 1)
    if isinstance(module, nn.Linear):
        return module.in_features + module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        _check_groups(module)
        return module.in_channels * math.prod(module.kernel_size) + module.out_channels
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        _check_groups(module)
        return module.in_channels + module.out_channels * math.prod(module.kernel_size)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings + module.embedding_dim
    raise _unsupported(module)


def wrap_module(module: nn.Module, r: int, alpha: float = 16, dropout: float = 0.0,
                rslora: bool = False, bias: str = "none",
                enable_qkv: tp.Sequence[bool] = DEFAULT_ENABLE_QKV,
                scaling_rank: tp.Optional[int] = None) -> LoRALayer:
    """Wrap ``module`` in the LoRA layer for its type (ConfigError if unsupported);
    `scaling_rank`: scale by that rank instead of `r` (see `LoRALayer.scaling_for`)."""
    if isinstance(module, LoRALayer):
        raise ConfigError(f"{type(module).__name__} is already a LoRA wrapper")
    for kind, wrapper in _WRAPPERS:
        if isinstance(module, kind):
            if wrapper is LoRAMultiheadAttention:
                layer = wrapper(module, r, alpha, dropout, rslora, bias, enable_qkv=enable_qkv)
            else:
                layer = wrapper(module, r, alpha, dropout, rslora, bias)
            if scaling_rank is not None:
                layer.set_scaling_rank(scaling_rank)
            return layer
    raise _unsupported(module)
