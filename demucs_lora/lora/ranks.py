"""Pick a LoRA rank for every targeted layer: ``uniform``, ``heuristic`` or ``gradient``.

``allocate_ranks(model, config)`` reads a `LoraConfig` (the ``htdemucs.lora_*`` keys)
and returns a `RankTable` {module path: rank}. Rank 0 means "do not wrap this layer".

Modes (``htdemucs.lora_rank_mode``):

- ``uniform``: every target gets ``lora_rank``.
- ``heuristic``: ``lora_rank`` scaled per role by `HEURISTIC_SCALE` (below). Measured
  on full HTDemucs: the outermost encoder/decoder layers see the largest activations,
  so an adapter there costs as much memory as full fine-tuning saves; they get 0.
- ``sensitivity``: budget-matched, data-driven (AdaLoRA / GoRA's importance): a layer's
  score is |W * G| summed over its weights and over the calibration batches; each layer
  gets the share of the parameter budget its score has (rank = share / params per rank
  unit, rounded), never below rank 1 (``min_rank``), then units move to fill the budget.
- ``gradient``: budget-matched, data-driven. The full-weight gradient of each target
  is accumulated over ``lora_gradient_batches`` calibration batches; rank units go,
  one at a time, to the layer whose next singular value gives the most gradient
  energy per adapter parameter (sigma_k^2 / params_per_rank), each layer between
  ``min_rank`` and ``max_rank``, until the parameter count of ``uniform`` at
  ``lora_rank`` is spent.

``layer_ranks`` ({glob: rank}) overrides the result in every mode (in ``uniform``
too; in ``gradient`` an overridden layer is pinned and its cost counts against the
budget). Globs are fnmatch patterns on module paths after `resolve_alias`
(``transformer.*``, ``transformer.self_attn.*`` ...); a glob ending in ``.*`` also
matches the module it names (attention modules are wrapped whole). Globs apply in
order of increasing specificity (non-wildcard characters), ties in the order given,
so more specific and later globs win. A glob matching no target is a ConfigError.

Every mode clamps to ``lora_max_rank`` and to the smallest dimension of the matrix
the adapter approximates (`LoraConfig.rank_cap`); each clamp is logged once per call.
"""
from __future__ import annotations

import difflib
import fnmatch
import heapq
import logging
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.calibration import Calibration, calibrate
from demucs_lora.lora.config import CALIBRATED_MODES, LoraConfig
from demucs_lora.lora.rank_table import LayerInfo, RankTable, layer_info
from demucs_lora.lora.targets import glob_specificity, layer_role, lora_target_names, resolve_alias

logger = logging.getLogger(__name__)

# Heuristic default table: rank = scale * lora_rank (rounded down, at least 1 unless 0).
HEURISTIC_SCALE: tp.Dict[str, float] = {
    "head": 0.0,            # last decoder/tdecoder conv_tr (new heads train directly)
    "outer_encoder": 0.0,   # encoder.0, tencoder.0: largest activations
    "outer_decoder": 0.0,   # decoder.{depth-1}, tdecoder.{depth-1}
    "inner_encoder": 2.0,   # encoder.{depth-1}, tencoder.{depth-1}
    "inner_decoder": 2.0,   # decoder.0, tdecoder.0
    "attention": 2.0,       # crosstransformer self_attn / cross_attn
    "ffn": 1.0,             # crosstransformer linear1 / linear2
    "encoder": 1.0,         # middle encoder layers
    "decoder": 1.0,         # middle decoder layers
    "dconv": 0.5,           # DConv residual branches (outside the outermost layers)
    "upsampler": 1.0,
    "freq_emb": 1.0,
    "other": 1.0,
}


# ---------------------------------------------------------------- overrides, clamps

def _glob_match(name: str, glob: str) -> bool:
    return fnmatch.fnmatchcase(name, glob) or \
        (glob.endswith(".*") and fnmatch.fnmatchcase(name, glob[:-2]))


def pinned_layers(names: tp.Iterable[str], config: LoraConfig) -> tp.Set[str]:
    """The layers of `names` that a ``layer_ranks`` glob matches (their rank is fixed)."""
    globs = [resolve_alias(glob) for glob, _ in config.layer_ranks or ()]
    return {n for n in names if any(_glob_match(n, g) for g in globs)}


