"""The LoRA settings of a run (`LoraConfig`) and what an injection built (`LoraLayout`).

`LoraConfig` is the one owner of the ``htdemucs.lora_*`` keys (plus ``layer_ranks``,
``min_rank`` and ``max_rank``): its fields are those keys, its defaults are the values of
conf/model/lora_keys.yaml (tests/lora/test_config.py checks that they agree), and it is
validated once, on construction, with a `ConfigError` naming ``htdemucs.KEY``, the bad
value and what is allowed. PEFT's ``LoraConfig`` is the shape it follows.

`LoraLayout` is what `inject_lora` builds from it: the rank of every wrapped layer, the
scaling and bias settings, the modules trained in full. The model carries it (the
guide's ``model.lora_config``), adapter headers store it, and two layouts compare equal
exactly when an adapter's tensors can be swapped into the other's layers. It reads like
the header's JSON object (``layout["ranks"]``, ``layout["alpha"]``).

This module imports neither torch nor demucs, so the config room can use it cheaply.
"""
from __future__ import annotations

import dataclasses
import typing as tp
from collections.abc import Mapping

from demucs_lora.core.checks import (check_bool, check_choice, check_int, is_number,
                                     value_error)
from demucs_lora.core.errors import ConfigError
from demucs_lora.core.plain import plain

BIAS_MODES = ("none", "lora_only", "all")
RANK_MODES = ("uniform", "heuristic", "gradient", "sensitivity")
CALIBRATED_MODES = ("gradient", "sensitivity")   # rank modes that read calibration gradients
INIT_MODES = ("default", "gradient")
SCALING_MODES = ("per_layer", "mean_rank")
SAVE_DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_ENABLE_QKV = (True, False, True)

# ``htdemucs.lora_targets`` group -> module-path prefixes it covers (see lora/targets.py)
TARGET_GROUPS: tp.Dict[str, tp.Tuple[str, ...]] = {
    "encoder": ("encoder", "tencoder"),
    "decoder": ("decoder", "tdecoder"),
    "transformer": ("crosstransformer",),
    "upsampler": ("channel_upsampler", "channel_downsampler",
                  "channel_upsampler_t", "channel_downsampler_t"),
    "freq_emb": ("freq_emb.embedding",),
}


# ----------------------------------------------------------------------------- rules
def check_alpha(value: tp.Any, key: str = "htdemucs.lora_alpha") -> float:
    if not is_number(value) or not value > 0:
        raise value_error(key, value, "must be a positive number (the scaling is alpha / "
                          "rank)")
    return float(value)


def check_dropout(value: tp.Any, key: str = "htdemucs.lora_dropout") -> float:
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise value_error(key, value, "must be a number in [0, 1) (dropout on the adapter "
                          "input)")
    return float(value)


def check_enable_qkv(value: tp.Any, key: str = "htdemucs.lora_enable_qkv"
                     ) -> tp.Tuple[bool, bool, bool]:
    flags = tuple(value) if isinstance(value, (list, tuple)) else None
    if flags is None or len(flags) != 3 or not all(isinstance(f, bool) for f in flags):
        raise value_error(key, value, "give three booleans [q, k, v]")
    return flags  # type: ignore[return-value]


def check_targets(value: tp.Any, key: str = "htdemucs.lora_targets") -> tp.Tuple[str, ...]:
    """The target groups (a single group name is accepted), at least one, all known."""
    groups = (value,) if isinstance(value, str) else tuple(value or ())
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown or not groups:
        raise value_error(key, list(groups), f"unknown group(s) {unknown}; allowed groups "
                          f"are {list(TARGET_GROUPS)} (at least one)")
    return tuple(str(g) for g in groups)


def _items(value: tp.Any) -> tp.Optional[tp.Iterable]:
    return value.items() if hasattr(value, "items") else None


