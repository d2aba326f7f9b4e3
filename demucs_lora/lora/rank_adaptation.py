"""Dynamic rank adaptation (``htdemucs.lora_rank_adaptation=true``): ranks move between
layers during training, within the parameter budget the run started with.

AdaLoRA (Zhang et al., 2023) is the anchor: the budget is fixed, each layer's adapter is
kept in SVD form when it changes, and components are re-scored as training goes. Every
``htdemucs.lora_adapt_every`` epochs (after the epoch, never after the last one):

1. Score. For each adapted layer, the singular values of its current delta
   ``scaling * B @ A`` (computed from the factors by QR, never densely decomposed) and of
   the full-weight gradient ``G`` of the training loss, accumulated over
   ``lora_gradient_batches`` calibration batches and projected off the span of the delta
   (``G_perp``: what the adapter cannot express yet). A kept component is worth its share
   ``sigma_k(delta)^2 / sum(all delta energy)``, a new one its share
   ``sigma_k(G_perp)^2 / sum(all gradient energy)``; both divided by the layer's
   parameters per rank unit, so that the budget is spent where a parameter buys most.
2. Allocate. Greedily, best score per parameter first, each layer between ``min_rank``
   and ``min(max_rank, lora_max_rank, its smallest dim)``, until the budget (the
   parameter count of the starting ranks) is spent: the total stays within one rank unit
   of it. Layers pinned by ``layer_ranks`` keep their rank (their cost counts).
3. Resize. A layer that shrinks to ``r'`` is replaced by the rank-``r'`` truncated SVD of
   its delta: the weight changes by exactly the dropped singular values (spectral norm
   ``sigma_{r'+1}``, Frobenius norm ``sqrt(sum of dropped sigma^2)``), so the output
   of the layer changes by at most ``sigma_{r'+1} * |x|``. A layer that grows keeps its
   delta exactly: the new components have a zero B side, and their A side starts along the
   top singular vectors of ``G_perp`` (the directions the loss wants most). When the rank
   changes, the scaling ``alpha / r`` (or ``alpha / sqrt(r)``) changes with it and the
   factors are rescaled so the delta does not. Only resized tensors lose their optimizer
   state (and restart their EMA); every other tensor keeps its Adam moments.

The current ranks, the budget and the rank history are part of ``checkpoint.th``; on
resume the layers are resized to the recorded ranks before any state is loaded, so a run
killed at any point resumes exactly. The history is also written to
``rank_history.json`` (plotted in ``rank_history.png`` when matplotlib is installed) and
to tensorboard (``lora_rank/LAYER``, ``lora_rank/params``),
and the adapter files (``lora_last``, ``lora_best``) carry the ranks they were saved with.
"""
from __future__ import annotations

import heapq
import json
import logging
import typing as tp
from pathlib import Path

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import LoraConfig
from demucs_lora.lora.inject import iter_lora_layers, lora_config, set_ranks
from demucs_lora.lora.layers import LoRALayer, params_per_rank
from demucs_lora.lora.ranks import pinned_layers
from demucs_lora.lora.resize import (base_weights, factors, gradient_matrix, low_rank_svd,
                                     matrix_pairs, replace_in_optimizer, resize_layer)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- scoring
class LayerScore(tp.NamedTuple):
    kept: torch.Tensor     # sigma_k(delta)^2 summed over pairs, descending, length r
    new: torch.Tensor      # sigma_k(G_perp)^2 summed over pairs, descending
    grad_energy: float     # |G|_F^2 summed over pairs


def _perp(grad: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
          ) -> torch.Tensor:
    """``grad`` with the span of the delta's (non-zero) singular vectors projected out."""
    keep = s > s.max().clamp(min=1e-300) * 1e-9 if s.numel() else s.bool()
    if not bool(keep.any()):
        return grad
    u, v = u[:, keep], v[:, keep]
    grad = grad - u @ (u.t() @ grad)
    return grad - (grad @ v) @ v.t()


