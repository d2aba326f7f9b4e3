"""The rank table `allocate_ranks` returns, and the geometry of a LoRA target layer.

`RankTable` is an ordered, read-only {module path: rank} with, per layer, what the
allocation knew (`LayerInfo`: type, shape, adapter parameters per rank unit, smallest
dimension, role), printable as a table and as JSON (``ranks.json`` of an XP).
"""
from __future__ import annotations

import dataclasses
import json
import typing as tp
from collections.abc import Mapping

from torch import nn

from demucs_lora.lora.layers import LoRALayer, params_per_rank


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


# ---------------------------------------------------------------- layer geometry

def target_matrices(module: nn.Module, enable_qkv) -> tp.List[tp.Tuple[nn.Parameter, tp.Callable]]:
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


def layer_info(module: nn.Module, enable_qkv, role: str) -> LayerInfo:
    if isinstance(module, LoRALayer):
        module = module.base
    mats = target_matrices(module, enable_qkv)
    smallest = min(min(fn(p.detach()).shape) for p, fn in mats)
    main = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) \
        and module._qkv_same_embed_dim else mats[0][0]
    return LayerInfo(type(module).__name__, tuple(main.shape),
                     int(params_per_rank(module, enable_qkv=tuple(enable_qkv))),
                     int(smallest), role)