def check_layer_ranks(value: tp.Any, key: str = "htdemucs.layer_ranks"
                      ) -> tp.Optional[tp.Tuple[tp.Tuple[str, int], ...]]:
    """``{glob: rank}`` as ordered (glob, rank) pairs, ranks >= 0; None stays None."""
    if value is None:
        return None
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        pairs = value  # already normalized (dataclasses.replace, a copy)
    elif _items(value) is not None:
        pairs = tuple(_items(value))
    else:
        raise value_error(key, value, "give a mapping glob -> rank, e.g. "
                    "htdemucs.layer_ranks='{encoder.0.*:4}'")
    return tuple((str(g), check_int(r, f"{key}[{str(g)!r}]", 0)) for g, r in pairs)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The ``htdemucs.*`` LoRA keys of a run, validated (see conf/model/lora_keys.yaml)."""
    lora_rank: int = 0                  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_rslora: bool = False
    lora_targets: tp.Tuple[str, ...] = ("encoder", "decoder", "transformer", "upsampler")
    lora_bias: str = "none"
    lora_rank_mode: str = "uniform"
    lora_budget_match: bool = False
    lora_max_rank: tp.Optional[int] = 32   # global clamp, every mode (null: none)
    layer_ranks: tp.Optional[tp.Tuple[tp.Tuple[str, int], ...]] = None
    min_rank: int = 1                   # gradient mode and rank adaptation: per-layer bounds
    max_rank: int = 32
    lora_enable_qkv: tp.Tuple[bool, bool, bool] = DEFAULT_ENABLE_QKV
    lora_gradient_batches: int = 8
    lora_rank_adaptation: bool = False
    lora_adapt_every: int = 1
    lora_save_dtype: str = "float32"
    lora_init: str = "default"          # gradient: LoRA-GA (lora/init_gradient.py)
    lora_scaling: str = "per_layer"     # mean_rank: one scaling, alpha / lora_rank

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)
        if self.min_rank > self.max_rank:
            raise ConfigError(f"htdemucs.min_rank={self.min_rank} > htdemucs.max_rank="
                              f"{self.max_rank}: min_rank must not exceed max_rank")
        if self.lora_rank_adaptation and self.lora_rank <= 0:
            raise ConfigError("htdemucs.lora_rank_adaptation=true moves LoRA ranks between "
                              "layers, but htdemucs.lora_rank=0 is full fine-tuning: set "
                              "htdemucs.lora_rank > 0 (the starting rank)")
        if self.lora_init == "gradient" and self.lora_rank_adaptation:
            raise ConfigError("htdemucs.lora_init=gradient offsets the frozen base by the "
                              "initial factors, which htdemucs.lora_rank_adaptation=true would "
                              "resize: use one of the two")

    def _checked(self) -> tp.Dict[str, tp.Any]:
        """Every field, checked and normalized (tuples, ints, floats)."""
        key = "htdemucs.{}".format
        return {
            "lora_rank": check_int(self.lora_rank, key("lora_rank"), 0),
            "lora_alpha": check_alpha(self.lora_alpha),
            "lora_dropout": check_dropout(self.lora_dropout),
            "lora_rslora": check_bool(self.lora_rslora, key("lora_rslora")),
            "lora_targets": check_targets(self.lora_targets),
            "lora_bias": check_choice(self.lora_bias, key("lora_bias"), BIAS_MODES),
            "lora_rank_mode": check_choice(self.lora_rank_mode, key("lora_rank_mode"),
                                           RANK_MODES),
            "lora_budget_match": check_bool(self.lora_budget_match, key("lora_budget_match")),
            "lora_max_rank": None if self.lora_max_rank is None else
            check_int(self.lora_max_rank, key("lora_max_rank"), 1),
            "layer_ranks": check_layer_ranks(self.layer_ranks),
            "min_rank": check_int(self.min_rank, key("min_rank"), 1),
            "max_rank": check_int(self.max_rank, key("max_rank"), 1),
            "lora_enable_qkv": check_enable_qkv(self.lora_enable_qkv),
            "lora_gradient_batches": check_int(self.lora_gradient_batches,
                                               key("lora_gradient_batches"), 1),
            "lora_rank_adaptation": check_bool(self.lora_rank_adaptation,
                                               key("lora_rank_adaptation")),
            "lora_adapt_every": check_int(self.lora_adapt_every, key("lora_adapt_every"), 1),
            "lora_save_dtype": check_choice(self.lora_save_dtype, key("lora_save_dtype"),
                                            SAVE_DTYPE_NAMES),
            "lora_init": check_choice(self.lora_init, key("lora_init"), INIT_MODES),
            "lora_scaling": check_choice(self.lora_scaling, key("lora_scaling"),
                                         SCALING_MODES),
        }

    @classmethod
    def from_cfg(cls, node: tp.Any) -> "LoraConfig":
        """From the ``htdemucs`` node of a composed config (a DictConfig, a dict or any
        object with these attributes); missing keys take their defaults, other keys (the
        architecture's) are ignored."""
        values = {}
        for name in LORA_KEYS:
            if hasattr(node, "get") and not isinstance(node, type):
                value = node.get(name, _MISSING)
            else:
                value = getattr(node, name, _MISSING)
            if value is not _MISSING:
                values[name] = plain(value, tuple)
        return cls(**values)

    def lora_only_changes(self) -> tp.List[str]:
        """The LoRA-only keys set away from their defaults (they shape adapters, so with
        lora_rank=0, a full fine-tune, they would do nothing)."""
        default = LoraConfig()
        return [f"htdemucs.{name}" for name in LORA_KEYS if name != "lora_rank"
                and getattr(self, name) != getattr(default, name)]

    def check_for_run(self) -> None:
        """A run's rule (not the Python API's: ``LoraConfig(lora_rank=0)`` is a plain
        value there): a full fine-tune (lora_rank=0) with LoRA-only keys set is refused,
        since they would do nothing."""
        keys = self.lora_only_changes() if self.lora_rank == 0 else []
        if keys:
            one = len(keys) == 1
            raise ConfigError(f"{', '.join(keys)} set, but htdemucs.lora_rank=0 is a full "
                              f"fine-tune, where {'it does' if one else 'they do'} nothing: "
                              "set htdemucs.lora_rank (e.g. htdemucs.lora_rank=8) for LoRA, "
                              "or remove " + ("it" if one else "them"))

    # -- what the settings imply -----------------------------------------------------
    def rank_cap(self, smallest: int) -> int:
        """The highest rank a layer whose approximated matrix has smallest dimension
        `smallest` gets in any mode: that dimension, clamped by ``lora_max_rank``."""
        return smallest if self.lora_max_rank is None else min(smallest, self.lora_max_rank)

    def gradient_cap(self, smallest: int) -> int:
        """`rank_cap` further bounded by ``max_rank`` (gradient mode, rank adaptation)."""
        return min(self.rank_cap(smallest), self.max_rank)

    @property
    def needs_calibration(self) -> bool:
        """True when building the layers reads calibration gradients (rank or init)."""
        return self.lora_rank_mode in CALIBRATED_MODES or self.lora_init == "gradient"

    def layout(self, ranks: tp.Mapping[str, int], train_extra: tp.Sequence[str] = ()
               ) -> "LoraLayout":
        """The layers `inject_lora` builds with these settings and `ranks` {path: rank}."""
        scaling_rank = self.lora_rank if self.lora_scaling == "mean_rank" else None
        return LoraLayout(ranks=ranks, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          rslora=self.lora_rslora, bias=self.lora_bias,
                          enable_qkv=self.lora_enable_qkv, train_extra=tuple(train_extra),
                          scaling_rank=scaling_rank)


LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig))
"""The ``htdemucs.*`` keys LoraConfig owns; the other htdemucs keys are HTDemucs'."""
_MISSING = object()


