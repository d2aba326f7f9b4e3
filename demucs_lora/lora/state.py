"""An adapter on a model: its tensors, the fingerprint of its base, saving and loading.

What an adapter holds is what `inject_lora` left trainable (`LoraLayout.trained`): the
LoRA factors and whatever else was trained (heads, biases). The header (see
`lora.adapter_file`) records the layout and a fingerprint of the frozen base weights,
so that an adapter loaded on the wrong base is an `AdapterMismatch`, not garbage output.
Remapping a model's heads to an adapter's sources is the layer above's
(`demucs_lora.models.source_remap`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import typing as tp
from pathlib import Path

import torch
from torch import nn

from demucs_lora.core.errors import AdapterMismatch
from demucs_lora.core.version import __version__
from demucs_lora.lora.adapter_file import (FORMAT, adapter_paths, read_header, read_tensors,
                                           write_adapter)
from demucs_lora.lora.config import LoraLayout
from demucs_lora.lora.init_gradient import original_weights, plain_adapter
from demucs_lora.lora.inject import (carried_layout, has_lora, iter_lora_layers, lora_config,
                                     wrap_layers)
from demucs_lora.lora.rank_table import layer_info

RANK_SLACK = 64  # ranks above a layer's smallest dim are useless, but inject_lora allows


def _canonical(name: str) -> str:
    """Parameter name as in the plain model (LoRA wrappers hold the base as `.base`)."""
    return name.replace(".base.", ".")


def get_lora_state(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """Adapter tensors only: what injection left trainable (LoRA factors plus the
    parameters trained in full); empty for a model without LoRA layers."""
    layout = carried_layout(model)
    if layout is None:
        return {}
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in layout.trained}


def _not_lora(names: tp.Iterable[str]) -> tp.List[str]:
    return [n for n in names if not n.rsplit(".", 1)[-1].startswith("lora_")]


def base_fingerprint(model: nn.Module, exclude: tp.Iterable[str] = ()) -> dict:
    """Shapes hash + per-tensor statistics of the frozen base weights.

    Statistics (not raw bytes) so that a float16-stored copy of the same base matches.
    Merged layers are compared on their unmerged weights, gradient-initialised layers
    (``htdemucs.lora_init=gradient``) on their weights without the offset: the original.
    """
    exclude = set(exclude)
    merged = [layer for _, layer in iter_lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        shapes = hashlib.sha256()
        stats = []
        state = {**model.state_dict(), **original_weights(model)}
        for name, tensor in sorted(state.items()):
            leaf = name.rsplit(".", 1)[-1]
            canon = _canonical(name)
            if leaf.startswith("lora_") or name in exclude or canon in exclude:
                continue
            if not torch.is_floating_point(tensor) or tensor.numel() == 0:
                continue
            shapes.update(f"{canon}:{tuple(tensor.shape)};".encode())
            t = tensor.detach().double()
            stats.append([round(t.mean().item(), 7), round(t.abs().mean().item(), 7)])
    finally:
        for layer in merged:
            layer.merge()
    return {"shapes_sha256": shapes.hexdigest(), "stats": stats}


def fingerprints_match(a: dict, b: dict, rtol: float = 2e-2, atol: float = 1e-4) -> bool:
    if a["shapes_sha256"] != b["shapes_sha256"] or len(a["stats"]) != len(b["stats"]):
        return False
    ta, tb = torch.tensor(a["stats"]), torch.tensor(b["stats"])
    return bool(torch.allclose(ta, tb, rtol=rtol, atol=atol))


def adapter_file_state(model: nn.Module) -> tp.Tuple[LoraLayout, tp.Dict[str, torch.Tensor]]:
    """(layout, tensors) an adapter file holds: `get_lora_state`, except that layers
    initialised from the gradient are written as plain rank-2r adapters on the original
    base (`lora.init_gradient.plain_adapter`)."""
    layout = lora_config(model)
    ranks, tensors = plain_adapter(model, get_lora_state(model))
    if ranks:
        layout = dataclasses.replace(layout, ranks={**layout.ranks, **ranks})
    return layout, tensors


def adapter_header(model: nn.Module, **extra) -> dict:
    """The JSON header of `model`'s adapter: format, versions, layout, sources, base;
    ``lora_init`` says how the factors started when they came from the gradient."""
    layout, _ = adapter_file_state(model)
    trained = lora_config(model)
    if layout.ranks != trained.ranks:
        extra.setdefault("lora_init", {
            "method": "gradient", "trained_ranks": dict(trained.ranks),
            "stored_as": "rank-2r adapters [B, -B0] [A; A0] on the original base"})
    header = {
        "format": FORMAT,
        "demucs_lora_version": __version__,
        "torch_version": torch.__version__,
        **layout.to_header(),
        "sources": list(getattr(model, "sources", [])),
        # A bag (demucs.apply.BagOfModels): layers of member K are under "models.K.".
        "bag": ({"members": len(model.models), "weights": [list(map(float, w))
                                                            for w in model.weights]}
                if isinstance(getattr(model, "models", None), nn.ModuleList) else None),
        "base_fingerprint": base_fingerprint(model, exclude=_not_lora(layout.trained)),
    }
    header.update(extra)
    return header


def save_adapter(model: nn.Module, path: tp.Union[str, Path], save_dtype: str = "float32",
                 **extra) -> tp.Tuple[Path, Path]:
    """Write `path.safetensors` + `path.json` as a pair; extra keys go into the header.

    Both go to temporary files first and are renamed together, the header last; the
    header carries the tensors' sha256, so a pair torn by a kill between the two renames
    is detected on load instead of mixing two versions. `save_dtype` (float32 | float16 |
    bfloat16, `htdemucs.lora_save_dtype`): the dtype of the stored LoRA factors, recorded
    in the header; loading casts them back to the model's dtype, so only float32 reloads
    bit-exactly."""
    header = adapter_header(model, save_dtype=save_dtype, **extra)
    return write_adapter(path, adapter_file_state(model)[1], header, save_dtype)


# ---------------------------------------------------------------------------- loading
def check_ranks_fit(model: nn.Module, layout: LoraLayout, path: tp.Union[str, Path]) -> None:
    """Every rank of the adapter's `layout` names a layer of `model` and is at most its
    smallest dimension (or RANK_SLACK, which `inject_lora` also accepts), so that
    injecting allocates about the layer's own size at most: checked before any
    allocation."""
    path = adapter_paths(path)[1]  # errors name the header file
    for name, rank in layout.ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}' names no layer of "
                                  f"this {type(model).__name__}") from None
        try:
            cap = layer_info(module, layout.enable_qkv, "").max_rank
        except (AttributeError, TypeError, ValueError):
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}': LoRA cannot wrap a "
                                  f"{type(module).__name__}") from None
        if rank > max(cap, RANK_SLACK):
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}' is {rank}, far above "
                                  f"the layer's smallest dimension {cap} (the most a LoRA "
                                  "rank can use there)")
    for name in layout.train_extra:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"{path}: header key 'train_extra' names {name!r}, no "
                                  f"module of this {type(model).__name__}") from None


def check_same_layout(layout: LoraLayout, header: dict, path) -> None:
    """Swapping tensors is only right when the layers were built the same way."""
    diff = layout.differences(LoraLayout.from_header(header))
    if diff:
        raise AdapterMismatch(
            f"{path}: the model's LoRA layers differ from this adapter in {'; '.join(diff)}; "
            "load it on the plain base model (remove_lora first) instead of swapping")


def _check_fits(model: nn.Module, tensors: tp.Mapping[str, torch.Tensor], path) -> None:
    """The file's tensors are exactly the model's adapter tensors, shape for shape."""
    expected = get_lora_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(tensors))
              if tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise AdapterMismatch(
            f"{path} does not fit this model: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]} (was it made with other "
            "lora_targets / ranks / model architecture?)")


def _check_base(model: nn.Module, header: dict, path) -> None:
    trained = _not_lora(get_lora_state(model))
    if not fingerprints_match(base_fingerprint(model, exclude=trained),
                              header["base_fingerprint"]):
        raise AdapterMismatch(
            f"{path} was trained on a different base model (fingerprint of the frozen "
            "weights differs): load the base it was made for (see its .json header), "
            "or pass check_base=False if you know what you are doing")


def _copy_tensors(model: nn.Module, tensors: tp.Mapping[str, torch.Tensor]) -> None:
    """Copy into the parameters, unmerging merged layers around it."""
    merged = [layer for _, layer in iter_lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    for layer in merged:
        layer.merge()


def load_adapter(model: nn.Module, path: tp.Union[str, Path], check_base: bool = True
                 ) -> nn.Module:
    """Load an adapter strictly onto `model` (whose sources must be the adapter's),
    injecting the LoRA layers first when the model has none, else swapping the tensors
    of layers of the same layout. The header is validated, and its ranks checked against
    the layers, before any tensor is read or allocated."""
    header = read_header(path)
    layout = LoraLayout.from_header(header)
    if not has_lora(model):
        check_ranks_fit(model, layout, path)
        tensors = read_tensors(adapter_paths(path)[0], header)
        wrap_layers(model, layout)
    else:
        check_same_layout(lora_config(model), header, path)
        tensors = read_tensors(adapter_paths(path)[0], header)
    _check_fits(model, tensors, path)
    if check_base:
        _check_base(model, header, path)
    _copy_tensors(model, tensors)
    return model