def score_layer(layer: LoRALayer, cap: int) -> tp.Tuple[LayerScore, tp.List[torch.Tensor]]:
    """Scores of one layer (its base weights must hold the accumulated gradient) and the
    per-pair ``G_perp`` matrices (the growth directions)."""
    kept, new, energy, perps = None, None, 0.0, []
    for pair in matrix_pairs(layer):
        left, right = factors(layer, pair)
        u, s, v = low_rank_svd(left * layer.scaling, right)
        grad = gradient_matrix(layer, pair)
        energy += float(grad.square().sum())
        perp = _perp(grad, u, s, v)
        perps.append(perp)
        room = max(0, cap - layer.r)
        g2 = torch.linalg.svdvals(perp)[:room] ** 2 if room else perp.new_zeros(0)
        kept = s ** 2 if kept is None else kept + s ** 2
        g2 = torch.nn.functional.pad(g2, (0, room - g2.numel()))
        new = g2 if new is None else new + g2
    return LayerScore(kept.cpu(), new.cpu(), energy), perps


def plan_ranks(scores: tp.Mapping[str, LayerScore], ranks: tp.Mapping[str, int],
               cost: tp.Mapping[str, int], bounds: tp.Mapping[str, tp.Tuple[int, int]],
               budget: int, pinned: tp.Collection[str] = ()) -> tp.Dict[str, int]:
    """New rank per layer (see the module docstring, step 2).

    ``scores`` covers the free layers; ``pinned`` layers keep ``ranks[name]`` and their
    ``cost`` counts against ``budget``. Both queues of a layer are taken as prefixes, so a
    layer either keeps a prefix of its components (shrinks) or keeps them all and grows."""
    delta_total = sum(float(sc.kept.sum()) for sc in scores.values()) or 1.0
    grad_total = sum(sc.grad_energy for sc in scores.values()) or 1.0
    out = {n: int(ranks[n]) for n in pinned}
    taken = {n: [0, 0] for n in scores}  # (kept, new) taken so far
    spent = sum(out[n] * cost[n] for n in out)

    def unit(name: str) -> tp.Optional[tp.Tuple[float, int]]:
        """(value per parameter, kind 0 kept / 1 new) of the layer's next unit."""
        sc, (k, g) = scores[name], taken[name]
        options = []
        if k < sc.kept.numel():
            options.append((float(sc.kept[k]) / delta_total, 0))
        if g < sc.new.numel():
            options.append((float(sc.new[g]) / grad_total, 1))
        if not options:
            return None
        value, kind = max(options, key=lambda o: (o[0], -o[1]))
        return value / cost[name], kind

    def take(name: str, kind: int) -> None:
        taken[name][kind] += 1

    order = {n: i for i, n in enumerate(scores)}
    for name in scores:  # the floor: min_rank, best units first
        for _ in range(bounds[name][0]):
            nxt = unit(name)
            if nxt is None:
                break
            take(name, nxt[1])
            spent += cost[name]
    heap = []
    for name in scores:
        nxt = unit(name)
        if nxt is not None and sum(taken[name]) < bounds[name][1]:
            heap.append((-nxt[0], nxt[1], order[name], name))
    heapq.heapify(heap)
    while heap:
        _, kind, _, name = heapq.heappop(heap)
        if spent + cost[name] > budget:
            continue  # this layer no longer fits; smaller ones may
        take(name, kind)
        spent += cost[name]
        nxt = unit(name)
        if nxt is not None and sum(taken[name]) < bounds[name][1]:
            heapq.heappush(heap, (-nxt[0], nxt[1], order[name], name))
    for name in scores:
        out[name] = max(1, sum(taken[name]))
    return out


