"""Adapter files: safetensors tensors plus a JSON header, and a fingerprint of the base.

An adapter holds the LoRA factors and whatever else was trained (heads, biases), never
pickled classes. The header says how to rebuild the layers (ranks, alpha, ...) so loading
needs no recomputation, and carries a fingerprint of the frozen base weights so that an
adapter loaded on the wrong base is an `AdapterMismatch`, not garbage output.
"""
from __future__ import annotations

import hashlib
import json
import typing as tp
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import AdapterMismatch
from ..utils import atomic_write
from .inject import has_lora, inject_lora, iter_lora_layers, lora_config

FORMAT = "demucs-lora-adapter/1"


def adapter_paths(path: tp.Union[str, Path]) -> tp.Tuple[Path, Path]:
    """`x`, `x.safetensors` or `x.json` -> (x.safetensors, x.json)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _canonical(name: str) -> str:
    """Parameter name as in the plain model (LoRA wrappers hold the base as `.base`)."""
    return name.replace(".base.", ".")


def _trained_names(model: nn.Module) -> tp.List[str]:
    """Names of every parameter the adapter must carry: LoRA factors + other trainables."""
    config = getattr(model, "_demucs_lora_config", None) or {}
    extra = tuple(p + "." for p in config.get("train_extra", ()))
    bias = config.get("bias", "none")
    names = []
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("lora_") or name.startswith(extra):
            names.append(name)
        elif bias == "all" and leaf.endswith("bias"):
            names.append(name)
        elif bias == "lora_only" and ".base." in name and leaf.endswith("bias"):
            names.append(name)
    return names


def get_lora_state(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """Adapter tensors only: LoRA factors plus the parameters trained in full."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in _trained_names(model)}


def base_fingerprint(model: nn.Module, exclude: tp.Iterable[str] = ()) -> dict:
    """Shapes hash + per-tensor statistics of the frozen base weights.

    Statistics (not raw bytes) so that a float16-stored copy of the same base matches.
    Merged layers are compared on their unmerged weights.
    """
    exclude = set(exclude)
    merged = [layer for _, layer in iter_lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        shapes = hashlib.sha256()
        stats = []
        for name, tensor in sorted(model.state_dict().items()):
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


_atomic_write = atomic_write


def adapter_header(model: nn.Module, **extra) -> dict:
    config = lora_config(model)
    trained = _trained_names(model)
    non_lora = [n for n in trained if not n.rsplit(".", 1)[-1].startswith("lora_")]
    header = {
        "format": FORMAT,
        "demucs_lora_version": __version__,
        "torch_version": torch.__version__,
        "ranks": config["ranks"],
        "alpha": config["alpha"],
        "dropout": config["dropout"],
        "rslora": config["rslora"],
        "bias": config["bias"],
        "enable_qkv": config["enable_qkv"],
        "train_extra": config["train_extra"],
        "sources": list(getattr(model, "sources", [])),
        "base_fingerprint": base_fingerprint(model, exclude=non_lora),
    }
    header.update(extra)
    return header


SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LoRA factors in `dtype` (other trained tensors, e.g. heads, stay as they are)."""
    if dtype == torch.float32 or not name.rsplit(".", 1)[-1].startswith("lora_"):
        return tensor
    out = tensor.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} does not fit in {dtype} (values up to "
                         f"{tensor.abs().max().item():.3g}): save it with save_dtype=float32")
    return out


def save_adapter(model: nn.Module, path: tp.Union[str, Path], save_dtype: str = "float32",
                 **extra) -> tp.Tuple[Path, Path]:
    """Write `path.safetensors` + `path.json` atomically; extra keys go into the header.

    `save_dtype` (float32 | float16 | bfloat16, `htdemucs.lora_save_dtype`): the dtype of
    the stored LoRA factors, recorded in the header; loading casts them back to the
    model's dtype, so only float32 reloads bit-exactly.
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}: allowed values are {list(SAVE_DTYPES)}")
    tensors_path, header_path = adapter_paths(path)
    header = adapter_header(model, save_dtype=save_dtype, **extra)
    tensors = {k: _stored(k, v, SAVE_DTYPES[save_dtype]).contiguous().cpu()
               for k, v in get_lora_state(model).items()}
    metadata = {"demucs_lora": json.dumps({k: v for k, v in header.items()
                                           if k != "base_fingerprint"})}
    _atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _atomic_write(header_path, lambda tmp: Path(tmp).write_text(json.dumps(header, indent=2)))
    return tensors_path, header_path


def read_adapter(path: tp.Union[str, Path]) -> tp.Tuple[dict, tp.Dict[str, torch.Tensor]]:
    tensors_path, header_path = adapter_paths(path)
    for p in (tensors_path, header_path):
        if not p.exists():
            raise AdapterMismatch(f"adapter file {p} does not exist (an adapter is a "
                                  f".safetensors file plus its .json header)")
    header = json.loads(header_path.read_text())
    if header.get("format") != FORMAT:
        raise AdapterMismatch(f"{header_path}: unknown adapter format {header.get('format')!r}")
    return header, load_file(str(tensors_path))


def _check_same_layout(config: dict, header: dict, path) -> None:
    """Swapping tensors is only right when the layers were built the same way."""
    keys = ("ranks", "alpha", "rslora", "bias", "enable_qkv", "train_extra")
    diff = [k for k in keys if config[k] != header[k]]
    if diff:
        raise AdapterMismatch(
            f"{path}: the model's LoRA layers differ from this adapter in {diff} "
            f"(model: {[config[k] for k in diff if k != 'ranks']}, adapter: "
            f"{[header[k] for k in diff if k != 'ranks']}); load it on the plain base model "
            "(remove_lora first) instead of swapping")


def load_lora_weights(model: nn.Module, path: tp.Union[str, Path],
                      check_base: bool = True) -> nn.Module:
    """Load an adapter strictly, injecting the LoRA layers first when the model has none.

    If the adapter was trained for other sources than the model's, the model's heads are
    remapped first (`demucs_lora.model.remap_sources`), so a new model object may be
    returned: always use the return value.
    """
    header, tensors = read_adapter(path)
    sources = header.get("sources") or []
    if sources and list(getattr(model, "sources", sources)) != sources:
        if has_lora(model):
            raise AdapterMismatch(
                f"{path}: adapter sources {sources} differ from the model's {model.sources}; "
                "load it on the plain base model instead")
        from ..model import remap_sources
        model = remap_sources(model, sources, header.get("source_init"))
    if not has_lora(model):
        inject_lora(model, header["ranks"], alpha=header["alpha"], dropout=header["dropout"],
                    rslora=header["rslora"], bias=header["bias"],
                    enable_qkv=header["enable_qkv"], train_extra=header["train_extra"])
    else:
        _check_same_layout(lora_config(model), header, path)
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
    if check_base:
        non_lora = [n for n in expected if not n.rsplit(".", 1)[-1].startswith("lora_")]
        if not fingerprints_match(base_fingerprint(model, exclude=non_lora),
                                  header["base_fingerprint"]):
            raise AdapterMismatch(
                f"{path} was trained on a different base model (fingerprint of the frozen "
                "weights differs): load the base it was made for (see its .json header), "
                "or pass check_base=False if you know what you are doing")
    merged = [layer for _, layer in iter_lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    for layer in merged:
        layer.merge()
    return model
