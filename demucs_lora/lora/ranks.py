"""Pick a LoRA rank for every targeted layer: ``uniform``, ``heuristic`` or ``gradient``.

``allocate_ranks(model, cfg)`` reads the ``htdemucs.lora_*`` keys and returns a
`RankTable` {module path: rank}. Rank 0 means "do not wrap this layer".

Modes (``htdemucs.lora_rank_mode``):

- ``uniform``: every target gets ``lora_rank``.
- ``heuristic``: ``lora_rank`` scaled per role by `HEURISTIC_SCALE` (below). Measured
  on full HTDemucs: the outermost encoder/decoder layers see the largest activations,
  so an adapter there costs as much memory as full fine-tuning saves; they get 0.
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
the adapter approximates; each clamp is logged once per call.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import heapq
import itertools
import json
import logging
import typing as tp
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.targets import glob_specificity, layer_role, lora_target_names, resolve_alias

logger = logging.getLogger(__name__)

from demucs_lora.lora.layers import LoRALayer, params_per_rank
from demucs_lora.lora.layers_attention import check_enable_qkv

MODES = ("uniform", "heuristic", "gradient")

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


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the rank table knows about one target layer."""
    type: str
    shape: tp.Tuple[int, ...]   # main weight (in_proj_weight for attention)
    params_per_rank: int        # adapter parameters per unit of rank
    max_rank: int               # smallest dim of the approximated matrix
    role: str


