"""LoRA on ``nn.MultiheadAttention`` with a fused ``in_proj_weight``.

The unmerged forward follows ``F.multi_head_attention_forward`` step by step
(same projections, same mask handling, same SDPA / explicit-softmax split), and
adds the low-rank updates to the enabled q/k/v projections and to out_proj.
"""
from __future__ import annotations

import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import DEFAULT_ENABLE_QKV, check_enable_qkv
from demucs_lora.lora.layers_base import LoRALayer

_PROJ = ("q", "k", "v")


def _block_fastpath(module, args):
    """No-op pre-hook: its presence keeps nn.TransformerEncoderLayer's fused fast
    path (which reads the base weights directly and would skip the adapter) off."""
    return None


def _float_mask(mask: tp.Optional[torch.Tensor], name: str, dtype: torch.dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


class LoRAMultiheadAttention(LoRALayer):
    """Adapters on the enabled q/k/v slices of ``in_proj_weight`` and on out_proj.

    ``lora_A_p`` (r, E), ``lora_B_p`` (E, r) for p in the enabled subset of q, k, v,
    plus ``lora_A_o``, ``lora_B_o`` on out_proj.
    """

    def __init__(self, base: nn.MultiheadAttention, r: int, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, bias: str = "none",
                 enable_qkv: tp.Sequence[bool] = DEFAULT_ENABLE_QKV):
        flags = check_enable_qkv(enable_qkv)
        if not base._qkv_same_embed_dim:
            raise ConfigError("LoRA on MultiheadAttention needs kdim == vdim == embed_dim "
                              "(a fused in_proj_weight); leave this layer out of lora_targets")
        if base.bias_k is not None or base.add_zero_attn:
            raise ConfigError("LoRA on MultiheadAttention does not support add_bias_kv or "
                              "add_zero_attn; leave this layer out of lora_targets")
        super().__init__(base, r, alpha, dropout, rslora, bias)
        self.enable_qkv = flags
        weight, dim = base.in_proj_weight, base.embed_dim
        for name, enabled in zip(_PROJ + ("o",), flags + (True,)):
            if enabled:
                setattr(self, f"lora_A_{name}", self._new_factor(r, dim, like=weight))
                setattr(self, f"lora_B_{name}", self._new_factor(dim, r, like=weight))
                nn.init.kaiming_uniform_(getattr(self, f"lora_A_{name}"), a=math.sqrt(5))
        self.register_forward_pre_hook(_block_fastpath)

    # -- low rank ---------------------------------------------------------------
    def _lora_add(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result + scaling * B_name A_name dropout(x)`` (one addmm, see LoRALayer._addmm)."""
        a = self._cast(getattr(self, f"lora_A_{name}"), x.dtype)
        h = F.linear(self.lora_dropout(x), a)
        return self._addmm(result, h, getattr(self, f"lora_B_{name}"))

    def delta_weight(self) -> tp.Dict[str, torch.Tensor]:
        dim = self.base.embed_dim
        like = self.lora_A_o
        blocks = []
        for name, on in zip(_PROJ, self.enable_qkv):
            if on:
                blocks.append(getattr(self, f"lora_B_{name}") @ getattr(self, f"lora_A_{name}"))
            else:
                blocks.append(torch.zeros(dim, dim, device=like.device, dtype=like.dtype))
        return {"in_proj_weight": torch.cat(blocks, 0) * self.scaling,
                "out_proj.weight": (self.lora_B_o @ self.lora_A_o) * self.scaling}

    def _apply_delta(self, sign: float) -> None:
        delta = self.delta_weight()
        for weight, key in ((self.base.in_proj_weight, "in_proj_weight"),
                            (self.base.out_proj.weight, "out_proj.weight")):
            weight.add_(delta[key].to(weight.dtype), alpha=sign)

    # -- forward ----------------------------------------------------------------
    def _project(self, query, key, value):
        """In-projection as torch's ``_in_projection_packed``, plus the adapters."""
        dim = self.base.embed_dim
        w, b = self.base.in_proj_weight, self.base.in_proj_bias
        if key is value and query is key:
            proj = F.linear(query, w, b).unflatten(-1, (3, dim))
            proj = proj.unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = proj[0], proj[1], proj[2]
        elif key is value:
            w_q, w_kv = w.split([dim, dim * 2])
            b_q, b_kv = (None, None) if b is None else b.split([dim, dim * 2])
            q = F.linear(query, w_q, b_q)
            kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, dim))
            kv = kv.unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            bs = (None,) * 3 if b is None else b.chunk(3)
            q, k, v = (F.linear(x, wp, bp) for x, wp, bp in
                       zip((query, key, value), w.chunk(3), bs))
        out = []
        for name, proj, x, on in zip(_PROJ, (q, k, v), (query, key, value), self.enable_qkv):
            out.append(self._lora_add(proj, x, name) if on else proj)
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: tp.Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: tp.Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if self.merged:
            return self.base(query, key, value, key_padding_mask=key_padding_mask,
                             need_weights=need_weights, attn_mask=attn_mask,
                             average_attn_weights=average_attn_weights, is_causal=is_causal)
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        batched = query.dim() == 3
        same_qk, same_kv = query is key, key is value
        if self.base.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        elif not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if same_kv:  # keep the identities that pick the fused projection
            value = key = query if same_qk else key
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights,
                                    attn_mask, average_attn_weights, is_causal)
        if self.base.batch_first and batched:
            out = out.transpose(1, 0)
        elif not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal):
        base = self.base
        tgt_len, bsz, dim = query.shape
        heads, src_len = base.num_heads, key.shape[0]
        head_dim = dim // heads
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA builds the causal mask itself
        else:
            is_causal = False
        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = base.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q, k, v = (t.view(bsz, heads, -1, head_dim) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, dim)
            weights = None
        out_proj = base.out_proj
        out = self._lora_add(F.linear(out, out_proj.weight, out_proj.bias), out, "o")
        return out.view(tgt_len, bsz, dim), weights
