"""Signal-ratio scores per source: nSDR, SI-SDR, BSSEval v4 SDR (and the shapes every
metric shares).

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
- ``sdr``: BSSEval v4 SDR as ``museval.metrics.bss_eval`` computes it for MUSDB18
  (``bss_eval_images`` mode, the number papers report): per 1-second frame (window = hop
  = samplerate, museval's framing: a tail shorter than a frame is not scored),
  ``10 log10(sum ref^2 / sum (est - ref)^2)`` in float64 (in v4 the distortion filters
  cancel out of the SDR), NaN for a frame where any reference or any estimate is silent
  (museval's rule: its channel sum is 0 at every sample), +inf for an exact frame; the
  track's value is the median over frames (NaN ignored), as demucs' ``evaluate`` takes it.
  (MSST's own ``sdr`` is the global ratio, our ``nsdr``.)
"""
from __future__ import annotations

import typing as tp

import torch


def check_pair(est: torch.Tensor, ref: torch.Tensor) -> None:
    """ValueError unless est and ref have one (..., sources, channels, time) shape."""
    if est.shape != ref.shape:
        raise ValueError(f"estimate shape {tuple(est.shape)} != reference shape {tuple(ref.shape)}")
    if est.dim() < 3:
        raise ValueError(f"expected (..., sources, channels, time), got shape {tuple(est.shape)}")


def nsdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MDX new SDR per source (dB), as demucs.evaluate.new_sdr: (..., S, C, T) -> (..., S)."""
    check_pair(est, ref)
    ref64, est64 = ref.detach().double(), est.detach().double()
    num = ref64.square().sum(dim=(-2, -1)) + eps
    den = (ref64 - est64).square().sum(dim=(-2, -1)) + eps
    return (10 * torch.log10(num / den)).float()


def si_sdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR per source (dB), channels and time pooled: (..., S, C, T) -> (..., S)."""
    check_pair(est, ref)
    ref64 = ref.detach().double().flatten(-2)
    est64 = est.detach().double().flatten(-2)
    alpha = ((est64 * ref64).sum(-1, keepdim=True) + eps) / (ref64.square().sum(-1, keepdim=True) + eps)
    target = alpha * ref64
    noise = est64 - target
    ratio = (target.square().sum(-1) + eps) / (noise.square().sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


def per_source(est: torch.Tensor, ref: torch.Tensor,
                fn: tp.Callable[[torch.Tensor, torch.Tensor], tp.Sequence[torch.Tensor]]
                ) -> tp.List[torch.Tensor]:
    """Apply ``fn((C, T), (C, T)) -> values`` to every (..., source) item, one at a time.

    One at a time keeps the peak memory of full-track spectrograms to one source.
    """
    check_pair(est, ref)
    lead = est.shape[:-2]
    flat_e = est.detach().float().reshape(-1, *est.shape[-2:])
    flat_r = ref.detach().float().reshape(-1, *ref.shape[-2:])
    outs = [fn(e, r) for e, r in zip(flat_e, flat_r)]
    n_out = len(outs[0]) if outs else 0
    return [torch.stack([o[i] for o in outs]).reshape(lead) for i in range(n_out)]


def _silent(x: torch.Tensor) -> bool:
    """museval's _any_source_silent on (S, C, t): some source sums to 0 over channels at
    every sample."""
    return bool((x.sum(dim=1) == 0).all(dim=-1).any())


def sdr(est: torch.Tensor, ref: torch.Tensor, samplerate: int = 44100,
        window: tp.Optional[int] = None, hop: tp.Optional[int] = None) -> torch.Tensor:
    """BSSEval v4 SDR per source: median over frames (see the module docstring).

    (S, C, T) -> (S,) float32; ``window``/``hop`` default to one second."""
    check_pair(est, ref)
    if est.dim() != 3:
        return torch.stack([sdr(e, r, samplerate, window, hop) for e, r in zip(est, ref)])
    window = int(window or samplerate)
    hop = int(hop or samplerate)
    length = est.shape[-1]
    nwin = (length - window + hop) // hop if window < length else 1
    e64, r64 = est.detach().double().cpu(), ref.detach().double().cpu()
    frames = torch.full((est.shape[0], nwin), float("nan"), dtype=torch.float64)
    for t in range(nwin):
        part = slice(t * hop, min(t * hop + window, length))
        e, r = e64[..., part], r64[..., part]
        if _silent(r) or _silent(e):
            continue
        num = r.square().sum(dim=(1, 2))
        den = (e - r).square().sum(dim=(1, 2))
        frames[:, t] = torch.where(den == 0, torch.full_like(num, float("inf")),
                                   10 * torch.log10(num / den))
    return frames.nanquantile(0.5, dim=1).float()  # numpy's nanmedian (torch's takes the lower)
