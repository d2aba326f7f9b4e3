"""The NaN policy: nothing non-finite is trained on, saved as "best", exported or served.

A NaN or inf loss, gradient or weight means the run diverged; `divergence_error` says at
which step and what to try. Models and adapters with non-finite tensors are refused by
every loader that serves them (export, separate, test, `get_model`).
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from demucs_lora.core.errors import ModelLoadError, TrainingDiverged


def is_finite_number(value: tp.Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def nonfinite_names(tensors: tp.Mapping[str, torch.Tensor]) -> tp.List[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [n for n, t in tensors.items()
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]


def check_finite_model(model: nn.Module, source: str) -> nn.Module:
    """ModelLoadError when a parameter or buffer of `model` holds NaN/inf."""
    bad = nonfinite_names(dict(model.state_dict()))
    if bad:
        raise ModelLoadError(
            f"{source} holds NaN/inf weights in {len(bad)} tensor(s) (first: {bad[:3]}): the "
            "training that made it diverged, and it would only output silence or NaN. Use an "
            "earlier checkpoint or retrain with a lower optim.lr / optim.clip_grad")
    return model


def check_finite_output(stems: torch.Tensor, sources: tp.Sequence[str], what: str
                        ) -> torch.Tensor:
    """`stems` (S, C, T) when every stem is finite; ModelLoadError naming `what` (the model
    and adapter, the track) and the stems otherwise: finite but huge weights (an adapter
    with values of 1e30) overflow to NaN in the forward, and NaN must not be served."""
    bad = [s for s, t in zip(sources, stems) if not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelLoadError(
            f"{what} outputs NaN/inf in stem(s) {', '.join(bad)}: nothing is written for "
            "it. Its weights overflow (an adapter or model with huge values, or a run that "
            "diverged): use another checkpoint or adapter")
    return stems


def divergence_error(optim: tp.Any, mixed_precision: tp.Any, where: str, what: str,
                     kept: str) -> TrainingDiverged:
    """The one-line error of a diverged run: where, what is kept, what to try (`optim`:
    the run's optim settings, its lr and clip_grad)."""
    tips = [f"a lower optim.lr (now {optim.lr:g})"]
    if not optim.clip_grad:
        tips.append("gradient clipping optim.clip_grad=1.0 (now off)")
    if mixed_precision == "fp16":
        tips.append("mixed_precision=bf16 or false (fp16 overflows above 65504)")
    tips.append("optim.skip_nonfinite=N to skip up to N such steps per epoch")
    return TrainingDiverged(f"training diverged at {where}: {what}. {kept}. Try "
                            f"{', '.join(tips)} (a new XP: the same command diverges again)")
