"""Adapter files: safetensors tensors plus a JSON header, and a fingerprint of the base.

An adapter holds the LoRA factors and whatever else was trained (heads, biases), never
pickled classes. The header says how to rebuild the layers (ranks, alpha, ...) so loading
needs no recomputation, and carries a fingerprint of the frozen base weights so that an
adapter loaded on the wrong base is an `AdapterMismatch`, not garbage output.
"""
from __future__ import annotations

import hashlib
import json
import math
import typing as tp
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from demucs_lora import __version__
from demucs_lora.core.errors import AdapterMismatch, ConfigError
from demucs_lora.core.files import atomic_write_group
from demucs_lora.lora.inject import BIAS_MODES, has_lora, inject_lora, iter_lora_layers, lora_config

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
        # A bag (demucs.apply.BagOfModels): layers of member K are under "models.K.".
        "bag": ({"members": len(model.models), "weights": [list(map(float, w))
                                                            for w in model.weights]}
                if isinstance(getattr(model, "models", None), nn.ModuleList) else None),
        "base_fingerprint": base_fingerprint(model, exclude=non_lora),
    }
    header.update(extra)
    return header


def _sha256(path: tp.Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Write `path.safetensors` + `path.json` as a pair; extra keys go into the header.

    Both go to temporary files first and are renamed together, the header last; the
    header carries the tensors' sha256, so a pair torn by a kill between the two renames
    is detected on load instead of mixing two versions. `save_dtype` (float32 | float16 |
    bfloat16, `htdemucs.lora_save_dtype`): the dtype of the stored LoRA factors, recorded
    in the header; loading casts them back to the model's dtype, so only float32 reloads
    bit-exactly."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}: allowed values are {list(SAVE_DTYPES)}")
    tensors_path, header_path = adapter_paths(path)
    header = adapter_header(model, save_dtype=save_dtype, **extra)
    tensors = {k: _stored(k, v, SAVE_DTYPES[save_dtype]).contiguous().cpu()
               for k, v in get_lora_state(model).items()}
    metadata = {"demucs_lora": json.dumps({k: v for k, v in header.items()
                                           if k != "base_fingerprint"})}
    digest: tp.Dict[str, str] = {}

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        digest["sha256"] = _sha256(tmp)

    def write_header(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(dict(header, tensors_sha256=digest["sha256"]),
                                        indent=2))
    atomic_write_group([(tensors_path, write_tensors), (header_path, write_header)])
    return tensors_path, header_path


NOT_ADAPTER_SUFFIXES = (".pth", ".th", ".pt", ".ckpt", ".bin")


