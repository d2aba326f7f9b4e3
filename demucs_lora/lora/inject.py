"""Wrap named modules of a model with LoRA layers, freeze the rest, merge/unmerge/remove.

The injector is the only place that decides what is trainable: LoRA factors, biases per
`bias` mode, and any extra parameters named by prefix (e.g. output heads trained fully);
it records the result (`LoraLayout.trained`), which is what adapter files hold.
"""
from __future__ import annotations

import dataclasses
import logging
import typing as tp

from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LoraLayout
from demucs_lora.lora.layers import LoRALayer, wrap_module

logger = logging.getLogger(__name__)


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


def wrap_layers(model: nn.Module, layout: LoraLayout) -> tp.List[dict]:
    """Wrap each layer of ``layout.ranks`` in place, freeze everything else.

    ``layout.train_extra`` lists module paths whose own parameters stay fully trainable
    (e.g. the output heads when sources change). The model then carries the layout, with
    the names of what was left trainable (`lora_config`). Returns one report row per
    wrapped layer.
    """
    if has_lora(model):
        raise ConfigError("inject_lora: the model already has LoRA layers; call remove_lora "
                          "first or load the adapter onto the existing layers")
    for path in layout.train_extra:
        _get_module(model, path)  # validates the name
    modules = {p: _get_module(model, p) for p in layout.ranks}  # validate before mutating
    for param in model.parameters():
        param.requires_grad_(False)
    report = [_wrap(model, path, modules[path], rank, layout)
              for path, rank in layout.ranks.items()]
    if layout.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    for path in layout.train_extra:
        for param in model.get_submodule(path).parameters():
            param.requires_grad_(True)
    trained = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    _carry(model, dataclasses.replace(layout, trained=trained))
    return report


def _wrap(model: nn.Module, path: str, base: nn.Module, rank: int, layout: LoraLayout
          ) -> dict:
    """Replace ``base`` at ``path`` by its LoRA wrapper; its report row."""
    layer = wrap_module(base, rank, alpha=layout.alpha, dropout=layout.dropout,
                        rslora=layout.rslora, bias=layout.bias, enable_qkv=layout.enable_qkv,
                        scaling_rank=layout.scaling_rank)
    parent_path, child = _split_path(path)
    setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    n_lora = sum(p.numel() for p in layer.lora_parameters())
    shape = tuple(getattr(base, "weight", getattr(base, "in_proj_weight", None)).shape)
    return {"layer": path, "type": type(base).__name__, "shape": list(shape),
            "rank": rank, "trainable": n_lora}


def _carry(model: nn.Module, layout: tp.Optional[LoraLayout]) -> None:
    """The model carries its layout as the guide's ``model.lora_config`` and
    ``model.config`` (plain instance attributes: demucs serializes class + arguments +
    state, never these)."""
    object.__setattr__(model, "lora_config", layout)
    object.__setattr__(model, "config", layout)   # the guide's `model.config` (an alias)


def carried_layout(model: nn.Module) -> tp.Optional[LoraLayout]:
    """The layout `inject_lora` put on `model`, or None (no LoRA layers)."""
    return model.__dict__.get("lora_config")


def lora_config(model: nn.Module) -> LoraLayout:
    """The layout of `model`'s LoRA layers (what the adapter header stores)."""
    layout = carried_layout(model)
    if layout is None:
        raise ConfigError("this model has no LoRA layers (inject_lora or load_lora_weights first)")
    return layout


def set_ranks(model: nn.Module, ranks: tp.Mapping[str, int]) -> None:
    """Record new ranks of some layers (rank adaptation resized them)."""
    layout = lora_config(model)
    _carry(model, dataclasses.replace(layout, ranks={**layout.ranks, **ranks}))


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
    _carry(model, None)
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
