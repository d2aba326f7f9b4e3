"""Load demucs model files without running the code a pickle can carry.

A demucs ``.th`` model file is a pickled dict ``{klass, args, kwargs, state, ...}``;
``demucs.states.load_model`` opens it with ``torch.load(weights_only=False)``, so a file
from a stranger can execute anything. Here files are opened with ``weights_only=True``
and an allowlist: the demucs model classes (only referenced, as ``klass``) and the
plain types their kwargs hold (``fractions.Fraction``: HTDemucs keeps ``segment`` as a
Fraction in the published models). Anything else is refused with a ``ModelLoadError``
naming the file and the offending globals, unless the caller passes
``trust_remote_code=True``, which falls back to full unpickling with a warning.

``model_from_package`` then builds the model strictly: unknown constructor kwargs and
missing/unexpected/mis-shaped state entries are errors (``strict=False`` gives demucs'
lenient behaviour). float16 states (``serialize_model(half=True)``) are cast to
float32. Packages written by ``demucs_lora.model_files.int8`` (a ``quantized`` key) are
dequantized; demucs' own DiffQ states (``state['__quantized']``) need ``diffq``. The one
loader of a model file by path, either layout, is
``demucs_lora.model_files.packages.load_model_file``.
"""
from __future__ import annotations

import inspect
import logging
import pickle
import re
import typing as tp
import warnings
from pathlib import Path

import torch
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.model_files.package_bounds import SAFE_FRACTION
from demucs_lora.model_files.int8 import Int8Package

logger = logging.getLogger(__name__)

MODEL_CLASSES: tp.Tuple[type, ...] = (HTDemucs, HDemucs, Demucs)
"""Classes a package's ``klass`` may name. demucs.wdemucs.WDemucs is HDemucs."""

PLAIN_GLOBALS: tp.Tuple[tp.Any, ...] = (SAFE_FRACTION,)
"""Non-tensor types found in the kwargs of real demucs packages: ``fractions.Fraction``,
bound to a constructor that refuses huge numerators (``package_bounds``)."""

SAFE_GLOBALS: tp.List[tp.Any] = [*MODEL_CLASSES, *PLAIN_GLOBALS, Int8Package]
"""Int8Package: the ``klass`` of int8 packages (it only refuses the stock loader)."""

PACKAGE_KEYS = ("klass", "args", "kwargs", "state")


def _qualname(obj: tp.Any) -> str:
    if isinstance(obj, tuple):  # (callable, "the.name.it.stands.for")
        return obj[1]
    return f"{obj.__module__}.{obj.__qualname__}"


def _offending_globals(path: Path, exc: Exception, allowed: tp.Sequence[tp.Any]) -> tp.List[str]:
    """Globals in the file outside the allowlist, found by scanning opcodes (nothing runs)."""
    allowed_names = {_qualname(g) for g in allowed}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        found = sorted(n for n in names if n not in allowed_names)
    except Exception:  # legacy (non-zip) files: read the name from torch's message
        found = []
    if not found:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    return found


def _refusal(path: Path, offending: tp.Sequence[str], exc: Exception,
             allowed: tp.Sequence[tp.Any]) -> ModelLoadError:
    allowed_names = ", ".join(_qualname(g) for g in allowed)
    if offending:
        what = f"it needs global(s) {', '.join(offending)}, outside the allowlist ({allowed_names})"
    else:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(exc), re.S)
        what = ("it cannot be unpickled safely ("
                f"{reason.group(1).strip() if reason else type(exc).__name__})")
    return ModelLoadError(
        f"Refusing to load model file {path}: {what}. Model files are code: unpickling "
        "this one fully could run anything it contains. Pass trust_remote_code=true only "
        "if you trust the file and where it came from.")