def apply_layer_ranks(ranks: tp.Dict[str, int], config: LoraConfig) -> tp.Set[str]:
    """Apply ``layer_ranks`` in increasing specificity; return the overridden paths (a
    glob matching no layer of `ranks` is a ConfigError listing close names)."""
    overrides = list(config.layer_ranks or ())
    targets_key = list(config.lora_targets)
    order = sorted(range(len(overrides)),
                   key=lambda i: (glob_specificity(resolve_alias(overrides[i][0])), i))
    pinned: tp.Set[str] = set()
    names = list(ranks)
    for i in order:
        glob, rank = overrides[i]
        resolved = resolve_alias(glob)
        hits = [n for n in names if _glob_match(n, resolved)]
        if not hits:
            probe = resolved.replace("*", "").replace("?", "")
            close = difflib.get_close_matches(probe, names, n=6, cutoff=0.5) or names[:6]
            raise ConfigError(
                f"htdemucs.layer_ranks: glob {glob!r} (as {resolved!r}) matches no layer "
                f"targeted by htdemucs.lora_targets={targets_key}; close names: {close}")
        for n in hits:
            ranks[n] = rank
            pinned.add(n)
    return pinned


def _clamp(ranks: tp.Dict[str, int], info: tp.Mapping[str, LayerInfo],
           config: LoraConfig) -> None:
    for name, rank in ranks.items():
        smallest = info[name].max_rank
        cap = config.rank_cap(smallest)
        why = f"htdemucs.lora_max_rank={cap}" if cap < smallest else f"smallest dim {cap}"
        if rank > cap:
            logger.info("LoRA rank of %s clamped from %d to %d (%s)", name, rank, cap, why)
            ranks[name] = cap


# ---------------------------------------------------------------- modes

def heuristic_ranks(names: tp.Sequence[str], rank: float, depth: int,
                    t_depth: tp.Optional[int] = None) -> tp.Dict[str, int]:
    """Default heuristic table: `HEURISTIC_SCALE[role] * rank` per layer."""
    out = {}
    for name in names:
        scale = HEURISTIC_SCALE[layer_role(name, depth, t_depth)]
        out[name] = 0 if scale == 0 else max(1, int(scale * rank))
    return out


def _greedy(ranks: tp.Dict[str, int], free: tp.Sequence[str], caps: tp.Mapping[str, int],
            spectra: tp.Mapping[str, torch.Tensor], info: tp.Mapping[str, LayerInfo],
            budget: int) -> None:
    """Give rank units to `free` layers by best sigma_k^2 / params until `budget`."""
    spent = sum(r * info[n].params_per_rank for n, r in ranks.items())

    def score(name: str) -> float:
        k, s2 = ranks[name], spectra[name]
        return (float(s2[k]) if k < len(s2) else 0.0) / info[name].params_per_rank

    order = {n: i for i, n in enumerate(free)}
    heap = [(-score(n), order[n], n) for n in free if ranks[n] < caps[n]]
    heapq.heapify(heap)
    while heap:
        _, i, name = heapq.heappop(heap)
        cost = info[name].params_per_rank
        if spent + cost > budget:
            continue  # this layer cannot grow within budget; others may
        ranks[name] += 1
        spent += cost
        if ranks[name] < caps[name]:
            heapq.heappush(heap, (-score(name), i, name))
    if spent < 0.95 * budget:
        logger.warning("gradient rank allocation spent %d of a %d-parameter budget: the "
                       "max_rank / smallest-dim caps leave no room", spent, budget)


def allocate_ranks(model: nn.Module, config: LoraConfig,
                   batches: tp.Optional[tp.Iterable] = None,
                   loss_fn: tp.Optional[tp.Callable] = None,
                   names: tp.Optional[tp.Sequence[str]] = None,
                   calibration: tp.Optional[Calibration] = None) -> RankTable:
    """Rank per target layer of `model` for `config`.

    `names` defaults to ``lora_target_names(model, config.lora_targets)``. `batches`
    (iterable of (mix (B,C,T), sources (B,S,C,T))) and `loss_fn(output, sources)`
    (default L1) are used by the gradient and sensitivity modes only, unless a
    `calibration` of these layers (`lora.calibration.calibrate`) is given.
    """
    rank, mode = config.lora_rank, config.lora_rank_mode
    if rank == 0:
        raise ConfigError("htdemucs.lora_rank=0 means full fine-tuning: no rank to allocate; "
                          "set htdemucs.lora_rank > 0 for LoRA")
    names = list(lora_target_names(model, config.lora_targets) if names is None else names)
    if not names:
        raise ConfigError(f"htdemucs.lora_targets={list(config.lora_targets)} selects no "
                          "layer of this model")
    depth = len(getattr(model, "encoder", ()) or ())
    t_depth = len(getattr(model, "tencoder", ()) or ())
    info = {n: layer_info(model.get_submodule(n), config.lora_enable_qkv,
                          layer_role(n, depth, t_depth)) for n in names}
    model_params = sum(p.numel() for p in model.parameters())

    budget = None
    if mode == "heuristic" and config.lora_budget_match:
        budget = _uniform_budget(info, config)
        ranks = _budget_matched_heuristic(info, config, depth, t_depth, budget)
    elif mode == "heuristic":
        ranks = heuristic_ranks(names, rank, depth, t_depth)
    else:
        ranks = {n: rank for n in names}
    pinned = apply_layer_ranks(ranks, config)
    _clamp(ranks, info, config)
    if mode in CALIBRATED_MODES:
        budget = _calibrated_budget(model, config, ranks, pinned, info, batches, loss_fn,
                                    calibration)
    return RankTable(ranks, info, mode, budget=budget, model_params=model_params)


