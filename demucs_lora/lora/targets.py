"""Which HTDemucs modules get LoRA adapters, and what role each plays.

Groups (the values of ``htdemucs.lora_targets``, `lora.config.TARGET_GROUPS`):

- ``encoder``: every supported layer under ``encoder.*`` and ``tencoder.*``
  (conv, rewrite, DConv branches).
- ``decoder``: every supported layer under ``decoder.*`` and ``tdecoder.*``
  (conv_tr, rewrite; the last ``conv_tr`` of each branch is the per-source head).
- ``transformer``: the cross-domain transformer ``crosstransformer.*``:
  ``self_attn`` / ``cross_attn`` as whole ``nn.MultiheadAttention`` modules (their
  ``out_proj`` belongs to the attention adapter, never a target of its own), and the
  feed-forward ``linear1`` / ``linear2``.
- ``upsampler``: ``channel_upsampler``, ``channel_downsampler``,
  ``channel_upsampler_t``, ``channel_downsampler_t`` (present when ``bottom_channels``).
- ``freq_emb``: ``freq_emb.embedding``.

Only modules of the supported types are targets (Linear, Conv1d/2d,
ConvTranspose1d/2d, MultiheadAttention, Embedding); norms, LSTMs etc. are skipped.

Glob aliases (``resolve_alias``), for the names used in the demucs LoRA guides:

- ``transformer.<rest>`` -> ``crosstransformer.<rest>`` (so ``transformer.*`` is the
  whole cross-domain transformer, ``transformer.layers_t.0.*`` one time-branch layer).
- ``transformer.self_attn[.*]`` -> ``crosstransformer.*.self_attn``: the self-attention
  of every transformer layer (both branches); likewise ``transformer.cross_attn``,
  ``transformer.linear1`` and ``transformer.linear2``.
"""
from __future__ import annotations

import re
import typing as tp

from torch import nn

from demucs_lora.lora.config import TARGET_GROUPS, check_targets
from demucs_lora.lora.layers import SUPPORTED_TYPES, LoRALayer

# sub-module names inside a transformer layer that `transformer.NAME` aliases to
_TRANSFORMER_PARTS = ("self_attn", "cross_attn", "linear1", "linear2")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lora_target_names(model: nn.Module, targets: tp.Iterable[str]) -> tp.List[str]:
    """Module paths of `model` to wrap for the groups `targets`, in module order.

    A MultiheadAttention is a target as a whole: nothing inside it is listed. On a
    model already wrapped, a LoRA wrapper is listed under its own path (not its
    ``.base``). Raises ConfigError for an unknown group.
    """
    prefixes = [p for g in check_targets(targets) for p in TARGET_GROUPS[g]]
    names: tp.List[str] = []
    wholes: tp.List[str] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, SUPPORTED_TYPES + (LoRALayer,)):
            continue
        if any(_under(name, m) for m in wholes):
            continue  # e.g. self_attn.out_proj: part of the attention adapter
        if not any(_under(name, p) for p in prefixes):
            continue
        names.append(name)
        if isinstance(module, (nn.MultiheadAttention, LoRALayer)):
            wholes.append(name)
    return names


def head_names(model: nn.Module) -> tp.List[str]:
    """Paths of the per-source heads: the outermost `decoder` / `tdecoder` conv_tr.

    These are the only layers whose shape depends on the number of sources.
    """
    heads = []
    for branch in ("decoder", "tdecoder"):
        layers = getattr(model, branch, None)
        if layers is None or len(layers) == 0:
            continue
        path = f"{branch}.{len(layers) - 1}.conv_tr"
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        heads.append(path)
    return heads


def resolve_alias(glob: str) -> str:
    """Map a guide-style glob to HTDemucs module paths (see the module docstring).

    Globs that do not start with ``transformer.`` are returned unchanged.
    """
    if glob == "transformer" or not glob.startswith("transformer."):
        return "crosstransformer" if glob == "transformer" else glob
    rest = glob[len("transformer."):]
    head, _, tail = rest.partition(".")
    if head in _TRANSFORMER_PARTS:
        if tail in ("", "*"):
            return f"crosstransformer.*.{head}"
        return f"crosstransformer.*.{head}.{tail}"
    return "crosstransformer." + rest


def glob_specificity(glob: str) -> int:
    """Number of non-wildcard characters (a ``[...]`` set counts as one wildcard)."""
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", glob))


def _index(name: str, branch: str) -> tp.Optional[int]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == branch and parts[1].isdigit():
        return int(parts[1])
    return None


def layer_role(name: str, depth: int, t_depth: tp.Optional[int] = None) -> str:
    """Role of the module at `name` in an HTDemucs of `depth` layers.

    `t_depth` is the number of time-branch layers (``len(model.tencoder)``; defaults
    to `depth`). ``encoder[0]`` is the outermost encoder layer, ``encoder[depth-1]``
    the innermost; ``decoder[0]`` is the innermost decoder layer and
    ``decoder[depth-1]`` the outermost (same for tencoder / tdecoder).
    Precedence: head > outer_* > dconv > inner_* > encoder/decoder.
    """
    t_depth = depth if t_depth is None else t_depth
    parts = name.split(".")
    if parts[0] == "crosstransformer":
        if parts[-1] in ("self_attn", "cross_attn") or "attn" in parts[-1]:
            return "attention"
        if parts[-1] in ("linear1", "linear2"):
            return "ffn"
        return "other"
    if parts[0] in TARGET_GROUPS["upsampler"]:
        return "upsampler"
    if parts[0] == "freq_emb":
        return "freq_emb"
    for branch, n, kind in (("encoder", depth, "encoder"), ("tencoder", t_depth, "encoder"),
                            ("decoder", depth, "decoder"), ("tdecoder", t_depth, "decoder")):
        idx = _index(name, branch)
        if idx is None:
            continue
        if kind == "encoder":
            outer, inner = idx == 0, idx == n - 1
        else:
            outer, inner = idx == n - 1, idx == 0
        if outer and kind == "decoder" and len(parts) == 3 and parts[2] == "conv_tr":
            return "head"
        if outer:
            return f"outer_{kind}"
        if "dconv" in parts:
            return "dconv"
        return f"inner_{kind}" if inner else kind
    return "other"
