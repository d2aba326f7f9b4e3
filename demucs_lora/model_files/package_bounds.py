"""Bounds on what a model package may ask for, checked before anything is allocated.

The weights_only allowlist (`safe_load`) stops code from running, but it still lets a
file describe an absurd model: ``channels=4096`` allocates 7 GB before failing, ``depth``
or ``t_layers`` in the millions loop for ever, a ``fractions.Fraction`` built from
``"1e2000000000"`` computes a two-billion-digit integer. So, before
``klass(*args, **kwargs)``:

1. `check_package_bounds` checks the kwargs' types (plain values only) and ranges
   (structural counts such as ``depth`` have small caps), then builds the model on the
   ``meta`` device (shapes only, no memory) and compares its parameter count with the
   tensors the file actually holds: a package describing a model much larger than its own
   state is refused with a `ModelLoadError`.
2. `bounded_fraction` / `SAFE_FRACTION` replace ``fractions.Fraction`` in the unpickling
   allowlist, so a Fraction bomb is refused while the file is read (the hang happens in
   ``torch.load`` itself, before any package check could run).
"""
from __future__ import annotations

import fractions
import math
import re
import typing as tp

import torch

from demucs_lora.core.errors import ModelLoadError

MAX_INT = 1 << 31
MAX_FLOAT = 1e12
MAX_STR = 256
MAX_ITEMS = 64
MAX_FRACTION_BITS = 64
COUNT_CAPS = {"depth": 16, "t_layers": 64, "dconv_depth": 16, "multi_freqs_depth": 16,
              "lstm_layers": 16, "t_heads": 1024}
"""Constructor arguments that are loop counts: real demucs models stay far below."""
SLACK = 1.05, 1_000_000  # the model may hold 5% + 1M more entries than the state (buffers)


def _fail(source: str, key: str, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: model argument {key} {problem}; the file was edited or "
                          "is not a demucs model (refused before building anything)")


def _check_value(value: tp.Any, key: str, source: str, depth: int = 0) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise _fail(source, key, f"is an integer of {value.bit_length()} bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_FLOAT:
            raise _fail(source, key, f"is {value!r}")
        return
    if isinstance(value, fractions.Fraction):
        bits = max(value.numerator.bit_length(), value.denominator.bit_length())
        if bits > MAX_FRACTION_BITS:
            raise _fail(source, key, f"is a Fraction of {bits}-bit terms")
        return
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise _fail(source, key, f"is a string of {len(value)} characters")
        return
    if isinstance(value, (list, tuple)) and depth < 2:
        if len(value) > MAX_ITEMS:
            raise _fail(source, key, f"is a list of {len(value)} items")
        for index, item in enumerate(value):
            _check_value(item, f"{key}[{index}]", source, depth + 1)
        return
    raise _fail(source, key, f"has type {type(value).__name__}, not a plain value")


def _state_numel(state: tp.Any, depth: int = 0) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict) and depth < 3:
        return sum(_state_numel(v, depth + 1) for v in state.values())
    if isinstance(state, (list, tuple)) and depth < 3:
        return sum(_state_numel(v, depth + 1) for v in state)
    return 0


def _meta_numel(klass: type, args: tp.Sequence, kwargs: tp.Mapping) -> tp.Optional[int]:
    """Parameters + buffers of the model the arguments describe, without allocating."""
    try:
        with torch.device("meta"):
            model = klass(*args, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError):
        return None  # the real constructor fails the same way, with its own error
    return sum(t.numel() for t in model.state_dict().values())


def check_package_bounds(klass: type, args: tp.Any, kwargs: tp.Any, state: tp.Any,
                         source: str = "<package>") -> None:
    """ModelLoadError unless `klass(*args, **kwargs)` is a plausible model for `state`."""
    if not isinstance(args, (list, tuple)) or len(args) > 8:
        raise _fail(source, "args", "must be a short list of positional arguments")
    if not isinstance(kwargs, dict) or len(kwargs) > 256:
        raise _fail(source, "kwargs", "must be a dict of keyword arguments")
    for index, value in enumerate(args):
        _check_value(value, f"args[{index}]", source)
    for key, value in kwargs.items():
        if not isinstance(key, str) or len(key) > MAX_STR:
            raise _fail(source, repr(key)[:40], "is not an argument name")
        _check_value(value, key, source)
        cap = COUNT_CAPS.get(key)
        if cap is not None and isinstance(value, int) and not 0 <= value <= cap:
            raise _fail(source, key, f"is {value}, outside [0, {cap}]")
    if isinstance(state, dict) and state.get("__quantized"):
        return  # DiffQ states: refused later with their own message
    stored = _state_numel(state)
    described = _meta_numel(klass, args, kwargs)
    if described is not None and described > stored * SLACK[0] + SLACK[1]:
        raise ModelLoadError(
            f"{source}: its arguments describe a {klass.__name__} of {described:,} "
            f"parameters ({described * 4 / 2**30:.1f} GB in float32) but the file holds "
            f"{stored:,} values: refusing to build it (edited arguments?)")


# ---------------------------------------------------------------------------- unpickling
_FRACTION_TEXT = re.compile(
    r"\s*[-+]?(?:\d{1,30}(?:/\d{1,30})?|\d{0,30}\.\d{0,30}(?:[eE][-+]?\d{1,2})?"
    r"|\d{1,30}[eE][-+]?\d{1,2})\s*")


def bounded_fraction(*args: tp.Any) -> fractions.Fraction:
    """``fractions.Fraction`` for the unpickler: short decimal strings or small integers
    only (``Fraction("1e2000000000")`` would compute a two-billion-digit number)."""
    if len(args) == 1 and isinstance(args[0], str):
        if len(args[0]) > 80 or not _FRACTION_TEXT.fullmatch(args[0]):
            raise ValueError(f"refusing Fraction({args[0][:40]!r}...): not a short decimal")
    elif not (1 <= len(args) <= 2 and all(
            isinstance(a, int) and not isinstance(a, bool)
            and a.bit_length() <= MAX_FRACTION_BITS for a in args)):
        raise ValueError("refusing a Fraction of huge or non-integer terms")
    return fractions.Fraction(*args)


SAFE_FRACTION = (bounded_fraction, "fractions.Fraction")
"""Allowlist entry for ``torch.serialization.safe_globals``: the name a pickle uses for
``fractions.Fraction``, bound to `bounded_fraction`."""
