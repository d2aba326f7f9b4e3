"""Optimizer over trainable parameters only, warmup + decay schedule, EMA of trainables.

The EMA tracks only trainable tensors (LoRA factors, heads): demucs' ModelEMA copies the
whole state dict, which for a LoRA run would duplicate the frozen base for nothing.
"""
from __future__ import annotations

import contextlib
import math
import typing as tp

import torch
from torch import nn

from demucs_lora.config.run_config import OptimConfig
from demucs_lora.core.errors import ConfigError
from demucs_lora.models.trainable import swapped_trainables


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient; set "
                          "htdemucs.lora_rank > 0 (and htdemucs.lora_targets that match "
                          "layers of the model), train_heads=true, or htdemucs.lora_rank=0 for a "
                          "full fine-tune")
    klass = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.optim]
    return klass(param_groups(model, params, optim.lr, float(optim.lora_plus_ratio)),
                 lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def autocast(mixed_precision: tp.Union[str, bool, None], device_type: str):
    """The forward's autocast for ``mixed_precision`` (fp16 / bf16); none when it is off.
    fp16 also needs the Solver's GradScaler (bf16 has float32's range and does not)."""
    if not mixed_precision:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


def is_lora_b(name: str) -> bool:
    """A LoRA B factor (``lora_B``, ``lora_B_q``, ...): the output side of an adapter."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "lora_B" or leaf.startswith("lora_B_")


def param_groups(model: nn.Module, params: tp.List[nn.Parameter], lr: float, ratio: float
                 ) -> tp.List[dict]:
    """One group, or with LoRA+ (``optim.lora_plus_ratio`` != 1) two: the B factors at
    ``ratio * lr``, everything else (A factors, heads, biases) at ``lr``. The scheduler
    scales each group's own lr, so the ratio holds through warmup and decay."""
    if ratio == 1.0:
        return [{"params": params}]
    trainable = {id(p) for p in params}
    b_ids = {id(p) for n, p in model.named_parameters() if id(p) in trainable and is_lora_b(n)}
    rest = [p for p in params if id(p) not in b_ids]
    b_side = [p for p in params if id(p) in b_ids]
    groups = [{"params": rest}] if rest else []
    return groups + ([{"params": b_side, "lr": lr * ratio}] if b_side else [])


def lr_lambda(schedule: str, warmup: int, total: int) -> tp.Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine / linear decay to 0, or constant."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
    return factor


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.schedule, optim.warmup_steps, total_steps))


class TrainableEMA:
    """Exponential moving average of the trainable parameters of a model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)

    def applied(self, model: nn.Module) -> tp.ContextManager[nn.Module]:
        """`model` with the averaged tensors for a `with` block (validation), restored after."""
        return swapped_trainables(model, self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """KeyError/ValueError when `state` is not an EMA of the same trainables."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow) or any(
                tuple(v.shape) != tuple(self.shadow[k].shape) for k, v in shadow.items()):
            raise ValueError("the EMA state does not match the model's trainable tensors")
        self.decay = float(state["decay"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
