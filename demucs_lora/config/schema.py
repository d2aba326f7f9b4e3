"""The known config keys, read from conf/ itself (no Hydra run).

`config.yaml`'s defaults list (settings.yaml, then the default option of each group:
model, dset, optim; variants only overlay) and its `dora` key, plus the constructor arguments of demucs' HTDemucs under
`htdemucs.`: a key added to conf/ is known at once. Both the alias table
(`demucs_lora.config.aliases`, which nests dotted YAML keys in closed sections only) and
the key checks (`demucs_lora.config.keys`) read it.
"""
from __future__ import annotations

import functools
import typing as tp
from pathlib import Path

from omegaconf import OmegaConf

from demucs_lora.core.paths import CONF_DIR
from demucs_lora.models.build import htdemucs_kwargs

PACKAGE_LINE = "# @package _global_"
OWN_KEYS = ("dora",)
"""The keys conf/config.yaml itself defines (besides hydra); the rest of it is the user's."""


def load_group_file(path: Path) -> dict:
    """A group option's keys, placed where Hydra puts them (_global_ or under the group)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    defaults = data.pop("defaults", None) or []
    out: dict = {}
    for item in defaults:                     # e.g. dset/five_stem: defaults: [synth]
        if isinstance(item, str) and item != "_self_":
            out = _merge(out, load_group_file(path.parent / f"{item}.yaml"))
    if not path.read_text().lstrip().startswith(PACKAGE_LINE):
        data = {path.parent.name: data}
    return _merge(out, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def known_schema(conf_dir: str) -> dict:
    """The known keys of the conf/ folder `conf_dir`, nested, with their defaults (cached:
    read it, do not modify it)."""
    conf = Path(conf_dir)
    root = OmegaConf.to_container(OmegaConf.load(conf / "config.yaml"), resolve=False)
    root.pop("hydra", None)
    out: dict = {}
    for item in root.pop("defaults", []):
        if isinstance(item, dict):
            ((group, option),) = item.items()
            if group != "variant" and option is not None:
                out = _merge(out, load_group_file(conf / group / f"{option}.yaml"))
        elif item == "_self_":   # config.yaml's own keys are the user's: only dora.* is ours
            out = _merge(out, {k: v for k, v in root.items() if k in OWN_KEYS})
        else:                    # a plain config file (settings.yaml): global keys
            data = OmegaConf.to_container(OmegaConf.load(conf / f"{item}.yaml"))
            out = _merge(out, {k: v for k, v in (data or {}).items() if k != "defaults"})
    htdemucs = out.setdefault("htdemucs", {})
    for key, default in htdemucs_kwargs().items():
        htdemucs.setdefault(key, default)
    return out


def lookup(path: str) -> tp.Tuple[bool, bool]:
    """(known, closed): known = the path or one of its parents is a known key; closed =
    the path is a known section whose keys are all known (a dict in the schema)."""
    node: tp.Any = known_schema(str(CONF_DIR))
    for part in path.split("."):
        if not isinstance(node, dict):
            return True, False        # under a free-form leaf (layer_ranks, source_init...)
        if part not in node:
            return False, False
        node = node[part]
    return True, isinstance(node, dict)


def is_known(path: str) -> bool:
    return lookup(path)[0]


def is_closed(path: str) -> bool:
    return lookup(path)[1]


def in_yaml_conf(path: str) -> bool:
    """The key is written in conf/ (so Hydra can override it without `++`)."""
    node: tp.Any = _yaml_only(str(CONF_DIR))
    for part in path.split("."):
        if not isinstance(node, dict):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


@functools.lru_cache(maxsize=None)
def _yaml_only(conf_dir: str) -> dict:
    data = dict(known_schema(conf_dir))
    kwargs = htdemucs_kwargs()
    model = load_group_file(Path(conf_dir) / "model" / "htdemucs.yaml")
    data["htdemucs"] = {k: v for k, v in data["htdemucs"].items()
                        if k in model["htdemucs"] or k not in kwargs}
    return data