def _calibrated_budget(model: nn.Module, config: LoraConfig, ranks: tp.Dict[str, int],
                       pinned: tp.Set[str], info: tp.Mapping[str, LayerInfo],
                       batches: tp.Optional[tp.Iterable], loss_fn: tp.Optional[tp.Callable],
                       calibration: tp.Optional[Calibration]) -> int:
    """Gradient / sensitivity mode, in place on `ranks`: the parameter budget it matched."""
    key = f"htdemucs.lora_rank_mode={config.lora_rank_mode}"
    if batches is None and calibration is None:
        raise ConfigError(f"{key} needs calibration data: pass batches of (mix, sources) to "
                          "allocate_ranks (the train loader)")
    budget = _uniform_budget(info, config)
    free = [n for n in info if n not in pinned]
    caps = {n: config.gradient_cap(info[n].max_rank) for n in free}
    for n in free:
        ranks[n] = min(config.min_rank, caps[n])
    if not free:
        return budget
    if calibration is None:
        calibration = calibrate(model, free, config.lora_enable_qkv, batches,
                                loss_fn or F.l1_loss, config.lora_gradient_batches, key)
    if config.lora_rank_mode == "gradient":
        spectra = {n: calibration.spectrum(n) for n in free}
        _greedy(ranks, free, caps, spectra, info, budget)
    else:
        _by_sensitivity(ranks, free, caps, {n: calibration.sensitivity[n] for n in free},
                        info, budget)
    return budget


def _by_sensitivity(ranks: tp.Dict[str, int], free: tp.Sequence[str],
                    caps: tp.Mapping[str, int], scores: tp.Mapping[str, float],
                    info: tp.Mapping[str, LayerInfo], budget: int) -> None:
    """Each free layer's rank from its share of the scores: the share of the budget left
    by the pinned layers, in rank units, rounded, within [its starting rank (>= 1), cap];
    then one unit at a time is taken from the layer furthest above its share while over
    budget, and given to the layer furthest below it while one fits."""
    cost = {n: info[n].params_per_rank for n in free}
    floor = {n: max(1, min(ranks[n], caps[n])) if caps[n] >= 1 else 0 for n in free}
    left = budget - sum(r * info[n].params_per_rank for n, r in ranks.items() if n not in free)
    total = sum(scores.values())
    share = {n: (scores[n] / total if total > 0 else 1 / len(free)) * left / cost[n]
             for n in free}
    for n in free:
        ranks[n] = min(caps[n], max(floor[n], int(round(share[n]))))
    spent = sum(ranks[n] * cost[n] for n in free)
    while spent > left:
        over = [n for n in free if ranks[n] > floor[n]]
        if not over:
            break
        n = max(over, key=lambda m: ((ranks[m] - share[m]) * cost[m], -free.index(m)))
        ranks[n] -= 1
        spent -= cost[n]
    while True:
        room = [n for n in free if ranks[n] < caps[n] and spent + cost[n] <= left]
        if not room:
            break
        n = max(room, key=lambda m: ((share[m] - ranks[m]) * cost[m], -free.index(m)))
        ranks[n] += 1
        spent += cost[n]


def _cost(ranks: tp.Mapping[str, float], info: tp.Mapping[str, LayerInfo],
          config: LoraConfig) -> int:
    """Adapter parameters of `ranks` once clamped (`LoraConfig.rank_cap`)."""
    return sum(min(int(r), config.rank_cap(info[n].max_rank)) * info[n].params_per_rank
               for n, r in ranks.items())


def _uniform_budget(info: tp.Mapping[str, LayerInfo], config: LoraConfig) -> int:
    """Adapter parameters of `uniform` at ``lora_rank`` (after clamping): the budget."""
    return _cost({n: config.lora_rank for n in info}, info, config)


def _budget_matched_heuristic(info: tp.Mapping[str, LayerInfo], config: LoraConfig,
                              depth: int, t_depth: int, budget: int) -> tp.Dict[str, int]:
    """The heuristic table scaled (one factor for all roles) to spend at most `budget`:
    bisection on the factor, keeping the largest table that fits."""
    low, high = 0.0, 8.0
    best = {n: 0 for n in info}
    for _ in range(30):
        mid = (low + high) / 2
        ranks = heuristic_ranks(list(info), config.lora_rank * mid, depth, t_depth)
        if _cost(ranks, info, config) <= budget:
            low, best = mid, ranks
        else:
            high = mid
    return best