# ----------------------------------------------------------------------------- driver
def _calibration_gradients(model: nn.Module, layers: tp.Mapping[str, LoRALayer],
                           batches: tp.Iterable, n_batches: int, loss_fn: tp.Callable,
                           device: torch.device, seed: int) -> int:
    """Accumulate the full-weight gradient of every adapted layer's base weights over
    ``n_batches`` batches (eval mode, fp32, RNG forked and seeded: no effect on training).
    Returns the number of batches seen; the gradients stay in ``.grad``."""
    targets = list({id(p): p for layer in layers.values() for p in base_weights(layer)}
                   .values())
    params = list(model.parameters())
    saved_rg = [p.requires_grad for p in params]
    saved_grad = [p.grad for p in params]
    saved_training = [(m, m.training) for m in model.modules()]
    fork = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    seen = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for p in targets:
            p.requires_grad_(True)
        model.eval()
        with torch.random.fork_rng(devices=fork), torch.enable_grad():
            torch.manual_seed(seed)
            for mix, sources in batches:
                if seen >= n_batches:
                    break
                loss = loss_fn(model(mix.to(device)), sources.to(device))
                loss.backward()
                seen += 1
    finally:
        target_ids = {id(t) for t in targets}
        for p, rg, g in zip(params, saved_rg, saved_grad):
            if id(p) not in target_ids:
                p.grad = g
            p.requires_grad_(rg)
        for m, training in saved_training:
            m.training = training
    return seen


def _release_gradients(layers: tp.Mapping[str, LoRALayer]) -> None:
    for layer in layers.values():
        for p in base_weights(layer):
            p.grad = None


