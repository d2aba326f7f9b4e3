"""Scores computed as the libraries MSST's ``--metrics`` names compute them: log-WMSE
(torch-log-wmse) and auraloss' STFT losses; each is checked against its library in
tests/metrics/test_metrics_libraries.py.

Shapes as in `demucs_lora.metrics.separation`.

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

import typing as tp

import torch

from demucs_lora.metrics.separation import check_pair, per_source
from demucs_lora.metrics.spectral import mel_filterbank

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
    check_pair(est, ref)
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
    return per_source(est, ref, one)[0]


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
    return per_source(est, ref, one)[0]