class RankTable(Mapping):
    """Ordered, read-only {module path: rank}; rank 0 means "not wrapped"."""

    def __init__(self, ranks: tp.Mapping[str, int], info: tp.Mapping[str, LayerInfo],
                 mode: str, budget: tp.Optional[int] = None,
                 model_params: tp.Optional[int] = None):
        self._ranks = {k: int(v) for k, v in ranks.items()}
        self.info = dict(info)
        self.mode = mode
        self.budget = budget
        self.model_params = model_params

    def __getitem__(self, name: str) -> int:
        return self._ranks[name]

    def __iter__(self):
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __repr__(self) -> str:
        return f"RankTable({self.mode}, {self._ranks})"
    def active(self) -> tp.Dict[str, int]:
        """{path: rank} of the layers that get an adapter (rank > 0)."""
        return {k: v for k, v in self._ranks.items() if v > 0}

    def params(self, name: str) -> int:
        return self._ranks[name] * self.info[name].params_per_rank

    def trainable_params(self) -> int:
        """Adapter parameters of the whole table (weights of A and B, no biases)."""
        return sum(self.params(n) for n in self._ranks)

    def format(self) -> str:
        rows = [("layer", "type", "shape", "rank", "params")]
        for name, rank in self._ranks.items():
            info = self.info[name]
            rows.append((name, info.type, "x".join(map(str, info.shape)), str(rank),
                         str(self.params(name))))
        total = self.trainable_params()
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        summary = f"mode={self.mode}  layers={len(self.active())}/{len(self)}  " \
                  f"lora params={total}"
        if self.budget is not None:
            summary += f"  budget={self.budget}"
        if self.model_params:
            summary += f"  ({100 * total / self.model_params:.2f}% of {self.model_params})"
        return "\n".join(lines + [summary])

    def to_dict(self) -> tp.Dict[str, tp.Any]:
        return {"mode": self.mode, "budget": self.budget, "model_params": self.model_params,
                "trainable_params": self.trainable_params(), "ranks": dict(self._ranks),
                "layers": [{"name": n, "type": self.info[n].type,
                            "shape": list(self.info[n].shape), "role": self.info[n].role,
                            "rank": r, "params": self.params(n)}
                           for n, r in self._ranks.items()]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


# ---------------------------------------------------------------- config handling

def _get(cfg: tp.Any, key: str, default: tp.Any = None) -> tp.Any:
    if hasattr(cfg, "get") and not isinstance(cfg, type):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _int(value: tp.Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or int(value) < minimum:
        raise ConfigError(f"htdemucs.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _layer_ranks(cfg: tp.Any) -> tp.List[tp.Tuple[str, int]]:
    raw = _get(cfg, "layer_ranks")
    if raw is None:
        return []
    if not hasattr(raw, "items"):
        raise ConfigError(f"htdemucs.layer_ranks must be a mapping {{glob: rank}}, got {raw!r}")
    return [(str(g), _int(r, f"layer_ranks[{g!r}]", 0)) for g, r in raw.items()]


# ---------------------------------------------------------------- layer geometry

def _matrices(module: nn.Module, enable_qkv) -> tp.List[tp.Tuple[nn.Parameter, tp.Callable]]:
    """(weight, to_matrix) pairs: the matrices a LoRA of `module` approximates."""
    if isinstance(module, nn.MultiheadAttention):
        E = module.embed_dim
        if module._qkv_same_embed_dim:
            mats = [(module.in_proj_weight, (lambda t, i=i: t[i * E:(i + 1) * E]))
                    for i in range(3) if enable_qkv[i]]
        else:
            ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            mats = [(ws[i], (lambda t: t)) for i in range(3) if enable_qkv[i]]
        return mats + [(module.out_proj.weight, lambda t: t)]
    # Conv (out, in*k), ConvTranspose (in, out*k), Linear (out, in), Embedding (num, dim)
    return [(module.weight, lambda t: t.reshape(t.shape[0], -1))]


def _layer_info(module: nn.Module, enable_qkv, role: str) -> LayerInfo:
    if isinstance(module, LoRALayer):
        module = module.base
    mats = _matrices(module, enable_qkv)
    smallest = min(min(fn(p.detach()).shape) for p, fn in mats)
    main = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) \
        and module._qkv_same_embed_dim else mats[0][0]
    return LayerInfo(type(module).__name__, tuple(main.shape),
                     int(params_per_rank(module, enable_qkv=tuple(enable_qkv))),
                     int(smallest), role)


# ---------------------------------------------------------------- overrides, clamps

def _glob_match(name: str, glob: str) -> bool:
    return fnmatch.fnmatchcase(name, glob) or \
        (glob.endswith(".*") and fnmatch.fnmatchcase(name, glob[:-2]))


def _apply_overrides(ranks: tp.Dict[str, int], overrides: tp.List[tp.Tuple[str, int]],
                     targets_key: tp.Any) -> tp.Set[str]:
    """Apply `layer_ranks` in increasing specificity; return the overridden paths."""
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
           lora_max_rank: tp.Optional[int]) -> None:
    for name, rank in ranks.items():
        cap = info[name].max_rank
        why = f"smallest dim {cap}"
        if lora_max_rank is not None and lora_max_rank < cap:
            cap, why = lora_max_rank, f"htdemucs.lora_max_rank={lora_max_rank}"
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


def _gradient_spectra(model: nn.Module, names: tp.Sequence[str], enable_qkv,
                      batches: tp.Iterable, loss_fn: tp.Callable, n_batches: int
                      ) -> tp.Dict[str, torch.Tensor]:
    """Per layer: squared singular values of the accumulated full-weight gradient
    (summed over the matrices of an attention adapter)."""
    mats = {n: _matrices(model.get_submodule(n), enable_qkv) for n in names}
    targets = list({id(p): p for ms in mats.values() for p, _ in ms}.values())
    all_params = list(model.parameters())
    saved_rg = [p.requires_grad for p in all_params]
    saved_grad = [p.grad for p in targets]
    saved_training = [(m, m.training) for m in model.modules()]
    device = all_params[0].device if all_params else torch.device("cpu")
    fork = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in targets:
            p.grad = None
            p.requires_grad_(True)
        model.eval()
        seen = 0
        with torch.random.fork_rng(devices=fork), torch.enable_grad():
            torch.manual_seed(0)
            for mix, sources in itertools.islice(iter(batches), n_batches):
                loss = loss_fn(model(mix.to(device)), sources.to(device))
                loss.backward()
                seen += 1
        if seen == 0:
            raise ConfigError("htdemucs.lora_rank_mode=gradient: the calibration data "
                              "yielded no batch")
        spectra = {}
        for name in names:
            total = None
            for p, fn in mats[name]:
                g = fn(p.grad) if p.grad is not None else fn(torch.zeros_like(p))
                s2 = torch.linalg.svdvals(g.detach().double()) ** 2
                total = s2 if total is None else total + s2
            spectra[name] = total.cpu()
            for p, _ in mats[name]:
                p.grad = None  # memory-bounded: one layer's gradient at a time
        return spectra
    finally:
        for p, rg in zip(all_params, saved_rg):
            p.requires_grad_(rg)
        for p, g in zip(targets, saved_grad):
            p.grad = g
        for m, training in saved_training:
            m.training = training


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


def allocate_ranks(model: nn.Module, cfg: tp.Any, batches: tp.Optional[tp.Iterable] = None,
                   loss_fn: tp.Optional[tp.Callable] = None,
                   names: tp.Optional[tp.Sequence[str]] = None) -> RankTable:
    """Rank per target layer of `model` from the `htdemucs` config node `cfg`.

    `names` defaults to ``lora_target_names(model, cfg.lora_targets)``. `batches`
    (iterable of (mix (B,C,T), sources (B,S,C,T))) and `loss_fn(output, sources)`
    (default L1) are used by the gradient mode only.
    """
    mode = str(_get(cfg, "lora_rank_mode", "uniform"))
    if mode not in MODES:
        raise ConfigError(f"htdemucs.lora_rank_mode={mode!r} is unknown; allowed: {list(MODES)}")
    raw_rank = _get(cfg, "lora_rank", 0)
    rank = _int(raw_rank, "lora_rank", 0)
    if rank == 0:
        raise ConfigError("htdemucs.lora_rank=0 means full fine-tuning: no rank to allocate; "
                          "set htdemucs.lora_rank > 0 for LoRA")
    max_cap = _get(cfg, "lora_max_rank", None)
    max_cap = None if max_cap is None else _int(max_cap, "lora_max_rank", 1)
    qkv = _get(cfg, "lora_enable_qkv", None)
    enable_qkv = check_enable_qkv([True, False, True] if qkv is None else list(qkv))
    targets_key = list(_get(cfg, "lora_targets", None) or [])
    if names is None:
        names = lora_target_names(model, _get(cfg, "lora_targets", None))
    names = list(names)
    if not names:
        raise ConfigError(f"htdemucs.lora_targets={targets_key} selects no layer of this model")
    overrides = _layer_ranks(cfg)

    depth = len(getattr(model, "encoder", ()) or ())
    t_depth = len(getattr(model, "tencoder", ()) or ())
    info = {n: _layer_info(model.get_submodule(n), enable_qkv, layer_role(n, depth, t_depth))
            for n in names}
    model_params = sum(p.numel() for p in model.parameters())

    budget = None
    if mode == "heuristic" and _get(cfg, "lora_budget_match", False):
        budget = _uniform_budget(names, info, rank, max_cap)
        ranks = _budget_matched_heuristic(names, rank, depth, t_depth, info, max_cap, budget)
    elif mode == "heuristic":
        ranks = heuristic_ranks(names, rank, depth, t_depth)
    else:
        ranks = {n: rank for n in names}
    pinned = _apply_overrides(ranks, overrides, targets_key)
    _clamp(ranks, info, max_cap)

    if mode == "gradient":
        budget = _gradient_budget(ranks, names, pinned, info, rank, max_cap, cfg,
                                  model, batches, loss_fn, enable_qkv)
    return RankTable(ranks, info, mode, budget=budget, model_params=model_params)


def _gradient_budget(ranks, names, pinned, info, rank, max_cap, cfg, model, batches,
                     loss_fn, enable_qkv) -> int:
    """Gradient mode, in place on `ranks`: returns the parameter budget it matched."""
    if batches is None:
        raise ConfigError("htdemucs.lora_rank_mode=gradient needs calibration data: pass "
                          "batches of (mix, sources) to allocate_ranks (the train loader)")
    min_rank = _int(_get(cfg, "min_rank", 1), "min_rank", 0)
    max_rank = _int(_get(cfg, "max_rank", 32), "max_rank", max(1, min_rank))
    n_batches = _int(_get(cfg, "lora_gradient_batches", 8), "lora_gradient_batches", 1)
    uniform_cap = {n: min(info[n].max_rank, max_cap or info[n].max_rank) for n in names}
    budget = _uniform_budget(names, info, rank, max_cap)
    free = [n for n in names if n not in pinned]
    caps = {n: min(uniform_cap[n], max_rank) for n in free}
    for n in free:
        ranks[n] = min(min_rank, caps[n])
    if free:
        spectra = _gradient_spectra(model, free, enable_qkv, batches,
                                    loss_fn or F.l1_loss, n_batches)
        _greedy(ranks, free, caps, spectra, info, budget)
    return budget


def _uniform_budget(names, info, rank: int, max_cap) -> int:
    """Adapter parameters of `uniform` at `rank` (after clamping): the matched budget."""
    return sum(min(rank, info[n].max_rank, max_cap or info[n].max_rank)
               * info[n].params_per_rank for n in names)


def _budget_matched_heuristic(names, rank, depth, t_depth, info, max_cap, budget):
    """The heuristic table scaled (one factor for all roles) to spend at most `budget`:
    bisection on the factor, keeping the largest table that fits."""
    def cost(ranks):
        return sum(min(r, info[n].max_rank, max_cap or info[n].max_rank)
                   * info[n].params_per_rank for n, r in ranks.items())
    low, high = 0.0, 8.0
    best = {n: 0 for n in names}
    for _ in range(30):
        mid = (low + high) / 2
        ranks = heuristic_ranks(names, rank * mid, depth, t_depth)
        if cost(ranks) <= budget:
            low, best = mid, ranks
        else:
            high = mid
    return best