def _show(value: tp.Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


# ----------------------------------------------------------------------------- layout
HEADER_KEYS = ("ranks", "alpha", "dropout", "rslora", "bias", "enable_qkv", "train_extra")
"""The adapter header keys a layout is written to and read from (every adapter has them)."""
OPTIONAL_HEADER_KEYS = ("scaling_rank",)
"""Layout keys that adapters written before them lack (their default then applies)."""
LAYOUT_KEYS = HEADER_KEYS + OPTIONAL_HEADER_KEYS


@dataclasses.dataclass(frozen=True, eq=True)
class LoraLayout(Mapping):
    """What `inject_lora` built: equal layouts can swap adapter tensors in place (the
    dropout, which has no tensor, and `trained` are not compared)."""
    ranks: tp.Dict[str, int]
    alpha: float = 16.0
    dropout: float = dataclasses.field(default=0.0, compare=False)
    rslora: bool = False
    bias: str = "none"
    enable_qkv: tp.Tuple[bool, bool, bool] = DEFAULT_ENABLE_QKV
    train_extra: tp.Tuple[str, ...] = ()
    # htdemucs.lora_scaling=mean_rank: every layer's scaling uses this rank (None: its own)
    scaling_rank: tp.Optional[int] = None
    # the parameter names injection left trainable: what an adapter file holds
    trained: tp.Tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        ranks = {str(n): check_int(r, f"lora rank of {n}", 0) for n, r in self.ranks.items()}
        fields = {"ranks": {n: r for n, r in ranks.items() if r > 0},
                  "alpha": check_alpha(self.alpha),
                  "dropout": check_dropout(self.dropout),
                  "rslora": check_bool(self.rslora, "htdemucs.lora_rslora"),
                  "bias": check_choice(self.bias, "htdemucs.lora_bias", BIAS_MODES),
                  "enable_qkv": check_enable_qkv(self.enable_qkv),
                  "train_extra": tuple(str(p) for p in self.train_extra),
                  "scaling_rank": None if self.scaling_rank is None else
                  check_int(self.scaling_rank, "scaling_rank", 1),
                  "trained": tuple(self.trained)}
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_header(cls, header: tp.Mapping[str, tp.Any]) -> "LoraLayout":
        """The layout an adapter header (`lora.adapter_file.check_header`ed) records."""
        return cls(**{k: header[k] for k in HEADER_KEYS},
                   **{k: header[k] for k in OPTIONAL_HEADER_KEYS if k in header})

    def to_header(self) -> tp.Dict[str, tp.Any]:
        """The header keys of this layout, as JSON values."""
        return {"ranks": dict(self.ranks), "alpha": self.alpha, "dropout": self.dropout,
                "rslora": self.rslora, "bias": self.bias,
                "enable_qkv": list(self.enable_qkv), "train_extra": list(self.train_extra),
                "scaling_rank": self.scaling_rank}

    def differences(self, other: "LoraLayout") -> tp.List[str]:
        """One readable item per compared field that differs, e.g. ``alpha: model 16.0,
        adapter 32.0``, or for ranks the layers that differ (``self`` is the model's)."""
        out = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if not field.compare or mine == theirs:
                continue
            if field.name == "ranks":
                layers = [f"{n}: model {mine.get(n, 'none')}, adapter {theirs.get(n, 'none')}"
                          for n in sorted(set(mine) | set(theirs))
                          if mine.get(n) != theirs.get(n)]
                more = f" (+{len(layers) - 5} more)" if len(layers) > 5 else ""
                out.append(f"ranks of {len(layers)} layer(s) [{'; '.join(layers[:5])}{more}]")
            else:
                out.append(f"{field.name}: model {_show(mine)}, adapter {_show(theirs)}")
        return out

    # -- the header's JSON object view (the guide's model.lora_config["ranks"]) --------
    def __getitem__(self, key: str) -> tp.Any:
        if key not in LAYOUT_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> tp.Iterator[str]:
        return iter(LAYOUT_KEYS)

    def __len__(self) -> int:
        return len(LAYOUT_KEYS)
