"""Spectral scores per source: L1-freq and MSST's bleedless / fullness.

Shapes as in `demucs_lora.metrics.separation`.

- ``l1_freq``: mean absolute difference of STFT magnitudes (plain linear amplitude
  units, no dB, lower is better). STFT as MSST's ``L1Freq_metric``: n_fft 2048, hop
  1024, rectangular window, centred with reflect padding, no normalisation. MSST reports
  ``100 / (1 + 10 * l1_freq)``; see ``l1_freq_score``.
- ``bleedless`` / ``fullness``: MSST's ``bleed_full`` (the MVSEP leaderboard metrics).
  Per source: ``|STFT|`` (Hann, n_fft 4096, hop 1024, centred, zero padding) of each
  channel -> Slaney mel filterbank (512 bands, librosa's default ``filters.mel``) ->
  ``20 log10(max(mel, 1e-10))`` floored at (max over channels, bands, frames) - 80 dB
  separately for estimate and reference (torchaudio ``AmplitudeToDB(top_db=80)``) ->
  ``d = est_db - ref_db``. ``bleedless = 100 / (1 + mean(d[d > 0]))`` penalises energy
  the estimate has and the reference lacks (bleed); ``fullness = 100 / (1 + mean(-d[d < 0]))``
  penalises energy the estimate misses. An empty selection counts as 0 (score 100).
"""
from __future__ import annotations

import math
import typing as tp

import torch

from demucs_lora.metrics.separation import per_source


def l1_freq(est: torch.Tensor, ref: torch.Tensor, n_fft: int = 2048, hop_length: int = 1024
            ) -> torch.Tensor:
    """Mean |(|STFT est| - |STFT ref|)| per source (linear units, lower is better).

    Signals shorter than n_fft // 2 + 1 samples cannot be reflect-padded and raise.
    """
    window = torch.ones(n_fft, device=est.device)

    def one(e: torch.Tensor, r: torch.Tensor) -> tp.Tuple[torch.Tensor]:
        spec_e = torch.stft(e, n_fft, hop_length, window=window, center=True,
                            pad_mode="reflect", return_complex=True).abs()
        spec_r = torch.stft(r, n_fft, hop_length, window=window, center=True,
                            pad_mode="reflect", return_complex=True).abs()
        return ((spec_e - spec_r).abs().mean(),)

    return per_source(est, ref, one)[0]


def l1_freq_score(l1: torch.Tensor) -> torch.Tensor:
    """MSST's L1Freq score from ``l1_freq``: 100 / (1 + 10 * l1), in (0, 100], higher is better."""
    return 100 / (1 + 10 * l1)


def _hz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = freq / f_sp
    log_part = min_log_mel + torch.log(freq.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(freq >= min_log_hz, log_part, mel)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log_part, f_sp * mel)


def mel_filterbank(samplerate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """librosa.filters.mel(sr, n_fft, n_mels) defaults (Slaney scale and norm, 0..sr/2).

    Returns (n_mels, n_fft // 2 + 1) float32. With many bands and a small n_fft some
    low bands are empty (all zero), as in librosa.
    """
    fft_freqs = torch.linspace(0, samplerate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_max = _hz_to_mel(torch.tensor(samplerate / 2, dtype=torch.float64))
    mel_pts = torch.linspace(0.0, float(mel_max), n_mels + 2, dtype=torch.float64)
    hz_pts = _mel_to_hz(mel_pts)
    fdiff = hz_pts.diff()
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0)
    enorm = 2.0 / (hz_pts[2:] - hz_pts[:-2])
    return (weights * enorm[:, None]).float()


def _mel_db(x: torch.Tensor, window: torch.Tensor, fbank: torch.Tensor, hop_length: int,
            top_db: float) -> torch.Tensor:
    """(C, T) -> (C, n_mels, frames) dB, floored at its global max - top_db."""
    spec = torch.stft(x, window.numel(), hop_length, window=window, center=True,
                      pad_mode="constant", return_complex=True).abs()
    db = 20 * torch.log10((fbank @ spec).clamp(min=1e-10))
    return torch.maximum(db, db.amax() - top_db)


def bleed_full(est: torch.Tensor, ref: torch.Tensor, samplerate: int = 44100,
               n_fft: int = 4096, hop_length: int = 1024, n_mels: int = 512,
               top_db: float = 80.0) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(bleedless, fullness) per source, each (..., S); see the module docstring."""
    window = torch.hann_window(n_fft, device=est.device)
    fbank = mel_filterbank(samplerate, n_fft, n_mels).to(est.device)

    def one(e: torch.Tensor, r: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        diff = (_mel_db(e, window, fbank, hop_length, top_db)
                - _mel_db(r, window, fbank, hop_length, top_db))
        pos, neg = diff > 0, diff < 0
        mean_pos = diff.clamp(min=0).sum() / pos.sum().clamp(min=1)
        mean_neg = (-diff).clamp(min=0).sum() / neg.sum().clamp(min=1)
        return 100 / (1 + mean_pos), 100 / (1 + mean_neg)

    bleedless_, fullness_ = per_source(est, ref, one)
    return bleedless_, fullness_


def bleedless(est: torch.Tensor, ref: torch.Tensor, **kwargs: tp.Any) -> torch.Tensor:
    """Bleedless score per source (higher = less foreign energy in the estimate)."""
    return bleed_full(est, ref, **kwargs)[0]


def fullness(est: torch.Tensor, ref: torch.Tensor, **kwargs: tp.Any) -> torch.Tensor:
    """Fullness score per source (higher = less reference energy missing)."""
    return bleed_full(est, ref, **kwargs)[1]
