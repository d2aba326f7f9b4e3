"""The guide's spellings of config keys: one table, alias -> canonical key.

Users learned the keys from the demucs LoRA guides, which write some of them elsewhere
(`htdemucs.batch_size` for `batch_size`, `optim.scheduler` for `optim.schedule`, ...).
Each alias maps to exactly one canonical key. Command-line overrides are rewritten
before Dora signs the XP (`normalize_argv`), so both spellings give the same signature;
keys written in YAML (a variant, a pasted block) are moved in the composed config
(`canonical_config`), so the resolved config.yaml only ever shows canonical keys.

`normalize_argv` also keeps the values of keys that name a model, an XP or a path
strings: Hydra reads `continue_from=955717e8` (an XP signature) as the float 9.55717e13.
"""
from __future__ import annotations

import dataclasses
import re
import typing as tp

from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.check import normalize_overrides
from demucs_lora.config.schema import is_closed
from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LORA_KEYS

_PRECISION = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "16": "fp16", 16: "fp16",
              "bfloat16": "bf16", "bf16": "bf16", "float32": False, "fp32": False,
              "32": False, 32: False, "full": False}


@dataclasses.dataclass(frozen=True)
class Alias:
    canonical: str
    values: tp.Optional[tp.Mapping] = None   # alias value -> canonical value (None: same)
    note: str = ""
    converter: tp.Optional[tp.Callable[[str, tp.Any], tp.Any]] = None  # (alias, value) -> value

    def convert(self, alias: str, value):
        if isinstance(value, str) and value.startswith("${"):
            return value
        if self.converter is not None:
            return self.converter(alias, value)
        if self.values is None:
            return value
        key = value.lower() if isinstance(value, str) else value
        if key not in self.values:
            allowed = sorted({str(k) for k in self.values})
            raise ConfigError(f"{alias}={value!r}: allowed values are {allowed} "
                              f"(it sets {self.canonical})")
        return self.values[key]



def _enable_lora(alias: str, value: tp.Any) -> tp.List[bool]:
    """MSST's (loralib's) `enable_lora`: one flag per equal slice of a fused projection's
    output. On the fused q/k/v projection of attention, [q, k, v] is ours as is, and a
    single flag covers all three."""
    flags = list(value) if isinstance(value, (list, tuple)) else None
    if flags and all(isinstance(f, bool) for f in flags) and len(flags) in (1, 3):
        return flags * 3 if len(flags) == 1 else flags
    raise ConfigError(f"{alias}={value!r}: give [q, k, v] booleans for the attention "
                      "projections, as htdemucs.lora_enable_qkv=[true,false,true] ([true] "
                      "alone: all three)")


