"""Adapter files: a safetensors file of tensors plus its JSON header, as a pair.

An adapter holds the LoRA factors and whatever else was trained (heads, biases), never
pickled classes. The header says how to rebuild the layers (`lora.config.LoraLayout`:
ranks, alpha, ...) so loading needs no recomputation, carries a fingerprint of the frozen
base weights (`lora.state`), and the tensors' sha256, so that a pair torn by a kill is
detected. Everything here is checked before any tensor is allocated on a model.
"""
from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from demucs_lora.core.errors import AdapterMismatch
from demucs_lora.core.files import atomic_write_group, file_sha256
from demucs_lora.core.finite import nonfinite_names
from demucs_lora.lora.config import BIAS_MODES, HEADER_KEYS, SAVE_DTYPE_NAMES

FORMAT = "demucs-lora-adapter/1"
SAVE_DTYPES = {name: getattr(torch, name) for name in SAVE_DTYPE_NAMES}


def adapter_paths(path: tp.Union[str, Path]) -> tp.Tuple[Path, Path]:
    """`x`, `x.safetensors` or `x.json` -> (x.safetensors, x.json)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


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


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LoRA factors in `dtype` (other trained tensors, e.g. heads, stay as they are)."""
    if dtype == torch.float32 or not name.rsplit(".", 1)[-1].startswith("lora_"):
        return tensor
    out = tensor.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} does not fit in {dtype} (values up to "
                         f"{tensor.abs().max().item():.3g}): save it with save_dtype=float32")
    return out


def write_adapter(path: tp.Union[str, Path], tensors: tp.Mapping[str, torch.Tensor],
                  header: dict, save_dtype: str = "float32") -> tp.Tuple[Path, Path]:
    """Write `path.safetensors` + `path.json` as a pair (see `lora.state.save_adapter`)."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}: allowed values are {list(SAVE_DTYPES)}")
    tensors_path, header_path = adapter_paths(path)
    tensors = {k: _stored(k, v, SAVE_DTYPES[save_dtype]).contiguous().cpu()
               for k, v in tensors.items()}
    metadata = {"demucs_lora": json.dumps({k: v for k, v in header.items()
                                           if k != "base_fingerprint"})}
    digest: tp.Dict[str, str] = {}

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        digest["sha256"] = file_sha256(tmp)

    def write_header(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(dict(header, tensors_sha256=digest["sha256"]),
                                        indent=2))
    atomic_write_group([(tensors_path, write_tensors), (header_path, write_header)])
    return tensors_path, header_path


# ---------------------------------------------------------------------------- reading
MAX_RANK = 1 << 16
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
    for key in HEADER_KEYS + ("base_fingerprint",):
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
    scaling_rank = header.get("scaling_rank")
    if scaling_rank is not None and (not _is_int(scaling_rank) or
                                     not 1 <= scaling_rank <= MAX_RANK):
        raise _bad(path, "scaling_rank", f"is {scaling_rank!r}: null or an integer in "
                   f"[1, {MAX_RANK}] (htdemucs.lora_scaling=mean_rank)")
    if header.get("lora_init") is not None and not isinstance(header["lora_init"], dict):
        raise _bad(path, "lora_init", "must be an object {method, ...}")
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


def read_tensors(tensors_path: Path, header: dict) -> tp.Dict[str, torch.Tensor]:
    """The tensors of the pair: checked against the header's checksum, float dtypes only,
    and finite (NaN/inf adapters are refused, see demucs_lora.core.finite)."""
    if not tensors_path.is_file():
        raise AdapterMismatch(f"adapter file {tensors_path} does not exist (an adapter is "
                              "a .safetensors file plus its .json header)")
    expected = header.get("tensors_sha256")
    if expected is not None and file_sha256(tensors_path) != expected:
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
    return header, read_tensors(tensors_path, header)
