"""Separation metrics on torch tensors: nSDR, SI-SDR, L1-freq, bleedless, fullness.

Every metric takes ``est`` and ``ref`` shaped ``(..., sources, channels, time)``
(note the order: estimate first, unlike demucs' ``new_sdr(references, estimates)``)
and returns one value per source, shaped ``(..., sources)``, in float32. Channels and
time are pooled together, as demucs and Music-Source-Separation-Training (MSST) do.

- ``nsdr``: the MDX-2021 "new SDR" exactly as ``demucs.evaluate.new_sdr`` computes it:
  ``10 log10((sum ref^2 + 1e-7) / (sum (ref - est)^2 + 1e-7))`` in float64 (demucs'
  delta is 1e-7). Higher is better.
- ``si_sdr``: scale-invariant SDR. ``alpha = <est, ref> / ||ref||^2``, target
  ``alpha ref``, ``10 log10(||target||^2 / ||est - target||^2)``, eps 1e-8 in each
  ratio; no mean removal (MSST does not remove it either). Higher is better.
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
  Both are in (0, 100], higher is better.
"""
from __future__ import annotations

import math
import typing as tp

import torch

METRICS = ("nsdr", "si_sdr", "l1_freq", "bleedless", "fullness")


def _check_pair(est: torch.Tensor, ref: torch.Tensor) -> None:
    if est.shape != ref.shape:
        raise ValueError(f"estimate shape {tuple(est.shape)} != reference shape {tuple(ref.shape)}")
    if est.dim() < 3:
        raise ValueError(f"expected (..., sources, channels, time), got shape {tuple(est.shape)}")


def nsdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MDX new SDR per source (dB), as demucs.evaluate.new_sdr: (..., S, C, T) -> (..., S)."""
    _check_pair(est, ref)
    ref64, est64 = ref.detach().double(), est.detach().double()
    num = ref64.square().sum(dim=(-2, -1)) + eps
    den = (ref64 - est64).square().sum(dim=(-2, -1)) + eps
    return (10 * torch.log10(num / den)).float()


def si_sdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR per source (dB), channels and time pooled: (..., S, C, T) -> (..., S)."""
    _check_pair(est, ref)
    ref64 = ref.detach().double().flatten(-2)
    est64 = est.detach().double().flatten(-2)
    alpha = ((est64 * ref64).sum(-1, keepdim=True) + eps) / (ref64.square().sum(-1, keepdim=True) + eps)
    target = alpha * ref64
    noise = est64 - target
    ratio = (target.square().sum(-1) + eps) / (noise.square().sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


def _per_source(est: torch.Tensor, ref: torch.Tensor,
                fn: tp.Callable[[torch.Tensor, torch.Tensor], tp.Sequence[torch.Tensor]]
                ) -> tp.List[torch.Tensor]:
    """Apply ``fn((C, T), (C, T)) -> values`` to every (..., source) item, one at a time.

    One at a time keeps the peak memory of full-track spectrograms to one source.
    """
    _check_pair(est, ref)
    lead = est.shape[:-2]
    flat_e = est.detach().float().reshape(-1, *est.shape[-2:])
    flat_r = ref.detach().float().reshape(-1, *ref.shape[-2:])
    outs = [fn(e, r) for e, r in zip(flat_e, flat_r)]
    n_out = len(outs[0]) if outs else 0
    return [torch.stack([o[i] for o in outs]).reshape(lead) for i in range(n_out)]


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

    return _per_source(est, ref, one)[0]


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

    bleedless_, fullness_ = _per_source(est, ref, one)
    return bleedless_, fullness_


def bleedless(est: torch.Tensor, ref: torch.Tensor, **kwargs: tp.Any) -> torch.Tensor:
    """Bleedless score per source (higher = less foreign energy in the estimate)."""
    return bleed_full(est, ref, **kwargs)[0]


def fullness(est: torch.Tensor, ref: torch.Tensor, **kwargs: tp.Any) -> torch.Tensor:
    """Fullness score per source (higher = less reference energy missing)."""
    return bleed_full(est, ref, **kwargs)[1]


def track_metrics(est: torch.Tensor, ref: torch.Tensor, sources: tp.Sequence[str],
                  metrics: tp.Sequence[str] = METRICS, samplerate: int = 44100
                  ) -> tp.Dict[str, tp.Dict[str, float]]:
    """Metrics of one track: est/ref (S, C, T) -> {source: {metric: value}}."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    if est.dim() != 3 or est.shape[0] != len(sources):
        raise ValueError(f"expected ({len(sources)} sources, channels, time), got {tuple(est.shape)}")
    values: tp.Dict[str, torch.Tensor] = {}
    if "nsdr" in metrics:
        values["nsdr"] = nsdr(est, ref)
    if "si_sdr" in metrics:
        values["si_sdr"] = si_sdr(est, ref)
    if "l1_freq" in metrics:
        values["l1_freq"] = l1_freq(est, ref)
    if "bleedless" in metrics or "fullness" in metrics:
        bl, fu = bleed_full(est, ref, samplerate=samplerate)
        if "bleedless" in metrics:
            values["bleedless"] = bl
        if "fullness" in metrics:
            values["fullness"] = fu
    return {src: {name: float(v[i]) for name, v in values.items()}
            for i, src in enumerate(sources)}


def summarize(per_track: tp.Sequence[tp.Mapping[str, tp.Mapping[str, float]]]) -> tp.Dict[str, float]:
    """Average ``track_metrics`` results over tracks, demucs-style flat keys.

    Returns ``{"{metric}_{source}": mean over tracks, "{metric}": mean of those over
    sources}`` (e.g. ``nsdr_vocals`` and ``nsdr``, as demucs' evaluate names them).
    NaN values are ignored; a source missing from some tracks is averaged over the others.
    """
    collected: tp.Dict[str, tp.Dict[str, tp.List[float]]] = {}
    for track in per_track:
        for source, values in track.items():
            for metric, value in values.items():
                collected.setdefault(metric, {}).setdefault(source, []).append(float(value))
    out: tp.Dict[str, float] = {}
    for metric, by_source in collected.items():
        means = []
        for source, vals in by_source.items():
            finite = [v for v in vals if not math.isnan(v)]
            mean = sum(finite) / len(finite) if finite else float("nan")
            out[f"{metric}_{source}"] = mean
            means.append(mean)
        finite_means = [m for m in means if not math.isnan(m)]
        out[metric] = sum(finite_means) / len(finite_means) if finite_means else float("nan")
    return out