ALIASES: tp.Dict[str, Alias] = {
    # demucs keeps sources under dset; the first version of this project had them on top.
    "sources": Alias("dset.sources"),
    "htdemucs.sources": Alias("dset.sources"),
    "dset.sample_rate": Alias("dset.samplerate"),
    "htdemucs.samplerate": Alias("dset.samplerate"),
    "htdemucs.audio_channels": Alias("dset.channels"),
    "dset.num_workers": Alias("misc.num_workers"),
    "dset.prefetch_factor": Alias("misc.prefetch_factor"),
    "dset.pin_memory": Alias("misc.pin_memory"),
    "segment": Alias("dset.segment", note="training segment, seconds (also the model's)"),
    "htdemucs.segment": Alias("dset.segment", note="training segment, seconds (also the "
                              "model's)"),
    "use_train_segment": Alias("htdemucs.use_train_segment"),
    "hop_length": Alias("htdemucs.hop_length"),
    "htdemucs.batch_size": Alias("batch_size"),
    "htdemucs.epochs": Alias("epochs"),
    "htdemucs.gradient_clip": Alias("optim.clip_grad"),
    "optim.gradient_clip": Alias("optim.clip_grad"),
    "gradient_clip": Alias("optim.clip_grad"),
    "htdemucs.mixed_precision": Alias("mixed_precision", note="true: fp16 with loss "
                                      "scaling on CUDA, bf16 on CPU"),
    "htdemucs.precision": Alias("mixed_precision", values=_PRECISION,
                                note="float16 -> fp16, bfloat16 -> bf16, float32 -> false"),
    "precision": Alias("mixed_precision", values=_PRECISION,
                       note="float16 -> fp16, bfloat16 -> bf16, float32 -> false"),
    "htdemucs.enable_checkpointing": Alias("enable_checkpointing"),
    "htdemucs.enable_profiling": Alias("enable_profiling"),
    "htdemucs.profile_memory": Alias("profile_memory"),
    "optim.scheduler": Alias("optim.schedule"),
    "htdemucs.lora_min_rank": Alias("htdemucs.min_rank"),
    # MSST (Music-Source-Separation-Training) spellings: its `training:` and `audio:`
    # sections; docs/data.md has the table of demucs' and MSST's dataset spellings.
    "gradient_accumulation_steps": Alias("optim.accumulate", note="MSST's spelling"),
    "training.gradient_accumulation_steps": Alias("optim.accumulate",
                                                  note="MSST's spelling"),
    "optim.gradient_accumulation_steps": Alias("optim.accumulate"),
    "htdemucs.gradient_accumulation_steps": Alias("optim.accumulate"),
    "training.instruments": Alias("dset.sources", note="MSST's spelling"),
    "training.samplerate": Alias("dset.samplerate", note="MSST's spelling"),
    "audio.sample_rate": Alias("dset.samplerate", note="MSST's spelling"),
    "audio.num_channels": Alias("dset.channels", note="MSST's spelling"),
    # demucs' own augmentation section (demucs' conf/config.yaml has `augment:` on top)
    "augment.shift_same": Alias("dset.augment.shift_same", note="demucs' spelling"),
    "augment.flip": Alias("dset.augment.flip", note="demucs' spelling"),
    "augment.repitch.proba": Alias("dset.augment.repitch.proba", note="demucs' spelling"),
    "augment.repitch.max_tempo": Alias("dset.augment.repitch.max_tempo",
                                       note="demucs' spelling"),
    # the bare spelling of every LoRA key (lora_rank=8 sets htdemucs.lora_rank)
    **{key: Alias(f"htdemucs.{key}") for key in LORA_KEYS},
    # MSST's `lora:` block (Music-Source-Separation-Training, docs/LoRA.md)
    "lora.r": Alias("htdemucs.lora_rank", note="MSST's `lora:` block"),
    "lora.lora_alpha": Alias("htdemucs.lora_alpha", note="MSST's `lora:` block"),
    "lora.lora_dropout": Alias("htdemucs.lora_dropout", note="MSST's `lora:` block"),
    **{key: Alias("htdemucs.lora_enable_qkv", converter=_enable_lora,
                  note="[q, k, v]; [true] alone: all three")
       for key in ("lora.enable_lora", "htdemucs.enable_lora", "enable_lora")},
}

ONLY_DEFAULT: tp.Dict[str, tp.Tuple[tp.Optional[bool], str]] = {
    "lora.merge_weights": (False, "adapters stay separate while training; merged output: "
                           "`demucs-lora --merge`, or best.th / tools.export"),
    "lora.fan_in_fan_out": (False, "our LoRA layers keep torch's (out, in) weight layout"),
    "train_lora": (None, "LoRA is on when htdemucs.lora_rank > 0: set htdemucs.lora_rank "
                   "(e.g. 8; 0 is a full fine-tune)"),
}
"""MSST keys with no key of their own here: the value that describes what this project
always does is accepted and dropped (None: none is); any other is a ConfigError."""


def check_only_default(key: str, value: tp.Any) -> None:
    """ConfigError unless `value` of ONLY_DEFAULT's `key` is the one it accepts."""
    accepted, why = ONLY_DEFAULT[key]
    if accepted is None or str(value).strip("'\"").lower() != str(accepted).lower():
        raise ConfigError(f"{key}={value!r} is MSST's spelling and has no key here: {why}"
                          + (f" ({key}: {str(accepted).lower()} is accepted)"
                             if accepted is not None else ""))

# Keys whose values name a model, an XP or a path: always strings (a signature such as
# 955717e8 or 12345678 is not a number).
STRING_KEYS = ("continue_from", "pretrained_repo", "dset.wav", "dset.musdb", "dset.metadata",
               "lora_checkpoint", "residual_source", "dora.dir")

_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[\w.\-/@]+)(?P<sep>=)?(?P<value>.*)$",
                       re.S)


def canonical_key(key: str) -> str:
    entry = ALIASES.get(key)
    return entry.canonical if entry else key


