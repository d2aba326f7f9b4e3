"""The shapes of a value rule and their one message form, ``KEY=VALUE: what is allowed``.

Why here: every room checks the values it owns (``lora.config`` the ``htdemucs.lora_*``
keys, ``data`` the dataset's, ``config.values`` the run's numbers), and a user reads one
kind of sentence whichever room refused the value. A number is a real, finite int or
float (never a bool: ``true`` is not 1 here).
"""
from __future__ import annotations

import math
import typing as tp

from demucs_lora.core.errors import ConfigError


def value_error(key: str, value: tp.Any, allowed: str) -> ConfigError:
    """The error for ``key=value``: ``allowed`` says what would be accepted."""
    return ConfigError(f"{key}={value!r}: {allowed}")


def is_number(value: tp.Any, integer: bool = False) -> bool:
    """A finite int or float (not a bool); with ``integer``, a whole one (2.0 counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return not integer or float(value).is_integer()


def check_int(value: tp.Any, key: str, minimum: int) -> int:
    """``value`` as an int (a whole float is accepted), at least ``minimum``."""
    if not is_number(value, integer=True) or int(value) < minimum:
        raise value_error(key, value, f"must be an integer >= {minimum}")
    return int(value)


def check_bool(value: tp.Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise value_error(key, value, "give true or false")
    return value


def check_choice(value: tp.Any, key: str, allowed: tp.Sequence[tp.Any]) -> tp.Any:
    if value not in allowed:
        raise value_error(key, value, f"allowed values are {list(allowed)}")
    return value
