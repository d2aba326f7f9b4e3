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

Selectable too (``tools.test_pretrained --metrics ...``; the defaults are ``METRICS``), with
the names and definitions of MSST's ``--metrics``:

- ``sdr``: BSSEval v4 SDR as ``museval.metrics.bss_eval`` computes it for MUSDB18
  (``bss_eval_images`` mode, the number papers report): per 1-second frame (window = hop
  = samplerate, museval's framing: a tail shorter than a frame is not scored),
  ``10 log10(sum ref^2 / sum (est - ref)^2)`` in float64 (in v4 the distortion filters
  cancel out of the SDR), NaN for a frame where any reference or any estimate is silent
  (museval's rule: its channel sum is 0 at every sample), +inf for an exact frame; the
  track's value is the median over frames (NaN ignored), as demucs' ``evaluate`` takes it.
  (MSST's own ``sdr`` is the global ratio, our ``nsdr``.)
- ``neg_log_wmse``: log-WMSE of torch-log-wmse (``LogWMSE(sample_rate=44100)``, higher is
  better, about 3 poor to 30 very good; MSST maps ``neg_log_wmse`` onto it). Per source and
  channel: the energy of ``est - ref`` and the mean-square energy of the mixture, both
  weighted by the library's human-hearing FIR (4000 taps, the energy of the full linear
  convolution, through Parseval), ``mse = E(est - ref) / (T * max(E(mix) / T, 1e-16))``,
  score ``-4 * log(mse + 1e-8)`` averaged over channels. Needs the FIR file of the
  ``torch-log-wmse`` package (``pip install --no-deps torch-log-wmse``; nothing of it is
  imported: its torchaudio dependency does not run on torch 2.13); 44.1 kHz only.
- ``aura_stft``: auraloss ``STFTLoss(w_log_mag=1, w_lin_mag=0, w_sc=1)`` (n_fft 1024, hop
  256, periodic Hann, centred reflect padding, magnitudes ``sqrt(max(|X|^2, 1e-8))``) with
  MSST's argument order (input = reference, target = estimate): spectral convergence
  ``|S_est - S_ref|_F / |S_est|_F`` plus ``mean |log S_ref - log S_est|``; reported as
  ``100 / (1 + 10 * loss)``, in (0, 100], higher is better.
- ``aura_mrstft``: auraloss ``MultiResolutionSTFTLoss`` as MSST sets it (n_fft 1024 / 2048
  / 4096, hops 256 / 512 / 1024, windows = n_fft, 128 Slaney mel bands, A-weighting
  pre-filter: auraloss' 101-tap least-squares FIR fit of the IEC A-weighting curve, which
  needs scipy), the mean of the three STFT losses; ``100 / (1 + 10 * loss)``.
"""
from __future__ import annotations

import math
import typing as tp

import torch

METRICS = ("nsdr", "si_sdr", "l1_freq", "bleedless", "fullness")
"""The default set (cheap, dependency-free)."""
EXTRA_METRICS = ("sdr", "neg_log_wmse", "aura_stft", "aura_mrstft")
ALL_METRICS = METRICS + EXTRA_METRICS


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


# ----------------------------------------------------------------------------- sdr (BSSEval v4)
def _silent(x: torch.Tensor) -> bool:
    """museval's _any_source_silent on (S, C, t): some source sums to 0 over channels at
    every sample."""
    return bool((x.sum(dim=1) == 0).all(dim=-1).any())


def sdr(est: torch.Tensor, ref: torch.Tensor, samplerate: int = 44100,
        window: tp.Optional[int] = None, hop: tp.Optional[int] = None) -> torch.Tensor:
    """BSSEval v4 SDR per source: median over frames (see the module docstring).

    (S, C, T) -> (S,) float32; ``window``/``hop`` default to one second."""
    _check_pair(est, ref)
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


# ----------------------------------------------------------------------------- log-WMSE
_LOG_WMSE_IR_TAPS = 4000
_LOG_WMSE_IR_SHA256 = "bc9950e4f6be2846bf178017a5cca1e5407244d7b255d60de17b882f304998ab"
_log_wmse_ir: tp.Optional[torch.Tensor] = None


def log_wmse_filter() -> torch.Tensor:
    """The hearing-sensitivity FIR (float32, 4000 taps at 44.1 kHz) that ships with the
    torch-log-wmse package, read from its installed files (the package is not imported)."""
    global _log_wmse_ir
    if _log_wmse_ir is None:
        import hashlib
        import importlib.util
        from pathlib import Path
        spec = importlib.util.find_spec("torch_log_wmse")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("metric neg_log_wmse needs the filter of the torch-log-wmse "
                              "package: pip install --no-deps torch-log-wmse (its torchaudio "
                              "dependency is not needed)")
        data = (Path(list(spec.submodule_search_locations)[0]) / "filter_ir.f32").read_bytes()
        if len(data) != 4 * _LOG_WMSE_IR_TAPS or \
                hashlib.sha256(data).hexdigest() != _LOG_WMSE_IR_SHA256:
            raise ImportError("torch-log-wmse's filter_ir.f32 is not the 1.x filter "
                              "(size or sha256 differ): reinstall torch-log-wmse>=1.0")
        _log_wmse_ir = torch.frombuffer(bytearray(data), dtype=torch.float32).clone()
    return _log_wmse_ir


def _fft_size(n: int) -> int:
    """Smallest even 2^a 3^b 5^c >= n (a fast FFT length, little padding)."""
    best = 1 << max(1, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = 2
            while m * p35 < n:
                m *= 2
            best = min(best, m * p35)
            p35 *= 3
        p5 *= 5
    return best


def _weighted_energy(x: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
    """Energy of ``conv(x, ir)`` (full linear convolution) over the last dim, by Parseval:
    any even transform size >= n + m - 1 gives the same value."""
    size = _fft_size(x.shape[-1] + ir.numel() - 1)
    response = torch.fft.rfft(ir, n=size).abs().square()
    coef = torch.full_like(response, 2.0)
    coef[0] = coef[-1] = 1.0  # DC, and the real Nyquist bin of an even size
    spectrum = torch.fft.rfft(x, n=size).abs().square()
    return (spectrum * (response * coef / size)).sum(dim=-1)


def neg_log_wmse(est: torch.Tensor, ref: torch.Tensor, mix: torch.Tensor,
                 samplerate: int = 44100) -> torch.Tensor:
    """torch-log-wmse's LogWMSE per source (module docstring): est/ref (..., S, C, T),
    mix (..., C, T) -> (..., S), higher is better. float32, as the library computes."""
    _check_pair(est, ref)
    if samplerate != 44100:
        raise ValueError(f"neg_log_wmse is defined at 44100 Hz (its hearing filter), got "
                         f"{samplerate} Hz")
    if mix.shape != est.shape[:-3] + est.shape[-2:]:
        raise ValueError(f"mixture shape {tuple(mix.shape)} does not fit estimates "
                         f"{tuple(est.shape)} (expected (..., channels, time))")
    ir = log_wmse_filter().to(est.device)
    length = est.shape[-1]
    mixes = mix.detach().float().reshape(-1, *mix.shape[-2:])
    pairs = zip(est.detach().float().reshape(-1, *est.shape[-3:]),
                ref.detach().float().reshape(-1, *ref.shape[-3:]))
    out = []
    for m, (e, r) in zip(mixes, pairs):  # one track at a time, one source at a time
        floor = (_weighted_energy(m, ir) / length).clamp(min=1e-16)          # (C,)
        scores = [(-4.0 * torch.log(_weighted_energy(es - rs, ir) / (length * floor) + 1e-8))
                  .mean() for es, rs in zip(e, r)]
        out.append(torch.stack(scores))
    return torch.stack(out).reshape(est.shape[:-2])


# ----------------------------------------------------------------------------- auraloss STFT
def _stft_mag(x: torch.Tensor, n_fft: int, hop: int, win: int, eps: float = 1e-8
              ) -> torch.Tensor:
    window = torch.hann_window(win, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, win, window, return_complex=True)
    return torch.sqrt(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=eps))


def _stft_loss(ref: torch.Tensor, est: torch.Tensor, n_fft: int, hop: int, win: int,
               fbank: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """auraloss STFTLoss(w_sc=1, w_log_mag=1) of (C, T) signals, input=ref, target=est."""
    x_mag, y_mag = _stft_mag(ref, n_fft, hop, win), _stft_mag(est, n_fft, hop, win)
    if fbank is not None:
        x_mag, y_mag = fbank @ x_mag, fbank @ y_mag
    sc = torch.linalg.norm((y_mag - x_mag).flatten()) / torch.linalg.norm(y_mag.flatten())
    return sc + (torch.log(x_mag) - torch.log(y_mag)).abs().mean()


def aura_stft(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """MSST's aura_stft per source: ``100 / (1 + 10 * STFTLoss(ref, est))``, (..., S)."""
    def one(e, r):
        return (100 / (1 + 10 * _stft_loss(r, e, 1024, 256, 1024)),)
    return _per_source(est, ref, one)[0]


_A_WEIGHTING: tp.Dict[int, torch.Tensor] = {}


def a_weighting_fir(samplerate: int, ntaps: int = 101) -> torch.Tensor:
    """auraloss' FIRFilter('aw'): the IEC/CD 1672 analog A-weighting curve, bilinear
    transform, 512-point response, least-squares fit by a ``ntaps`` FIR (scipy)."""
    if samplerate not in _A_WEIGHTING:
        try:
            import numpy as np
            import scipy.signal
        except ImportError:
            raise ImportError("metric aura_mrstft needs scipy (its A-weighting filter): "
                              "pip install scipy") from None
        f1, f2, f3, f4, a1000 = 20.598997, 107.65265, 737.86223, 12194.217, 1.9997
        num = [(2 * np.pi * f4) ** 2 * (10 ** (a1000 / 20)), 0, 0, 0, 0]
        den = np.polymul([1, 4 * np.pi * f4, (2 * np.pi * f4) ** 2],
                         [1, 4 * np.pi * f1, (2 * np.pi * f1) ** 2])
        den = np.polymul(np.polymul(den, [1, 2 * np.pi * f3]), [1, 2 * np.pi * f2])
        b, a = scipy.signal.bilinear(num, den, fs=samplerate)
        freqs, response = scipy.signal.freqz(b, a, worN=512, fs=samplerate)
        taps = scipy.signal.firls(ntaps, freqs, abs(response), fs=samplerate)
        _A_WEIGHTING[samplerate] = torch.tensor(taps.astype("float32"))
    return _A_WEIGHTING[samplerate]


MRSTFT_RESOLUTIONS = ((1024, 256, 1024), (2048, 512, 2048), (4096, 1024, 4096))


def aura_mrstft(est: torch.Tensor, ref: torch.Tensor, samplerate: int = 44100,
                n_mels: int = 128) -> torch.Tensor:
    """MSST's aura_mrstft per source: ``100 / (1 + 10 * MRSTFT(ref, est))``, (..., S)."""
    taps = a_weighting_fir(samplerate).to(est.device)
    banks = {n: mel_filterbank(samplerate, n, n_mels).to(est.device)
             for n, _, _ in MRSTFT_RESOLUTIONS}

    def weighted(x: torch.Tensor) -> torch.Tensor:  # (C, T): the FIR per channel, same length
        return torch.nn.functional.conv1d(x[:, None], taps.view(1, 1, -1),
                                          padding=taps.numel() // 2)[:, 0]

    def one(e, r):
        e, r = weighted(e), weighted(r)
        loss = sum(_stft_loss(r, e, n, h, w, banks[n]) for n, h, w in MRSTFT_RESOLUTIONS)
        return (100 / (1 + 10 * loss / len(MRSTFT_RESOLUTIONS)),)
    return _per_source(est, ref, one)[0]


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
