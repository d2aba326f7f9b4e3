"""Bags of models (``htdemucs_ft``: 4 HTDemucs, identity ``weights``) adapted as one XP.

Every member gets its own adapters; their layers live under ``models.K.`` in the bag, so
the adapter files carry the member index in every key. Training runs the bag's forward:
the per-source weighted mean of the members' outputs, as ``demucs.apply.apply_model``
combines a bag at inference. With identity weights member k only receives gradient from
source k, and one step costs the forward/backward of every member (N x the time and the
activation memory of one model).

On disk a bag is demucs' own layout: ``NAME.yaml`` (``models``, ``weights``, ``segment``)
beside one model file per member, which ``demucs --repo DIR -n NAME`` loads.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
import yaml
from demucs.apply import BagOfModels

from demucs_lora.core.files import atomic_write_group


class TrainableBag(BagOfModels):
    """A BagOfModels whose forward is the weighted combination (demucs raises there)."""

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        out, totals = 0.0, 0.0
        for model, weights in zip(self.models, self.weights):
            w = torch.as_tensor(weights, dtype=mix.dtype, device=mix.device)[None, :, None, None]
            out = out + w * model(mix)
            totals = totals + w
        return out / totals


def bag_weights(weights: tp.Sequence[tp.Sequence[float]], plan: tp.List[tp.List[int]]
                ) -> tp.List[tp.List[float]]:
    """Member weights for remapped sources: a source started from base heads takes the
    largest of their weights (kick from drums: the drums specialist); one started from
    nothing is weighted 1 in every member."""
    return [[max((row[i] for i in srcs), default=1.0) for srcs in plan] for row in weights]


def remap_bag(bag: BagOfModels, sources: tp.Sequence[str],
              source_init: tp.Optional[tp.Mapping] = None) -> TrainableBag:
    """Every member remapped to ``sources`` (``heads.remap_sources``), weights to match."""
    from demucs_lora.models.heads import remap_sources, source_plan
    plan = source_plan(list(bag.sources), sources, source_init)
    members = [remap_sources(m, sources, source_init) for m in bag.models]
    return TrainableBag(members, bag_weights(bag.weights, plan))


def member_names(name: str, count: int) -> tp.List[str]:
    return [f"{name}_m{k}" for k in range(count)]


def bag_writes(bag: BagOfModels, folder: Path, name: str, training_args: tp.Any = None,
               half: bool = False, fmt: str = "th") -> tp.List[tp.Tuple[Path, tp.Callable]]:
    """(path, writer) of ``folder/NAME.yaml`` and one ``NAME_mK.th`` (or ``.safetensors``)
    per plain member, the yaml last: renamed together (``core.files.atomic_write_group``), a
    reader never sees a bag whose members are missing."""
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora.model_files.packages import safetensors_writer
    args = OmegaConf.create(training_args if training_args is not None else {})
    writes = []
    for member, sig in zip(bag.models, member_names(name, len(bag.models))):
        if fmt == "hf":
            writes.append((folder / f"{sig}.safetensors", safetensors_writer(member, half)))
        else:
            package = serialize_model(member, args, half=half)
            writes.append((folder / f"{sig}.th", lambda tmp, p=package: torch.save(p, tmp)))
    spec = yaml.safe_dump({"models": member_names(name, len(bag.models)),
                           "weights": [[float(w) for w in row] for row in bag.weights]})
    writes.append((folder / f"{name}.yaml", lambda tmp: Path(tmp).write_text(spec)))
    return writes


def write_bag(bag: BagOfModels, folder: Path, name: str, training_args: tp.Any = None,
              half: bool = False, fmt: str = "th") -> tp.List[Path]:
    """Write a plain bag as demucs lays bags out (see ``bag_writes``)."""
    return atomic_write_group(bag_writes(bag, folder, name, training_args, half, fmt))
