"""A config value as plain Python, the one converter for OmegaConf nodes and the values a
model records (tuples, ``fractions.Fraction``).

Why one: a value read from a Hydra config (ListConfig, DictConfig), from a model's
constructor arguments (tuples, fractions) or from YAML (lists) must compare equal and
print the same wherever it is checked or recorded. An OmegaConf node is converted by
OmegaConf itself (interpolations resolved, a required ``???`` read as the string '???');
omegaconf is imported only then.
"""
from __future__ import annotations

import fractions
import typing as tp


def plain(value: tp.Any, sequence: tp.Callable[[tp.Iterable], tp.Any] = list) -> tp.Any:
    """``value`` with every mapping (DictConfig included) a dict, every list, tuple or
    ListConfig a ``sequence`` (``list``, or ``tuple`` for a hashable dataclass field) and
    every Fraction a float, recursively; strings, numbers and None as they are."""
    if type(value).__module__.startswith("omegaconf."):   # DictConfig, ListConfig
        from omegaconf import OmegaConf
        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    if isinstance(value, fractions.Fraction):
        return float(value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    if hasattr(value, "items"):
        return {k: plain(v, sequence) for k, v in value.items()}
    return sequence(plain(v, sequence) for v in value)
