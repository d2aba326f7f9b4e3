"""The adaptation methods, by name: what the quality protocol compares and grids sweep.

One table owns them, so a method that earns its place in the quality protocol
(benchmarks/quality_protocol.py, docs/quality.md) is launched by `dora grid rank_modes` with
the very overrides it was measured with; the grid's table says each XP's method from its
config keys (`describe`).
Every LoRA method is at the parameter budget of uniform at the same rank (budget-matched
modes, or allocations of that budget).
"""
from __future__ import annotations

import typing as tp

FULL = "full"


class Method(tp.NamedTuple):
    label: str
    overrides: tp.Tuple[str, ...]


def method(key: str, rank: int = 8) -> Method:
    """The method `key` at the budget of uniform LoRA at `rank`."""
    r = f"htdemucs.lora_rank={rank}"
    grad = (r, "htdemucs.lora_rank_mode=gradient")
    table = {
        FULL: ("full FT", ("htdemucs.lora_rank=0",)),
        "uniform": (f"uniform r={rank}", (r,)),
        "heuristic": (f"heuristic r={rank} budget-matched",
                      (r, "htdemucs.lora_rank_mode=heuristic", "htdemucs.lora_budget_match=true")),
        "gradient": (f"gradient r={rank}", grad),
        "adaptive": (f"gradient r={rank} + rank adaptation",
                     (*grad, "htdemucs.lora_rank_adaptation=true", "htdemucs.lora_adapt_every=2")),
        "sensitivity": (f"sensitivity r={rank}", (r, "htdemucs.lora_rank_mode=sensitivity")),
        "lora_ga": (f"LoRA-GA r={rank}", (r, "htdemucs.lora_init=gradient")),
        "gora": (f"gradient + LoRA-GA r={rank} (GoRA)", (*grad, "htdemucs.lora_init=gradient")),
        "gradient_rslora": (f"gradient r={rank}, alpha/sqrt(r)",
                            (*grad, "htdemucs.lora_rslora=true")),
        "gradient_mean_rank": (f"gradient r={rank}, mean-rank scaling",
                               (*grad, "htdemucs.lora_scaling=mean_rank")),
        "lora_plus": (f"LoRA+ r={rank} (ratio 16)", (r, "optim.lora_plus_ratio=16")),
    }
    if key not in table:
        raise KeyError(f"unknown method {key!r}: one of {', '.join(table)}")
    label, overrides = table[key]
    return Method(label, overrides)


METHODS: tp.Tuple[str, ...] = (
    FULL, "uniform", "heuristic", "gradient", "adaptive", "sensitivity", "lora_ga", "gora",
    "gradient_rslora", "gradient_mean_rank", "lora_plus")


def describe(cfg) -> str:
    """What an XP's config adapts with, from its keys (the grid's `method` column): the
    rank mode and rank, then every method key off its default, so no XP is mislabeled."""
    h = cfg.htdemucs
    if int(h.lora_rank) == 0:
        return "full FT"
    parts = [f"{h.lora_rank_mode} r={h.lora_rank}"]
    if h.lora_rank_mode == "heuristic" and h.lora_budget_match:
        parts.append("budget-matched")
    if h.get("layer_ranks"):
        parts.append("layer_ranks")
    if h.lora_rank_adaptation:
        parts.append(f"rank adaptation every {h.lora_adapt_every}")
    if h.lora_init != "default":
        parts.append(f"init {h.lora_init}")
    if h.lora_rslora:
        parts.append("alpha/sqrt(r)")
    if h.lora_scaling != "per_layer":
        parts.append(f"{h.lora_scaling} scaling")
    if float(cfg.optim.lora_plus_ratio) != 1.0:
        parts.append(f"LoRA+ {cfg.optim.lora_plus_ratio:g}")
    return ", ".join(parts)
