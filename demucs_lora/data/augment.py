"""Batch augmentation of (B, S, C, T) stems with demucs.augment, and the mixture rebuilt.

demucs' Shift/FlipChannels/FlipSign/Scale/Remix modules are reused as they are (`demucs.augment`
imports no torchaudio); `dset.augment.repitch` is `demucs_lora.data.repitch` (julius
resampling instead of demucs' soundstretch binary).
"""
import typing as tp

import torch
from demucs import augment as daug
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.data.repitch import DEFAULTS as REPITCH_KEYS, Repitch, repitch_settings


class SegmentShift(daug.Shift):
    """demucs' Shift that crops the batch to `length` samples: random per-source offsets in
    training (all the same with `same`), the first `length` samples in eval."""

    def __init__(self, length, same=False, random=True):
        super().__init__(shift=0, same=same)
        self.length = int(length)
        self.random = random

    def forward(self, wav):
        if not self.random:
            return wav[..., :self.length]
        self.shift = max(0, wav.shape[-1] - self.length)
        return super().forward(wav)


def _flag(value, default):
    """A config entry that may be a bool, null or a dict of kwargs."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(default)
    return {**default, **dict(value)}


def build_augment(cfg_augment, samplerate, segment):
    """nn.Sequential of demucs.augment modules for a batch of stems (B, S, C, T).

    With `repitch` (proba > 0), first changes pitch and tempo (demucs_lora.data.repitch).
    Then crops to `segment` seconds with a random time shift per source (demucs' Shift;
    give it examples longer than `segment`, see `train_segment`; `time_shift: false` crops
    the first `segment` seconds instead), then FlipChannels +
    FlipSign (`flip`), Scale (`scale: [min, max]`), Remix (`remix`: shuffle stems across
    the batch). Recompute the mixture as the sum of the stems: `augment_batch` does it.
    """
    cfg = dict(cfg_augment or {})
    mods: list = []
    repitch = repitch_settings(cfg.get("repitch"))
    if repitch is not None:            # first: it needs the example's room beyond segment
        unknown = sorted(set(repitch) - set(REPITCH_KEYS))
        if unknown:
            raise ConfigError(f"dset.augment.repitch.{unknown[0]}: unknown key (allowed: "
                              f"{', '.join(REPITCH_KEYS)})")
        mods.append(Repitch(samplerate, **repitch))
    mods += [SegmentShift(int(segment * samplerate), same=bool(cfg.get("shift_same", False)),
                         random=bool(cfg.get("time_shift", True)))]
    if cfg.get("flip", False):
        mods += [daug.FlipChannels(), daug.FlipSign()]
    scale = cfg.get("scale")
    if scale is not None and scale is not False:
        if isinstance(scale, (int, float)) or len(scale) != 2:
            raise ConfigError(f"dset.augment.scale={scale!r}: expected [min, max] or null")
        mods.append(daug.Scale(proba=1.0, min=float(scale[0]), max=float(scale[1])))
    remix = _flag(cfg.get("remix"), {"proba": 1.0, "group_size": None})
    if remix is not None:
        mods.append(daug.Remix(**remix))
    return nn.Sequential(*mods)


def augment_batch(augment, batch):
    """(B, 1 + S, C, T) [mixture, stems] -> augmented stems, mixture = their sum."""
    stems = augment(batch[:, 1:].clone())      # demucs' Scale works in place
    return torch.cat([stems.sum(1, keepdim=True), stems], 1)


def calibration_batches(loader, augment, device: torch.device) -> tp.Iterator:
    """(mix, stems) batches of the train loader, augmented as in training (the data
    that gradient rank allocation and rank adaptation score layers on)."""
    for batch in loader:
        batch = augment_batch(augment, batch.to(device))
        yield batch[:, 0], batch[:, 1:]


