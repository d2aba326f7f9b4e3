"""Pitch and tempo augmentation (`dset.augment.repitch`) without demucs' soundstretch binary.

demucs' RepitchedWrapper pipes every example through the `soundstretch` program (and
imports torchaudio); here the same random draws (a pitch shift of an integer number of
semitones in [-max_pitch, max_pitch], a tempo change in percent drawn from N(0, tempo_std)
clipped to +-max_tempo, with probability `proba` per example, the same for every stem of
an example) are applied in torch, on the batch's device:

1. pitch: resample with julius by 2**(semitones / 12) (this also changes the duration);
2. tempo: a phase vocoder (STFT, phase advance, inverse STFT: the algorithm of
   torchaudio.functional.phase_vocoder) stretches the result to the drawn tempo.

Every stem gets the same transform, and `augment.augment_batch` rebuilds the mixture as the
stems' sum afterwards, so stems keep summing to the mixture. The output has the input's
length (cropped, or zero-padded when a fast tempo made it shorter): `train_segment` reads
(segment + shift) * (1 + max_tempo / 100) seconds so that the crop has room.
"""
from __future__ import annotations

import math
import typing as tp

import julius
import torch
from torch import nn
from torch.nn import functional as F

DEFAULTS = {"proba": 0.2, "max_pitch": 2, "max_tempo": 12.0, "tempo_std": 5.0}


def phase_vocoder(spec: torch.Tensor, rate: float, hop: int) -> torch.Tensor:
    """Complex STFT (..., freq, frames) played `rate` times faster (rate > 1: shorter)."""
    freqs = spec.shape[-2]
    advance = torch.linspace(0, math.pi * hop, freqs, device=spec.device)[..., None]
    steps = torch.arange(0, spec.shape[-1], rate, device=spec.device)
    alphas = steps % 1.0
    index = steps.long()
    magnitude, angle = F.pad(spec.abs(), [0, 2]), F.pad(spec.angle(), [0, 2])
    phase_0 = angle[..., :1]
    norm_0, norm_1 = magnitude[..., index], magnitude[..., index + 1]
    phase = angle[..., index + 1] - angle[..., index] - advance
    phase = phase - 2 * math.pi * torch.round(phase / (2 * math.pi)) + advance
    phase = torch.cumsum(torch.cat([phase_0, phase[..., :-1]], dim=-1), -1)
    magnitude = alphas * norm_1 + (1 - alphas) * norm_0
    return torch.polar(magnitude, phase)


def time_stretch(wav: torch.Tensor, target: int, n_fft: int) -> torch.Tensor:
    """(..., T) -> (..., target): the same pitch, T / target times faster."""
    shape, length = wav.shape[:-1], wav.shape[-1]
    rate = length / target
    hop = n_fft // 4
    window = torch.hann_window(n_fft, device=wav.device)
    flat = wav.reshape(-1, length).float()
    spec = torch.stft(flat, n_fft, hop, window=window, return_complex=True)
    out = torch.istft(phase_vocoder(spec, rate, hop), n_fft, hop, window=window,
                      length=target)
    return out.reshape(*shape, -1).to(wav.dtype)


def repitch(wav: torch.Tensor, semitones: int, tempo: float, n_fft: int) -> torch.Tensor:
    """`wav` (..., T) with its pitch moved by `semitones` and its tempo by `tempo` percent."""
    target = int(round(wav.shape[-1] / (1 + tempo / 100)))
    if semitones:   # play 2**(semitones/12) times faster: pitch and tempo move together
        wav = julius.resample_frac(wav, int(round(100 * 2 ** (semitones / 12))), 100)
    return wav if wav.shape[-1] == target else time_stretch(wav, target, n_fft)


class Repitch(nn.Module):
    """Random pitch/tempo change of whole examples of a (B, S, C, T) batch of stems."""

    def __init__(self, samplerate: int, proba: float = 0.2, max_pitch: int = 2,
                 max_tempo: float = 12.0, tempo_std: float = 5.0):
        super().__init__()
        self.proba, self.max_pitch = float(proba), int(max_pitch)
        self.max_tempo, self.tempo_std = float(max_tempo), float(tempo_std)
        self.n_fft = 2048 if samplerate >= 32000 else 512   # ~46 ms frames at 44.1 kHz

    def draw(self) -> tp.Optional[tp.Tuple[int, float]]:
        """(semitones, tempo percent), or None for an example left as it is (torch RNG:
        a resumed epoch draws the same)."""
        if float(torch.rand(())) >= self.proba:
            return None
        semitones = int(torch.randint(-self.max_pitch, self.max_pitch + 1, ()))
        tempo = float(torch.randn(())) * self.tempo_std
        return semitones, min(max(-self.max_tempo, tempo), self.max_tempo)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        out = wav.clone()
        length = wav.shape[-1]
        for index in range(wav.shape[0]):
            change = self.draw()
            if change is None or change == (0, 0.0):
                continue
            moved = repitch(wav[index], *change, n_fft=self.n_fft)[..., :length]
            out[index] = F.pad(moved, (0, length - moved.shape[-1]))
        return out


def repitch_settings(node: tp.Any) -> tp.Optional[dict]:
    """The `dset.augment.repitch` settings when it is on (proba > 0), else None."""
    if node is None or node is False:
        return None
    settings = {**DEFAULTS, **({} if node is True else dict(node))}
    return settings if float(settings["proba"]) > 0 else None


def room(node: tp.Any) -> float:
    """How much longer a training example must be read so that the fastest tempo still
    fills it: 1 + max_tempo / 100 with repitch on, else 1."""
    settings = repitch_settings(node)
    return 1.0 if settings is None else 1 + float(settings["max_tempo"]) / 100
