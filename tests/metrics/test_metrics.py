import math

import pytest
import torch

from demucs_lora import metrics as M

SR = 44100


def _band_noise(lo, hi, seconds=1.0, channels=2, seed=0):
    """Noise limited to [lo, hi) Hz, std 0.1."""
    gen = torch.Generator().manual_seed(seed)
    n = int(SR * seconds)
    spec = torch.fft.rfft(torch.randn(channels, n, generator=gen))
    freqs = torch.fft.rfftfreq(n, 1 / SR)
    spec[:, (freqs < lo) | (freqs >= hi)] = 0
    x = torch.fft.irfft(spec, n=n)
    return 0.1 * x / x.std()


def _with_snr(ref, snr_db, seed):
    """ref + noise scaled so that sum ref^2 / sum noise^2 is exactly 10^(snr/10)."""
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref64 = ref.double()
    noise *= torch.sqrt(ref64.square().sum() / noise.square().sum() / 10 ** (snr_db / 10))
    return (ref64 + noise).float()


def test_nsdr_perfect_estimate_is_very_high():
    ref = torch.randn(2, 4, 2, 8000)
    out = M.nsdr(ref.clone(), ref)
    assert out.shape == (2, 4)
    assert (out > 90).all()


def test_nsdr_matches_known_snr_per_source():
    ref = torch.randn(3, 2, 16000, generator=torch.Generator().manual_seed(1))
    snrs = [0.0, 7.5, 20.0]
    est = torch.stack([_with_snr(r, s, seed=i) for i, (r, s) in enumerate(zip(ref, snrs))])
    out = M.nsdr(est, ref)
    assert torch.allclose(out, torch.tensor(snrs), atol=0.1)


def test_nsdr_is_demucs_new_sdr_formula():
    ref = torch.randn(1, 2, 2, 1000, generator=torch.Generator().manual_seed(2))
    est = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    r, e = ref.double(), est.double()
    expected = 10 * torch.log10((r.square().sum((2, 3)) + 1e-7) / ((r - e).square().sum((2, 3)) + 1e-7))
    assert torch.allclose(M.nsdr(est, ref).double(), expected, atol=1e-5)


def test_nsdr_silent_source_is_finite():
    ref = torch.zeros(2, 2, 100)
    assert torch.isfinite(M.nsdr(torch.zeros_like(ref), ref)).all()


def test_si_sdr_scale_invariant_and_matches_snr():
    ref = torch.randn(2, 2, 16000, generator=torch.Generator().manual_seed(4))
    est = torch.stack([_with_snr(r, 10.0, seed=10 + i) for i, r in enumerate(ref)])
    base = M.si_sdr(est, ref)
    assert torch.allclose(M.si_sdr(3.0 * est, ref), base, atol=1e-3)
    assert torch.allclose(M.si_sdr(0.01 * est, ref), base, atol=1e-3)
    assert torch.allclose(M.si_sdr(est, 5.0 * ref), base, atol=1e-3)
    # Random noise is nearly orthogonal to ref: SI-SDR ~ SNR; nSDR is not scale-invariant.
    assert torch.allclose(base, torch.tensor([10.0, 10.0]), atol=0.2)
    assert (M.nsdr(3.0 * est, ref) < 0).all()