def split_override(arg: str) -> tp.Tuple[str, str, tp.Optional[str]]:
    """`++key=value` -> ('++', 'key', 'value'); value None when there is no `=`."""
    match = _OVERRIDE.match(arg)
    if match is None:
        return "", arg, None
    value = match.group("value") if match.group("sep") else None
    return match.group("prefix") or "", match.group("key"), value


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _string_value(value: str) -> str:
    """A Hydra override value that stays the string the user typed (quoted unless it is
    null, an interpolation or already one quoted string)."""
    text = value.strip()
    quoted = len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" \
        and text[0] not in text[1:-1].replace("\\" + text[0], "")
    if not text or text == "null" or text.startswith("${") or quoted:
        return value
    if text.startswith("[") and text.endswith("]"):      # dset.wav=[A, B]: each a string
        items = [i for i in (x.strip() for x in text[1:-1].split(",")) if i]
        return "[" + ",".join(_string_value(i) for i in items) + "]"
    return _quote(text)


def _alias_value(alias: str, entry: Alias, value: str) -> str:
    if entry.values is None and entry.converter is None:
        return value
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_override(f"x={value}").value()
    converted = entry.convert(alias, parsed)
    if isinstance(converted, list):
        return "[" + ",".join(str(v).lower() for v in converted) + "]"
    return "null" if converted is None else str(converted).lower() \
        if isinstance(converted, bool) else str(converted)


def normalize_argv(argv: tp.Sequence[str]) -> tp.List[str]:
    """Command-line overrides in canonical spelling (same XP signature either way):
    JSON-style dicts rewritten for Hydra, alias keys renamed (values mapped where the
    alias says so), values of STRING_KEYS quoted so they stay strings."""
    out = []
    for arg in normalize_overrides(argv):
        prefix, key, value = split_override(arg)
        if value is None or key.startswith("hydra.") or "/" in key:
            out.append(arg)
            continue
        if key in ONLY_DEFAULT:
            check_only_default(key, value)
            continue
        entry = ALIASES.get(key)
        if entry is not None:
            value = _alias_value(key, entry, value)
            key = entry.canonical
            prefix = "" if prefix == "+" else prefix   # the canonical key exists
        if key in STRING_KEYS:
            value = _string_value(value)
        out.append(f"{prefix}{key}={value}")
    return out


# ----------------------------------------------------------------------------- YAML side
_MISSING = object()


def _pop(data: dict, dotted: str):
    node, parts = data, dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return _MISSING
    return node.pop(parts[-1], _MISSING) if parts[-1] in node else _MISSING


def set_dotted(data: dict, dotted: str, value) -> None:
    node, parts = data, dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def expand_dotted(data: dict, closed: tp.Callable[[str], bool], path: str = "") -> dict:
    """`{"htdemucs.lora_rank": 4}` (a dotted key written inside YAML) -> nested keys, in
    the config's closed sections only: `layer_ranks: {"encoder.0.*": 4}` stays as is."""
    if path and not closed(path):
        return data
    out: dict = {}
    dotted = []
    for key, value in data.items():
        if isinstance(key, str) and "." in key:
            dotted.append((key, value))
            continue
        sub = f"{path}.{key}" if path else str(key)
        out[key] = expand_dotted(value, closed, sub) if isinstance(value, dict) else value
    for key, value in dotted:     # written explicitly: wins over the nested default
        full = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            value = expand_dotted(value, closed, full)
        set_dotted(out, key, value)
    return out


def canonical_config(cfg: DictConfig, cli_keys: tp.Iterable[str] = (),
                     closed: tp.Optional[tp.Callable[[str], bool]] = None) -> DictConfig:
    """A new config where dotted YAML keys are nested and alias keys are moved to their
    canonical key. A canonical key given on the command line (`cli_keys`) wins over an
    alias written in a YAML file; otherwise the alias (written by the user) wins."""
    closed = closed or is_closed
    data = OmegaConf.to_container(cfg, resolve=False)
    data = expand_dotted(data, closed)
    cli = set(cli_keys)
    for key in ONLY_DEFAULT:
        value = _pop(data, key)
        if value is not _MISSING:
            check_only_default(key, value)
    for alias, entry in ALIASES.items():
        value = _pop(data, alias)
        if value is _MISSING:
            continue
        if entry.canonical in cli:
            continue
        set_dotted(data, entry.canonical, entry.convert(alias, value))
    if data.get("lora") == {}:      # MSST's block, every key moved to its canonical key
        del data["lora"]
    out = OmegaConf.create(data)
    OmegaConf.set_struct(out, OmegaConf.is_struct(cfg))
    return out

