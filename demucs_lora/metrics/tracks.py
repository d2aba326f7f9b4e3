"""The metric names, the metrics of one track, and their average over tracks.

The defaults (``METRICS``) are cheap and dependency-free (`separation`, `spectral`);
``EXTRA_METRICS`` are selectable too (``tools.test_pretrained --metrics ...``), with
the names and definitions of MSST's ``--metrics`` (``sdr`` in `separation`, the
others in `library_matched`).
"""
from __future__ import annotations

import math
import typing as tp

import torch

from demucs_lora.metrics.library_matched import aura_mrstft, aura_stft, neg_log_wmse
from demucs_lora.metrics.separation import nsdr, sdr, si_sdr
from demucs_lora.metrics.spectral import bleed_full, l1_freq

METRICS = ("nsdr", "si_sdr", "l1_freq", "bleedless", "fullness")
"""The default set (cheap, dependency-free)."""
EXTRA_METRICS = ("sdr", "neg_log_wmse", "aura_stft", "aura_mrstft")
ALL_METRICS = METRICS + EXTRA_METRICS


def track_metrics(est: torch.Tensor, ref: torch.Tensor, sources: tp.Sequence[str],
                  metrics: tp.Sequence[str] = METRICS, samplerate: int = 44100,
                  mix: tp.Optional[torch.Tensor] = None
                  ) -> tp.Dict[str, tp.Dict[str, float]]:
    """Metrics of one track: est/ref (S, C, T), mix (C, T) -> {source: {metric: value}}.

    ``mix`` (the unprocessed mixture) is needed by ``neg_log_wmse`` only."""
    check_metrics(metrics)
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
    if "sdr" in metrics:
        values["sdr"] = sdr(est, ref, samplerate=samplerate)
    if "neg_log_wmse" in metrics:
        if mix is None:
            raise ValueError("neg_log_wmse needs the mixture (mix=...)")
        values["neg_log_wmse"] = neg_log_wmse(est, ref, mix, samplerate=samplerate)
    if "aura_stft" in metrics:
        values["aura_stft"] = aura_stft(est, ref)
    if "aura_mrstft" in metrics:
        values["aura_mrstft"] = aura_mrstft(est, ref, samplerate=samplerate)
    return {src: {name: float(v[i]) for name, v in values.items()}
            for i, src in enumerate(sources)}


def check_metrics(metrics: tp.Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        import difflib
        hints = {m: difflib.get_close_matches(m, ALL_METRICS, n=1) for m in unknown}
        hint = "; ".join(f"{m!r}: did you mean {h[0]!r}?" for m, h in hints.items() if h)
        raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}"
                         + (f" ({hint})" if hint else ""))


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