def test_l1_freq_zero_for_perfect_and_grows_with_error():
    ref = torch.randn(2, 2, 8000, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(M.l1_freq(ref, ref), torch.zeros(2))
    small = M.l1_freq(ref * 1.1, ref)
    big = M.l1_freq(ref * 1.5, ref)
    assert (small > 0).all() and (big > small).all()
    assert torch.allclose(M.l1_freq_score(torch.zeros(1)), torch.tensor([100.0]))


def test_mel_filterbank_matches_librosa_values():
    # Values of librosa 0.11 filters.mel (Slaney scale + norm), printed once.
    fb = M.mel_filterbank(16000, 512, 40)
    assert fb.shape == (40, 257)
    assert fb[0, 1].item() == pytest.approx(0.005773601122200489, rel=1e-5)
    assert fb[5, 12].item() == pytest.approx(0.0013208640739321709, rel=1e-5)
    assert fb[20, 60].item() == pytest.approx(0.0009490285301581025, rel=1e-5)
    assert fb[39, 240].item() == pytest.approx(0.001518942415714264, rel=1e-5)
    assert fb.sum().item() == pytest.approx(1.2793331, rel=1e-5)
    big = M.mel_filterbank(44100, 4096, 512)
    assert big.sum().item() == pytest.approx(47.536895751953125, rel=1e-5)
    assert big[300, 372].item() == pytest.approx(0.026306888088583946, rel=1e-5)
    assert big[300].nonzero().flatten().tolist() == [370, 371, 372, 373, 374, 375]


def _msst_bleed_full(ref, est):
    """Literal MSST bleed_full on one (C, T) pair, torchaudio's AmplitudeToDB inlined."""
    window = torch.hann_window(4096)
    fb = M.mel_filterbank(SR, 4096, 512)

    def db(x):
        d = torch.abs(torch.stft(x, n_fft=4096, hop_length=1024, window=window,
                                 return_complex=True, pad_mode="constant"))
        x_db = 20 * torch.log10(torch.clamp(fb @ d, min=1e-10))
        return torch.max(x_db, x_db.amax() - 80)

    diff = db(est) - db(ref)
    pos, neg = diff[diff > 0], diff[diff < 0]
    avg_pos = pos.mean() if pos.numel() else torch.tensor(0.0)
    avg_neg = neg.mean() if neg.numel() else torch.tensor(0.0)
    return 100 / (avg_pos + 1), 100 / (-avg_neg + 1)


def test_bleed_full_batched_matches_per_track_reference():
    ref = torch.stack([_band_noise(0, 3000, 0.5, seed=s) for s in range(2)])[None]   # (1, 2, C, T)
    est = ref + 0.2 * torch.stack([_band_noise(1000, 9000, 0.5, seed=9 + s) for s in range(2)])[None]
    bl, fu = M.bleed_full(est, ref)
    assert bl.shape == fu.shape == (1, 2)
    for s in range(2):
        exp_bl, exp_fu = _msst_bleed_full(ref[0, s], est[0, s])
        assert bl[0, s].item() == pytest.approx(exp_bl.item(), rel=1e-4)
        assert fu[0, s].item() == pytest.approx(exp_fu.item(), rel=1e-4)


def test_bleedless_drops_when_another_source_leaks_in():
    low, high = _band_noise(0, 2000, seed=1), _band_noise(2000, 22050, seed=2)
    ref = low[None]
    bl0, fu0 = M.bleed_full(ref, ref)
    assert bl0.item() == pytest.approx(100.0) and fu0.item() == pytest.approx(100.0)
    bl, fu = M.bleed_full((low + 0.3 * high)[None], ref)
    assert bl.item() < 20          # measured ~3
    assert fu.item() > 90          # measured ~99


def test_fullness_drops_when_part_of_reference_is_missing():
    low, high = _band_noise(0, 2000, seed=3), _band_noise(2000, 22050, seed=4)
    ref = (low + high)[None]
    bl, fu = M.bleed_full(low[None], ref)
    assert fu.item() < 20          # measured ~2
    assert bl.item() > 90          # measured ~99
    assert M.bleedless(low[None], ref).item() == pytest.approx(bl.item())
    assert M.fullness(low[None], ref).item() == pytest.approx(fu.item())


def test_track_metrics_and_summarize():
    sources = ["drums", "bass"]
    ref = torch.randn(2, 2, 8000, generator=torch.Generator().manual_seed(6))
    est_a = torch.stack([_with_snr(ref[0], 10.0, 1), _with_snr(ref[1], 20.0, 2)])
    est_b = torch.stack([_with_snr(ref[0], 14.0, 3), _with_snr(ref[1], 30.0, 4)])
    tracks = [M.track_metrics(est_a, ref, sources), M.track_metrics(est_b, ref, sources)]
    assert set(tracks[0]) == set(sources)
    assert set(tracks[0]["drums"]) == set(M.METRICS)
    summary = M.summarize(tracks)
    assert summary["nsdr_drums"] == pytest.approx(12.0, abs=0.1)
    assert summary["nsdr_bass"] == pytest.approx(25.0, abs=0.1)
    assert summary["nsdr"] == pytest.approx(18.5, abs=0.1)
    assert {"si_sdr", "l1_freq", "bleedless", "fullness", "fullness_bass"} <= set(summary)


def test_summarize_ignores_nan_and_missing_sources():
    out = M.summarize([{"a": {"nsdr": 1.0}, "b": {"nsdr": math.nan}},
                       {"a": {"nsdr": 3.0}, "b": {"nsdr": 5.0}},
                       {"a": {"nsdr": 5.0}}])
    assert out == {"nsdr_a": 3.0, "nsdr_b": 5.0, "nsdr": 4.0}


def test_shape_mismatch_and_unknown_metric_raise():
    with pytest.raises(ValueError, match="shape"):
        M.nsdr(torch.zeros(2, 2, 10), torch.zeros(2, 2, 11))
    with pytest.raises(ValueError, match="unknown metrics"):  # (sdr is one now)
        M.track_metrics(torch.zeros(1, 2, 4096), torch.zeros(1, 2, 4096), ["x"], metrics=["pesq"])
