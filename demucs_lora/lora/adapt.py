"""`inject_lora(model, config)`: adapters on any HTDemucs, for your own training loop.

PEFT's ``get_peft_model(model, config)`` shape over the pieces a run uses: the ranks of a
`LoraConfig` (``lora.ranks``, measured on calibration batches in the gradient and
sensitivity modes), the wrapping (``lora.inject.wrap_layers``), and the LoRA-GA start
(``lora.init_gradient``) when ``lora_init="gradient"``.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from torch import nn
from torch.nn import functional as F

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.calibration import calibrate
from demucs_lora.lora.config import LoraConfig, LoraLayout
from demucs_lora.lora.init_gradient import gradient_init
from demucs_lora.lora.inject import wrap_layers
from demucs_lora.lora.ranks import allocate_ranks
from demucs_lora.lora.targets import lora_target_names


def inject_lora(model: nn.Module, config: tp.Union[LoraConfig, LoraLayout],
                batches: tp.Optional[tp.Iterable] = None,
                loss_fn: tp.Optional[tp.Callable] = None,
                train_extra: tp.Sequence[str] = ()) -> nn.Module:
    """Put LoRA adapters on `model` in place and freeze the rest; returns `model`.

    A `LoraConfig` (the ``htdemucs.lora_*`` keys) gets its ranks allocated on this model;
    the modes and the init that read gradients (``lora_rank_mode="gradient"`` or
    ``"sensitivity"``, ``lora_init="gradient"``) measure them on `batches` of (mix, sources)
    with `loss_fn` (default L1). A `LoraLayout` (explicit ranks per layer) is used as it
    is. `train_extra` names modules trained fully (e.g. output heads). Then `save_adapter`
    / `load_lora_weights`.
    """
    if isinstance(config, LoraLayout):
        layout = dataclasses.replace(config, train_extra=tuple(train_extra)) if train_extra \
            else config
        wrap_layers(model, layout)
        return model
    if config.lora_rank <= 0:
        raise ConfigError("inject_lora: LoraConfig(lora_rank=0) is full fine-tuning, there "
                          "is nothing to inject; set lora_rank > 0")
    if config.lora_rank_adaptation:
        raise ConfigError("inject_lora: lora_rank_adaptation=True moves ranks between "
                          "epochs inside demucs-lora's training loop (dora run), not in "
                          "yours: drop it, or train with dora run")
    names = [n for n in lora_target_names(model, config.lora_targets) if n not in train_extra]
    calibration = None
    if config.needs_calibration:
        what = (f"lora_rank_mode={config.lora_rank_mode!r}, "
                f"lora_init={config.lora_init!r}")
        if batches is None:
            raise ConfigError(f"inject_lora: {what} measures gradients: pass "
                              "batches=[(mix, sources), ...] from your data")
        calibration = calibrate(model, names, config.lora_enable_qkv, batches,
                                loss_fn or F.l1_loss, config.lora_gradient_batches, what)
    table = allocate_ranks(model, config, names=names, calibration=calibration)
    ranks = {name: int(rank) for name, rank in dict(table).items() if int(rank) > 0}
    wrap_layers(model, config.layout(ranks, train_extra))
    if config.lora_init == "gradient":
        gradient_init(model, calibration)
    return model