def check_adapter_path(path: tp.Union[str, Path]) -> None:
    """AdapterMismatch for a torch checkpoint / model file given where an adapter goes."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in NOT_ADAPTER_SUFFIXES:
        raise AdapterMismatch(
            f"{path} is a {suffix} file (a torch model or checkpoint), not an adapter: an "
            "adapter is a pair NAME.safetensors + NAME.json (its header), as training writes "
            "them (outputs/xps/SIG/lora_best, lora_last) and tools.export --include-lora "
            "(NAME.lora); pass that path, with or without its suffix, or an XP signature")



# ---------------------------------------------------------------------------- reading
MAX_RANK = 1 << 16
RANK_SLACK = 64  # ranks above a layer's smallest dim are useless, but inject_lora allows
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _bad(path: Path, key: str, problem: str) -> AdapterMismatch:
    return AdapterMismatch(f"{path}: header key {key!r} {problem} (edited or not a "
                           "demucs-lora adapter header)")


def _is_int(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: tp.Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _str_list(value: tp.Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_header(header: tp.Any, path: Path) -> dict:
    """The header, once every key the loader uses has the right type and range; an
    AdapterMismatch naming the file and key otherwise. Runs before any tensor exists."""
    if not isinstance(header, dict):
        raise AdapterMismatch(f"{path}: the header is a {type(header).__name__}, not a JSON "
                              "object (edited or not a demucs-lora adapter header)")
    if header.get("format") != FORMAT:
        raise AdapterMismatch(f"{path}: unknown adapter format {header.get('format')!r}")
    for key in ("ranks", "alpha", "dropout", "rslora", "bias", "enable_qkv", "train_extra",
                "base_fingerprint"):
        if key not in header:
            raise _bad(path, key, "is missing")
    ranks = header["ranks"]
    if not isinstance(ranks, dict) or len(ranks) > 10000:
        raise _bad(path, "ranks", "must be an object {layer: rank}")
    for name, rank in ranks.items():
        if not _is_int(rank) or not 1 <= rank <= MAX_RANK:
            raise _bad(path, f"ranks.{name}", f"is {rank!r}: a rank is an integer in "
                       f"[1, {MAX_RANK}]")
    if not _is_number(header["alpha"]) or header["alpha"] < 0:
        raise _bad(path, "alpha", f"is {header['alpha']!r}: it must be a finite number >= 0")
    if not _is_number(header["dropout"]) or not 0 <= header["dropout"] < 1:
        raise _bad(path, "dropout", f"is {header['dropout']!r}: it must be in [0, 1)")
    if not isinstance(header["rslora"], bool):
        raise _bad(path, "rslora", "must be true or false")
    if header["bias"] not in BIAS_MODES:
        raise _bad(path, "bias", f"must be one of {list(BIAS_MODES)}")
    qkv = header["enable_qkv"]
    if not isinstance(qkv, list) or len(qkv) != 3 or not all(isinstance(x, bool) for x in qkv):
        raise _bad(path, "enable_qkv", "must be three booleans [q, k, v]")
    if not _str_list(header["train_extra"]):
        raise _bad(path, "train_extra", "must be a list of module names")
    if header.get("sources") is not None and not _str_list(header["sources"]):
        raise _bad(path, "sources", "must be a list of source names")
    if header.get("source_init") is not None and not isinstance(header["source_init"], dict):
        raise _bad(path, "source_init", "must be an object {new_source: base_source(s)}")
    fingerprint = header["base_fingerprint"]
    if not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("shapes_sha256"), str)
            and isinstance(fingerprint.get("stats"), list)
            and all(isinstance(x, list) and len(x) == 2 and all(_is_number(v) for v in x)
                    for x in fingerprint["stats"])):
        raise _bad(path, "base_fingerprint", "must be {shapes_sha256, stats: [[mean, "
                   "abs_mean], ...]}")
    return header


def read_header(path: tp.Union[str, Path]) -> dict:
    """The validated JSON header of an adapter (path of the pair, .json or .safetensors)."""
    check_adapter_path(path)
    _, header_path = adapter_paths(path)
    if not header_path.is_file():
        raise AdapterMismatch(f"adapter file {header_path} does not exist (an adapter is a "
                              ".safetensors file plus its .json header)")
    try:
        header = json.loads(header_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterMismatch(f"{header_path}: the header is not readable JSON ({exc})"
                              ) from None
    return check_header(header, header_path)


def _open_tensors(tensors_path: Path, header: dict) -> tp.Dict[str, torch.Tensor]:
    """The tensors of the pair: checked against the header's checksum, float dtypes only,
    and finite (NaN/inf adapters are refused, see demucs_lora.core.finite)."""
    if not tensors_path.is_file():
        raise AdapterMismatch(f"adapter file {tensors_path} does not exist (an adapter is "
                              "a .safetensors file plus its .json header)")
    expected = header.get("tensors_sha256")
    if expected is not None and _sha256(tensors_path) != expected:
        raise AdapterMismatch(
            f"{tensors_path} does not match its header {tensors_path.with_suffix('.json')} "
            "(checksum): the pair was torn (a write cut short?) or one file was replaced; "
            "write the adapter again")
    try:
        with safe_open(str(tensors_path), "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            bad = {k: d for k, d in dtypes.items() if d not in FLOAT_DTYPES}
            if bad:
                raise AdapterMismatch(
                    f"{tensors_path}: tensor(s) {sorted(bad)[:5]} have dtype "
                    f"{sorted(set(bad.values()))}, an adapter holds floating-point tensors only")
            tensors = {k: f.get_tensor(k) for k in dtypes}
    except AdapterMismatch:
        raise
    except Exception as exc:  # safetensors' own error for truncated / empty / junk files
        raise AdapterMismatch(f"{tensors_path} is not a readable safetensors file "
                              f"(truncated or corrupt: {exc})") from None
    from demucs_lora.core.finite import nonfinite_names
    nonfinite = nonfinite_names(tensors)
    if nonfinite:
        raise AdapterMismatch(
            f"{tensors_path} holds NaN/inf in {len(nonfinite)} tensor(s) (first: "
            f"{nonfinite[:3]}): the training that made it diverged; use another adapter")
    return tensors


def read_adapter(path: tp.Union[str, Path]) -> tp.Tuple[dict, tp.Dict[str, torch.Tensor]]:
    """(validated header, checked tensors) of an adapter pair."""
    tensors_path, _ = adapter_paths(path)
    header = read_header(path)
    return header, _open_tensors(tensors_path, header)


def check_ranks_fit(model: nn.Module, header: dict, path: tp.Union[str, Path]) -> None:
    """Every header rank names a layer of `model` and is at most its smallest dimension
    (or RANK_SLACK, which `inject_lora` also accepts), so that injecting allocates about
    the layer's own size at most: checked before any allocation."""
    from demucs_lora.lora.ranks import _layer_info
    path = adapter_paths(path)[1]  # errors name the header file
    qkv = header["enable_qkv"]
    for name, rank in header["ranks"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}' names no layer of "
                                  f"this {type(model).__name__}") from None
        try:
            cap = _layer_info(module, qkv, "").max_rank
        except (AttributeError, TypeError, ValueError):
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}': LoRA cannot wrap a "
                                  f"{type(module).__name__}") from None
        if rank > max(cap, RANK_SLACK):
            raise AdapterMismatch(f"{path}: header key 'ranks.{name}' is {rank}, far above "
                                  f"the layer's smallest dimension {cap} (the most a LoRA "
                                  "rank can use there)")
    for name in header["train_extra"]:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"{path}: header key 'train_extra' names {name!r}, no "
                                  f"module of this {type(model).__name__}") from None


