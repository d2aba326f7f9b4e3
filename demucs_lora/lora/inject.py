"""Wrap named modules of a model with LoRA layers, freeze the rest, merge/unmerge/remove.

The injector is the only place that decides what is trainable: LoRA factors, biases per
`bias` mode, and any extra parameters named by prefix (e.g. output heads trained fully).
"""
from __future__ import annotations

import logging
import typing as tp

from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.layers import LoRALayer, wrap_module

logger = logging.getLogger(__name__)

BIAS_MODES = ("none", "lora_only", "all")
LORA_CONFIG_ATTR = "_demucs_lora_config"


def _split_path(path: str) -> tp.Tuple[str, str]:
    parent, _, child = path.rpartition(".")
    return parent, child


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        import difflib
        close = difflib.get_close_matches(path, names, n=5)
        raise ConfigError(
            f"LoRA target '{path}' is not a module of {type(model).__name__}; "
            f"close names: {close or names[:5]}") from None


def iter_lora_layers(model: nn.Module) -> tp.Iterator[tp.Tuple[str, LoRALayer]]:
    """Yield (path, layer) for every LoRA wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in iter_lora_layers(model))


def inject_lora(model: nn.Module, ranks: tp.Mapping[str, int], alpha: float = 16.0,
                dropout: float = 0.0, rslora: bool = False, bias: str = "none",
                enable_qkv: tp.Sequence[bool] = (True, False, True),
                train_extra: tp.Sequence[str] = ()) -> tp.List[dict]:
    """Wrap each `path -> rank` (rank > 0) in place, freeze everything else.

    `train_extra` lists module paths whose own parameters stay fully trainable (e.g. the
    output heads when sources change). Returns one report row per wrapped layer.
    """
    if bias not in BIAS_MODES:
        raise ConfigError(f"htdemucs.lora_bias={bias!r}: allowed values are {list(BIAS_MODES)}")
    if has_lora(model):
        raise ConfigError("inject_lora: the model already has LoRA layers; call remove_lora "
                          "first or load the adapter onto the existing layers")
    for path in train_extra:
        _get_module(model, path)  # validates the name
    targets = {p: int(r) for p, r in ranks.items() if int(r) > 0}
    modules = {p: _get_module(model, p) for p in targets}  # validate all before mutating
    for param in model.parameters():
        param.requires_grad_(False)
    report = []
    for path, rank in targets.items():
        base = modules[path]
        layer = wrap_module(base, rank, alpha=alpha, dropout=dropout, rslora=rslora,
                            bias=bias, enable_qkv=tuple(bool(x) for x in enable_qkv))
        parent_path, child = _split_path(path)
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
        n_lora = sum(p.numel() for p in layer.lora_parameters())
        shape = tuple(getattr(base, "weight", getattr(base, "in_proj_weight", None)).shape)
        report.append({"layer": path, "type": type(base).__name__, "shape": list(shape),
                       "rank": rank, "trainable": n_lora})
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    for path in train_extra:
        for param in model.get_submodule(path).parameters():
            param.requires_grad_(True)
    config = {
        "ranks": targets, "alpha": float(alpha), "dropout": float(dropout),
        "rslora": bool(rslora), "bias": bias, "enable_qkv": [bool(x) for x in enable_qkv],
        "train_extra": list(train_extra)}
    setattr(model, LORA_CONFIG_ATTR, config)
    if "lora_config" in model.__dict__:  # the guide's model.lora_config (model_api.py)
        model.__dict__["lora_config"] = config
    return report


def lora_config(model: nn.Module) -> dict:
    """The injection arguments of `model` (what the adapter header stores)."""
    config = getattr(model, LORA_CONFIG_ATTR, None)
    if config is None:
        raise ConfigError("this model has no LoRA layers (inject_lora or load_lora_weights first)")
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent per layer)."""
    for _, layer in iter_lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (no-op for unmerged layers)."""
    for _, layer in iter_lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge, then put the plain torch modules back, so demucs can serialize the model."""
    for path, layer in list(iter_lora_layers(model)):
        parent_path, child = _split_path(path)
        setattr(model.get_submodule(parent_path) if parent_path else model, child,
                layer.unwrap())
    if hasattr(model, LORA_CONFIG_ATTR):
        delattr(model, LORA_CONFIG_ATTR)
    if "lora_config" in model.__dict__:
        model.__dict__["lora_config"] = None
    return model


def trainable_summary(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable,
            "percent": 100.0 * trainable / max(total, 1)}


def format_report(report: tp.Sequence[dict]) -> str:
    """A printable table of the wrapped layers."""
    lines = [f"{'layer':<48} {'type':<20} {'shape':<18} {'rank':>4} {'params':>9}"]
    for row in report:
        lines.append(f"{row['layer']:<48} {row['type']:<20} {str(tuple(row['shape'])):<18} "
                     f"{row['rank']:>4} {row['trainable']:>9}")
    lines.append(f"{len(report)} layers, {sum(r['trainable'] for r in report)} LoRA parameters")
    return "\n".join(lines)
