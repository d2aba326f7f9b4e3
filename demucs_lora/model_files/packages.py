"""One demucs model file, in either layout, read without running anything it carries.

- ``.th``: a pickled ``{klass, args, kwargs, state}`` package (``demucs.states``), opened
  by ``safe_load`` with ``weights_only=True`` and the model-class allowlist. A name of the
  form ``SIG-CHECKSUM.th`` (torch hub's cache, a demucs ``--repo`` folder) is checked as
  ``demucs.repo.LocalRepo`` does: the first hex digits of the file's sha256.
- ``.safetensors`` (demucs 4.1, its Hugging Face layout): tensors plus metadata
  ``klass`` (a dotted class name), ``args``/``kwargs`` (JSON, fractions encoded as
  ``{"_type": "fraction", ...}``). ``demucs.hf`` imports whatever ``klass`` names; here the
  name must be one of the allowlisted classes, compared as a string before anything is
  imported or constructed. Packed (DiffQ) states, whose metadata names classes to import,
  are refused.

``safetensors_writer`` writes the same layout (through ``core.files.atomic_write``), so
``demucs.hf`` reads our exports.
"""
from __future__ import annotations

import fractions
import json
import re
import typing as tp
from pathlib import Path

import torch

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.core.files import file_sha256
from demucs_lora.model_files.safe_load import MODEL_CLASSES, load_package, model_from_package

PathLike = tp.Union[str, Path]
CLASS_NAMES: tp.Dict[str, type] = {f"{c.__module__}.{c.__qualname__}": c for c in MODEL_CLASSES}
"""Dotted names a safetensors package's ``klass`` may hold, and the class each means."""
MAX_FRACTION = 10 ** 12
_CHECKSUMMED = re.compile(r"^(?P<sig>[^-]+)-(?P<checksum>[0-9a-f]{4,64})$")
MODEL_SUFFIXES = (".th", ".safetensors")


def checksum_of(path: Path) -> tp.Optional[str]:
    """The checksum a ``SIG-CHECKSUM.th`` name promises, or None for other names."""
    match = _CHECKSUMMED.match(path.stem) if path.suffix == ".th" else None
    return match.group("checksum") if match else None


def verify_checksum(path: Path) -> None:
    """sha256 prefix check of ``SIG-CHECKSUM.th`` files, as demucs' LocalRepo does."""
    expected = checksum_of(path)
    if expected is None:
        return
    actual = file_sha256(path)[:len(expected)]
    if actual != expected:
        raise ModelLoadError(
            f"{path}: checksum mismatch (the name says {expected}, the content hashes to "
            f"{actual}): the file is truncated, corrupt or was replaced. Delete it and fetch "
            "it again (`demucs -n NAME` once on a machine with network), or rename it "
            "without the checksum if you changed it on purpose.")


def _decode(value: tp.Any, source: str) -> tp.Any:
    """Inverse of demucs' JSON encoding of constructor arguments (fractions only)."""
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            num, den = value.get("numerator"), value.get("denominator")
            ok = all(isinstance(x, int) and not isinstance(x, bool) and abs(x) < MAX_FRACTION
                     for x in (num, den)) and den != 0
            if not ok:
                raise ModelLoadError(f"{source}: malformed fraction {value!r} in the model's "
                                     "arguments (integers below 1e12 expected)")
            return fractions.Fraction(num, den)
        return {str(k): _decode(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, source) for v in value]
    return value


def _encode(value: tp.Any) -> tp.Any:
    if isinstance(value, fractions.Fraction):
        return {"_type": "fraction", "numerator": value.numerator,
                "denominator": value.denominator}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _metadata_json(metadata: tp.Mapping[str, str], key: str, source: str) -> tp.Any:
    try:
        return _decode(json.loads(metadata[key]), source)
    except KeyError:
        raise ModelLoadError(f"{source}: no '{key}' in the safetensors metadata: not a demucs "
                             "model file (demucs 4.1 writes klass, args and kwargs)") from None
    except ValueError as exc:  # JSONDecodeError, or ints over Python's digit limit
        raise ModelLoadError(f"{source}: metadata '{key}' is not valid JSON ({exc})") from None


def read_safetensors_package(path: PathLike) -> tp.Dict[str, tp.Any]:
    """``{klass, args, kwargs, state}`` from a demucs 4.1 safetensors file, with ``klass``
    checked against the allowlist before any tensor is read."""
    from safetensors import safe_open
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelLoadError(f"Model file {path} does not exist (or is not a file).")
    try:
        with safe_open(source, framework="pt") as file:
            metadata = file.metadata() or {}
            klass_name = metadata.get("klass")
            if klass_name not in CLASS_NAMES:
                raise ModelLoadError(
                    f"Refusing to load model file {path}: its metadata names class "
                    f"{klass_name!r}, outside the allowlist ({', '.join(CLASS_NAMES)}). Model "
                    "files are code; only demucs model classes are constructed.")
            if "structure" in metadata:
                raise ModelLoadError(
                    f"{path} holds a packed (DiffQ-quantized) state whose metadata names "
                    "classes to import: load it with demucs.hf.load_safetensors_model (needs "
                    "diffq) if you trust it, and re-save it plain.")
            args = _metadata_json(metadata, "args", source)
            kwargs = _metadata_json(metadata, "kwargs", source)
            state = {key: file.get_tensor(key) for key in file.keys()}
    except ModelLoadError:
        raise
    except Exception as exc:  # truncated header, bad offsets, not a safetensors file
        raise ModelLoadError(f"Model file {path} is not a readable safetensors file: "
                             f"{exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ModelLoadError(f"{path}: metadata args must be a JSON list and kwargs a JSON "
                             "object")
    return {"klass": CLASS_NAMES[klass_name], "args": args, "kwargs": kwargs, "state": state}


def read_package(path: PathLike, trust_remote_code: bool = False) -> tp.Dict[str, tp.Any]:
    """The package of a model file in either layout (checksum verified first)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_package(path)
    if path.is_file():
        verify_checksum(path)
    return load_package(path, trust_remote_code=trust_remote_code)


def load_model_file(path: PathLike, trust_remote_code: bool = False, strict: bool = True
                    ) -> torch.nn.Module:
    """The model in a ``.th`` or ``.safetensors`` file, built strictly (train mode)."""
    path = Path(path)
    package = read_package(path, trust_remote_code)
    classes = list(MODEL_CLASSES)
    if trust_remote_code and path.suffix != ".safetensors":
        classes.append(package["klass"])
    return model_from_package(package, strict=strict, source=str(path),
                              allowed_classes=tuple(classes))


def safetensors_writer(model: torch.nn.Module, half: bool = False
                       ) -> tp.Callable[[str], None]:
    """A writer of ``model`` as demucs 4.1 stores it (``demucs.hf.load_safetensors_model``
    reads it): class name, args and kwargs as JSON metadata beside the state.

    The model must remember its constructor arguments (``demucs.states.capture_init``)."""
    from safetensors.torch import save_file
    klass = type(model)
    name = f"{klass.__module__}.{klass.__qualname__}"
    if name not in CLASS_NAMES:
        raise ModelLoadError(f"cannot write a {name} as a demucs package: only "
                             f"{list(CLASS_NAMES)} are demucs model classes")
    args, kwargs = model._init_args_kwargs
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"klass": name, "args": json.dumps(_encode(list(args))),
                "kwargs": json.dumps(_encode(dict(kwargs)))}
    return lambda tmp: save_file(state, tmp, metadata=metadata)
