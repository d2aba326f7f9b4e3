"""Every key that reaches a run is a known key: anything else is a ConfigError.

The known keys are read from conf/ itself (`demucs_lora.config.schema`): a key added to
conf/ is known at once.

Checked: command-line overrides before Hydra composes (`check_argv`), and the composed
config (`check_known_keys`): a key written in a YAML file, a dotted key inside YAML that
names nothing, a variant file without `# @package _global_` (its keys land under
`variant.`). Each error names the key, a close known key or the alias table entry. Hydra's
own composition errors become the same one-screen ConfigError (`hydra_error`).
"""
from __future__ import annotations

import difflib
import typing as tp

from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.aliases import (ALIASES, canonical_config, canonical_key,
                                        normalize_argv, split_override)
from demucs_lora.config.schema import (PACKAGE_LINE, in_yaml_conf, is_known, known_schema,
                                       lookup)
from demucs_lora.core.errors import ConfigError
from demucs_lora.core.paths import CONF_DIR

GROUPS = ("model", "dset", "optim", "variant")


def _all_paths(node: tp.Any, prefix: str = "") -> tp.List[str]:
    if not isinstance(node, dict):
        return [prefix] if prefix else []
    out = [prefix] if prefix else []
    for key, value in node.items():
        out += _all_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _leaf_paths(node: dict, prefix: str) -> tp.List[str]:
    out = []
    for key, value in node.items():
        full = f"{prefix}.{key}"
        out += _leaf_paths(value, full) if isinstance(value, dict) and value else [full]
    return out


def suggest(path: str) -> str:
    """' (did you mean X?)', the alias entry, or ''."""
    if path in ALIASES:
        return f" (the guide's spelling of {ALIASES[path].canonical})"
    if path.split(".")[0] == "lora":
        return (" (MSST's `lora:` block: r, lora_alpha, lora_dropout and enable_lora are "
                "htdemucs.lora_rank, htdemucs.lora_alpha, htdemucs.lora_dropout and "
                "htdemucs.lora_enable_qkv here; merge_weights and fan_in_fan_out: false only)")
    schema_ = known_schema(str(CONF_DIR))
    parent, _, leaf = path.rpartition(".")
    section = schema_
    for part in parent.split(".") if parent else []:
        section = section.get(part) if isinstance(section, dict) else None
    prefix = f"{parent}." if parent else ""
    siblings = list(section) if isinstance(section, dict) else []
    siblings += [a[len(prefix):] for a in ALIASES if a.startswith(prefix)
                 and "." not in a[len(prefix):]]
    picks = [prefix + k for k in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.7)]
    known = _all_paths(schema_) + list(ALIASES)
    picks += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != path]
    picks += difflib.get_close_matches(path, known, n=2, cutoff=0.85)
    picks = list(dict.fromkeys(picks))[:3]
    if not picks:
        return ""
    shown = [f"{p} (= {ALIASES[p].canonical})" if p in ALIASES else p for p in picks]
    return f" (did you mean {' or '.join(shown)}?)"


def _unknown_message(path: str, where: str) -> str:
    if path.startswith("variant."):
        inner = path[len("variant."):]
        return (f"{path} ({where}): a variant file without `{PACKAGE_LINE}` as its first line puts "
                f"its keys under `variant.`, so {inner} would be ignored. Fix: add "
                f"`{PACKAGE_LINE}` as the variant's first line")
    return f"unknown key {path} ({where}){suggest(path)}"


def check_argv(argv: tp.Sequence[str]) -> tp.List[str]:
    """Refuse unknown keys in (already alias-normalized) overrides; known HTDemucs
    arguments absent from conf/ get Hydra's `++` (add or override). Returns the argv."""
    out, problems = [], []
    for arg in argv:
        prefix, key, value = split_override(arg)
        if value is None and prefix != "~":
            problems.append(f"override {arg!r}: expected key=value (e.g. epochs=10)")
            continue
        if key in GROUPS or key.startswith("hydra.") or "/" in key or key == "hydra":
            out.append(arg)
            continue
        if not is_known(key):
            problems.append(_unknown_message(key, "command line"))
            continue
        if prefix in ("", "+") and not in_yaml_conf(key):
            arg = f"++{key}={value}"
        elif prefix == "+":
            arg = f"++{key}={value}"      # the key exists already: `+` would be refused
        out.append(arg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          "\n  " + "\n  ".join(problems))
    return out