class RankAdaptation:
    """Owns the rank schedule of one training run (see the module docstring)."""

    def __init__(self, model: nn.Module, config: LoraConfig, seed: int = 0):
        self.model = getattr(model, "module", model)
        self.every = config.lora_adapt_every
        self.n_batches = config.lora_gradient_batches
        self.seed = int(seed)
        self.layers: tp.Dict[str, LoRALayer] = dict(iter_lora_layers(self.model))
        if not self.layers:
            raise ConfigError("htdemucs.lora_rank_adaptation=true but the model has no LoRA "
                              "layer (htdemucs.lora_rank > 0 and lora_targets select some)")
        qkv = lora_config(self.model).enable_qkv
        self.cost = {n: params_per_rank(layer, enable_qkv=qkv)
                     for n, layer in self.layers.items()}
        self.pinned = pinned_layers(self.layers, config)
        self.bounds = {}
        for name, layer in self.layers.items():
            smallest = min(min(factors(layer, p)[0].shape[0], factors(layer, p)[1].shape[1])
                           for p in matrix_pairs(layer))
            high = config.gradient_cap(smallest)
            self.bounds[name] = (min(config.min_rank, high), max(1, high))
        self.budget = self.spent()
        self.history: tp.List[dict] = [{"epoch": 0, "params": self.budget,
                                        "budget": self.budget, "ranks": self.ranks()}]

    # -- bookkeeping -------------------------------------------------------------
    def ranks(self) -> tp.Dict[str, int]:
        return {n: int(layer.r) for n, layer in self.layers.items()}

    def spent(self) -> int:
        return sum(layer.r * self.cost[n] for n, layer in self.layers.items())

    def due(self, epoch: int, epochs: int) -> bool:
        """Reallocate after (0-based) ``epoch``? Every ``every`` epochs, never after the last."""
        return (epoch + 1) % self.every == 0 and epoch + 1 < epochs

    def _set_ranks(self, ranks: tp.Mapping[str, int], perps=None) -> tp.Tuple[list, dict]:
        swaps, dropped, resized = [], {}, {}
        for name, rank in ranks.items():
            layer = self.layers[name]
            if int(rank) == layer.r:
                continue
            result = resize_layer(layer, int(rank), None if perps is None else perps.get(name))
            swaps += result["swaps"]
            if result["dropped"]:
                dropped[name] = [d.tolist() for d in result["dropped"]]
            resized[name] = int(rank)
        set_ranks(self.model, resized)
        return swaps, dropped

    @staticmethod
    def _follow(swaps, optimizer=None, ema=None, names=None) -> None:
        if optimizer is not None:
            replace_in_optimizer(optimizer, swaps)
        if ema is not None and names is not None:
            for old, new in swaps:
                name = names.get(id(new))
                if name in ema.shadow:
                    ema.shadow[name] = new.detach().clone()

    def _names(self) -> tp.Dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    # -- the reallocation ----------------------------------------------------------
    def reallocate(self, batches: tp.Iterable, loss_fn: tp.Callable,
                   optimizer: tp.Optional[torch.optim.Optimizer] = None, ema=None,
                   epoch: int = 0) -> dict:
        """Score, allocate, resize (steps 1-3); returns the history entry it appends."""
        device = next(self.model.parameters()).device
        seen = _calibration_gradients(self.model, self.layers, batches, self.n_batches,
                                      loss_fn, device, self.seed + 7919 * (epoch + 1))
        if seen == 0:
            raise ConfigError("htdemucs.lora_rank_adaptation: the calibration data yielded "
                              "no batch")
        world = _world_size()
        try:
            scores, perps = {}, {}
            for name, layer in self.layers.items():
                if world > 1:
                    for p in base_weights(layer):
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
                if name in self.pinned:
                    continue
                scores[name], perps[name] = score_layer(layer, self.bounds[name][1])
        finally:
            _release_gradients(self.layers)
        before = self.ranks()
        plan = plan_ranks(scores, before, self.cost, self.bounds, self.budget, self.pinned)
        swaps, dropped = self._set_ranks(plan, perps)
        self._follow(swaps, optimizer, ema, self._names())
        after = self.ranks()
        entry = {"epoch": epoch + 1, "params": self.spent(), "budget": self.budget,
                 "ranks": after,
                 "grown": {n: [before[n], after[n]] for n in after if after[n] > before[n]},
                 "shrunk": {n: [before[n], after[n]] for n in after if after[n] < before[n]},
                 "dropped_sigma": dropped}
        self.history.append(entry)
        logger.info("Rank adaptation after epoch %d: %d layer(s) grown, %d shrunk; %d LoRA "
                    "parameters for a budget of %d (%+.2f%%)%s", epoch + 1,
                    len(entry["grown"]), len(entry["shrunk"]), entry["params"], self.budget,
                    100 * (entry["params"] - self.budget) / max(1, self.budget),
                    "".join(f"\n  {n}: {a} -> {b}" for n, (a, b) in
                            {**entry["grown"], **entry["shrunk"]}.items()))
        return entry

    # -- persistence ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ranks": self.ranks(), "budget": self.budget, "history": self.history}

    def load_state_dict(self, state: dict, optimizer=None, ema=None) -> None:
        """Resize the layers to the recorded ranks (values come from the trainable state
        loaded afterwards), and follow with the optimizer / EMA."""
        unknown = sorted(set(state["ranks"]) - set(self.layers))
        if unknown:
            raise RuntimeError(f"checkpoint ranks name layers this model lacks: {unknown[:5]}"
                               " (was the config changed?)")
        swaps, _ = self._set_ranks(state["ranks"])
        self._follow(swaps, optimizer, ema, self._names())
        self.budget = int(state["budget"])
        self.history = list(state["history"])

    def write_history(self, folder: Path, writer=None) -> None:
        """``rank_history.json`` (+ ``rank_history.png`` when matplotlib is there) in
        ``folder``; every entry to tensorboard (``lora_rank/LAYER``, ``lora_rank/params``)."""
        from demucs_lora.core.files import atomic_write_text
        atomic_write_text(Path(folder) / "rank_history.json",
                          json.dumps(self.history, indent=2))
        if writer is not None:
            for entry in self.history:  # idempotent: a resumed run rewrites the same points
                for name, rank in entry["ranks"].items():
                    writer.add_scalar(f"lora_rank/{name}", rank, entry["epoch"])
                writer.add_scalar("lora_rank/params", entry["params"], entry["epoch"])
            writer.flush()
        plot_history(self.history, Path(folder) / "rank_history.png")


def plot_history(history: tp.Sequence[dict], path: Path) -> tp.Optional[Path]:
    """Rank of every layer against the epoch (one line per layer that ever moved), with
    matplotlib's Agg backend; returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [e["epoch"] for e in history]
    names = list(history[0]["ranks"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        ranks = [e["ranks"].get(name) for e in history]
        if len(set(ranks)) > 1:
            ax.plot(epochs, ranks, marker="o", linewidth=1, label=name)
    ax.set_xlabel("epoch (reallocation after it)")
    ax.set_ylabel("LoRA rank")
    ax.set_title(f"rank adaptation: {history[-1]['params']} parameters, "
                 f"budget {history[0]['budget']}")
    if len(ax.lines) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    from demucs_lora.core.files import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() \
        and torch.distributed.is_initialized() else 1