def load_package(path: tp.Union[str, Path], trust_remote_code: bool = False,
                 extra_globals: tp.Sequence[tp.Any] = ()) -> tp.Dict[str, tp.Any]:
    """Unpickle a demucs model package with ``weights_only=True`` and the allowlist.

    ``extra_globals`` widens the allowlist (classes/functions the caller vouches for).
    Raises ModelLoadError for a missing, unreadable, refused or non-package file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Model file {path} does not exist (or is not a file).")
    allowed = [*SAFE_GLOBALS, *extra_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            package = torch.load(path, "cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        offending = _offending_globals(path, exc, allowed)
        if not trust_remote_code:
            raise _refusal(path, offending, exc, allowed) from None
        logger.warning("Loading %s with full unpickling (trust_remote_code=true); globals "
                       "outside the allowlist: %s", path, ", ".join(offending) or "unknown")
        package = _load_trusted(path)
    except Exception as exc:  # truncated/corrupt files raise all sorts (struct.error, ...)
        raise ModelLoadError(f"Model file {path} is not a readable torch file: {exc}") from exc
    check_package(package, str(path))
    return package


def _load_trusted(path: Path) -> tp.Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, "cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"Model file {path} could not be loaded even with full "
                             f"unpickling: {exc}") from exc


def check_package(package: tp.Any, source: str = "<package>") -> None:
    """Raise ModelLoadError unless ``package`` looks like a demucs serialized model."""
    if not isinstance(package, dict) or any(k not in package for k in PACKAGE_KEYS):
        keys = sorted(package) if isinstance(package, dict) else type(package).__name__
        raise ModelLoadError(
            f"{source} is not a demucs model package: expected keys {list(PACKAGE_KEYS)} "
            f"(as written by demucs.states.serialize_model), found {keys}. A training "
            "checkpoint or bare state_dict is not a model file.")


def _check_kwargs(klass: type, kwargs: tp.Dict[str, tp.Any], strict: bool, source: str
                  ) -> tp.Dict[str, tp.Any]:
    params = inspect.signature(klass).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and strict:
        raise ModelLoadError(
            f"{source}: {klass.__name__} has no argument(s) {unknown}; the file was written "
            "by another demucs version or edited. Load with strict=false to drop them.")
    for key in unknown:
        logger.warning("%s: dropping unknown %s argument %r", source, klass.__name__, key)
    return {k: v for k, v in kwargs.items() if k not in unknown}


def _float_state(package: tp.Dict[str, tp.Any], source: str) -> tp.Dict[str, torch.Tensor]:
    state = package["state"]
    if package.get("quantized"):
        from demucs_lora.model_files.int8 import dequantize_state
        return dequantize_state(state)
    if state.get("__quantized"):
        raise ModelLoadError(
            f"{source} holds a DiffQ-quantized demucs state; load it with "
            "demucs.states.load_model (needs the diffq package), then re-save it plain.")
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in state.items()}


STORED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtypes(expected: tp.Mapping[str, torch.Tensor], state: tp.Mapping[str, tp.Any],
                  source: str) -> None:
    """ModelLoadError naming the first tensor whose dtype the architecture does not define:
    a float parameter stored as int32 would load silently (load_state_dict casts)."""
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None:
            continue          # an unexpected key: load_state_dict (strict) names it
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{source}: state entry {key} is a {type(tensor).__name__}, "
                                 "not a tensor")
        ok = tensor.dtype in STORED_FLOAT_DTYPES if want.is_floating_point() \
            else tensor.dtype == want.dtype
        if not ok:
            allowed = "float16, bfloat16 or float32" if want.is_floating_point() \
                else str(want.dtype)
            raise ModelLoadError(f"{source}: tensor {key} is stored as {tensor.dtype}, but "
                                 f"the architecture defines it as {allowed}: the file is "
                                 "corrupt or was edited")


def model_from_package(package: tp.Dict[str, tp.Any], strict: bool = True,
                       source: str = "<package>",
                       allowed_classes: tp.Sequence[type] = MODEL_CLASSES) -> torch.nn.Module:
    """Build the model a package describes and load its state (strict by default)."""
    check_package(package, source)
    klass = package["klass"]
    if package.get("quantized"):  # int8: klass is Int8Package, the model class is here
        klass = package["quantized"].get("klass", klass)
    if not (isinstance(klass, type) and issubclass(klass, torch.nn.Module)):
        raise ModelLoadError(f"{source}: klass {klass!r} is not a torch module class.")
    if klass not in allowed_classes:
        raise ModelLoadError(f"{source}: klass {_qualname(klass)} is not one of the allowed "
                             f"model classes {[c.__name__ for c in allowed_classes]}.")
    kwargs = _check_kwargs(klass, package["kwargs"], strict, source)
    # before allocating (issue 15)
    from demucs_lora.model_files.package_bounds import check_package_bounds
    check_package_bounds(klass, package["args"], kwargs, package["state"], source)
    try:
        model = klass(*package["args"], **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelLoadError(f"{source}: {klass.__name__}(...) failed with its stored "
                             f"arguments: {exc!r}") from exc
    state = _float_state(package, source)
    _check_dtypes(model.state_dict(), state, source)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: the stored state does not fit {klass.__name__}: "
                             f"{exc}") from exc
    return model