def unknown_keys(cfg: tp.Any, path: str = "") -> tp.List[str]:
    """Paths of `cfg` (a canonical config) that name no known key."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    out = []
    for key, value in cfg.items():
        full = f"{path}.{key}" if path else str(key)
        if full in ("hydra",):
            continue
        known, closed = lookup(full)
        if not known and full == "variant" and isinstance(value, dict):
            out += _leaf_paths(value, full)
        elif not known:
            out.append(full)
        elif closed and isinstance(value, dict):
            out += unknown_keys(value, full)
    return out


def check_known_keys(cfg: DictConfig, where: str = "in the composed config") -> None:
    """ConfigError naming every unknown key of a canonical config (one line each)."""
    bad = unknown_keys(cfg)
    if not bad:
        return
    lines = [_unknown_message(p, where) for p in bad]
    raise ConfigError(lines[0] if len(lines) == 1 else "\n  " + "\n  ".join(lines))


def cli_keys(argv: tp.Sequence[str]) -> tp.List[str]:
    """Canonical keys set by command-line overrides (groups and hydra.* left out)."""
    keys = []
    for arg in argv:
        _, key, value = split_override(arg)
        if value is not None and key not in GROUPS and not key.startswith("hydra"):
            keys.append(canonical_key(key))
    return keys


def hydra_error(exc: BaseException) -> ConfigError:
    """One-screen ConfigError from a Hydra/OmegaConf composition error."""
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}\n{str(cause).strip()}"
    lines = [line for line in text.splitlines() if line.strip()
             and not line.lstrip().startswith(("full_key:", "object_type", "reference_type",
                                               "Set the environment variable HYDRA_FULL",
                                               "provider=", "Config search path"))]
    key = None
    for line in lines:
        if "Key '" in line and "not in struct" in line:
            key = line.split("Key '", 1)[1].split("'", 1)[0]
    if len(lines) > 12:
        lines = lines[:12] + [f"... ({len(lines) - 12} more lines)"]
    message = "\n  ".join(lines)
    if key is not None:
        message += suggest(key)
    if type(exc).__module__.split(".")[0] == "yaml":
        return ConfigError(f"a config file is not valid YAML: {message}")
    return ConfigError(f"the config cannot be composed from these overrides: {message}")


def is_hydra_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("hydra", "omegaconf", "yaml")


def prepare_argv(argv: tp.Sequence[str]) -> tp.List[str]:
    """Overrides in canonical spelling, unknown keys refused (before Hydra composes)."""
    return check_argv(normalize_argv(list(argv)))


def check_one_spelling(argv: tp.Sequence[str]) -> None:
    """ConfigError when two spellings of one key are both given (`htdemucs.segment=12
    dset.segment=1`): which one the user meant is not ours to guess. The same spelling
    twice is Hydra's usual "last wins"."""
    seen: tp.Dict[str, str] = {}
    for arg in argv:
        _, key, value = split_override(arg)
        if value is None or key in GROUPS or key.startswith("hydra"):
            continue
        canonical = canonical_key(key)
        first = seen.setdefault(canonical, key)
        if first != key:
            raise ConfigError(f"{first} and {key} are two spellings of {canonical}, and both "
                              "are given: keep one")


def canonical_checked(cfg: DictConfig, argv: tp.Sequence[str] = (),
                      where: str = "in a config file") -> DictConfig:
    """The composed config with canonical keys only; ConfigError on any unknown key."""
    out = canonical_config(cfg, cli_keys(argv))
    check_known_keys(out, where)
    return out