def _layout_differences(config: dict, header: dict) -> tp.List[str]:
    """One readable item per difference, e.g. ``alpha: model 16.0, adapter 32.0`` or, for
    ranks, the layers that differ (``encoder.0.conv: model 8, adapter 4``)."""
    out = []
    for key in LAYOUT_KEYS:
        mine, theirs = config.get(key), header.get(key)
        if mine == theirs:
            continue
        if key == "ranks":
            mine, theirs = dict(mine or {}), dict(theirs or {})
            layers = [f"{n}: model {mine.get(n, 'none')}, adapter {theirs.get(n, 'none')}"
                      for n in sorted(set(mine) | set(theirs)) if mine.get(n) != theirs.get(n)]
            more = f" (+{len(layers) - 5} more)" if len(layers) > 5 else ""
            out.append(f"ranks of {len(layers)} layer(s) [{'; '.join(layers[:5])}{more}]")
        else:
            out.append(f"{key}: model {mine!r}, adapter {theirs!r}")
    return out


LAYOUT_KEYS = ("ranks", "alpha", "rslora", "bias", "enable_qkv", "train_extra")


def _check_same_layout(config: dict, header: dict, path) -> None:
    """Swapping tensors is only right when the layers were built the same way."""
    diff = _layout_differences(config, header)
    if diff:
        raise AdapterMismatch(
            f"{path}: the model's LoRA layers differ from this adapter in {'; '.join(diff)}; "
            "load it on the plain base model (remove_lora first) instead of swapping")


def load_lora_weights(model: nn.Module, path: tp.Union[str, Path],
                      check_base: bool = True) -> nn.Module:
    """Load an adapter strictly, injecting the LoRA layers first when the model has none.

    If the adapter was trained for other sources than the model's, the model's heads are
    remapped first (`demucs_lora.models.build.remap_model`), so a new model object may be
    returned: always use the return value. The header is validated, and its ranks checked
    against the layers, before any tensor is read or allocated.
    """
    header = read_header(path)
    sources = header.get("sources") or []
    if sources and list(getattr(model, "sources", sources)) != sources:
        if has_lora(model):
            raise AdapterMismatch(
                f"{path}: adapter sources {sources} differ from the model's {model.sources}; "
                "load it on the plain base model instead")
        from demucs_lora.models.build import remap_model
        try:
            model = remap_model(model, sources, header.get("source_init"))
        except ConfigError as exc:
            raise AdapterMismatch(f"{path}: header keys 'sources'/'source_init' do not fit "
                                  f"this model: {exc}") from None
    if not has_lora(model):
        check_ranks_fit(model, header, path)
        tensors = _open_tensors(adapter_paths(path)[0], header)
        inject_lora(model, header["ranks"], alpha=header["alpha"], dropout=header["dropout"],
                    rslora=header["rslora"], bias=header["bias"],
                    enable_qkv=header["enable_qkv"], train_extra=header["train_extra"])
    else:
        _check_same_layout(lora_config(model), header, path)
        tensors = _open_tensors(adapter_paths(path)[0], header)
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
    from demucs_lora.models.methods import attach  # the guide's model.load_lora_weights & co.
    return attach(model)
