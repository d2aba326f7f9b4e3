"""The MSST metric names `sdr`, `neg_log_wmse`, `aura_stft`, `aura_mrstft`, each against
the value of the library that defines it (museval, torch-log-wmse, auraloss)."""
import importlib.util
import sys
import types

import pytest
import torch

import demucs_lora.metrics as M

SR = 44100


def signals(sources=3, channels=2, seconds=2.5, seed=0, samplerate=SR):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(sources, channels, int(seconds * samplerate), generator=gen)
    ref = torch.nn.functional.avg_pool1d(ref.reshape(-1, 1, ref.shape[-1]), 5, 1, 2)\
        .reshape(ref.shape) * 0.2
    est = ref + 0.05 * torch.randn(ref.shape, generator=gen) + 0.3 * ref.roll(1, 0)
    return est, ref, ref.sum(0)


def museval_metrics():
    """museval.metrics without the package import (musdb/stempeg want an ffmpeg binary)."""
    spec = importlib.util.find_spec("museval")
    if spec is None:
        pytest.skip("museval is not installed (pip install '.[test]')")
    path = f"{list(spec.submodule_search_locations)[0]}/metrics.py"
    module_spec = importlib.util.spec_from_file_location("museval_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # imports museval (seconds)
def test_sdr_is_museval_bsseval_v4():
    import numpy as np
    metrics = museval_metrics()
    rate = 8000
    est, ref, _ = signals(seconds=3.6, samplerate=rate)
    est[1, :, rate:2 * rate] = 0  # a silent estimate frame: NaN for every source there
    sdr, *_ = metrics.bss_eval(ref.double().transpose(1, 2).numpy(),
                               est.double().transpose(1, 2).numpy(), window=rate, hop=rate,
                               compute_permutation=False, framewise_filters=False,
                               bsseval_sources_version=False)
    assert sdr.shape == (3, 3) and np.isnan(sdr[:, 1]).all()
    want = torch.from_numpy(np.nanmedian(sdr, axis=1)).float()
    got = M.sdr(est, ref, samplerate=rate)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # through track_metrics, as `tools.test_pretrained --metrics sdr` reports it
    values = M.track_metrics(est, ref, ["a", "b", "c"], ["sdr"], samplerate=rate)
    assert values["b"]["sdr"] == pytest.approx(float(want[1]), abs=1e-4)


@pytest.fixture
def torch_log_wmse(monkeypatch):
    """The real library. Its only torchaudio use is resampling the filter for rates other
    than 44.1 kHz; torchaudio has no build for torch 2.13, so a stub refusing that stands
    in for it when it cannot be imported."""
    if importlib.util.find_spec("torch_log_wmse") is None:
        pytest.skip("torch-log-wmse is not installed (pip install --no-deps torch-log-wmse)")
    try:
        import torchaudio.transforms  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchaudio")
        stub.transforms = types.ModuleType("torchaudio.transforms")

        class Resample:
            def __init__(self, *args, **kwargs):
                raise AssertionError("the test only runs at 44.1 kHz")
        stub.transforms.Resample = Resample
        monkeypatch.setitem(sys.modules, "torchaudio", stub)
        monkeypatch.setitem(sys.modules, "torchaudio.transforms", stub.transforms)
    for name in [n for n in sys.modules if n.startswith("torch_log_wmse")]:
        monkeypatch.delitem(sys.modules, name)
    import torch_log_wmse
    return torch_log_wmse


def test_neg_log_wmse_is_torch_log_wmse(torch_log_wmse):
    est, ref, mix = signals(seconds=1.3)
    metric = torch_log_wmse.LogWMSE(sample_rate=SR)
    # [batch, channel, time] and [batch, channel, stem, time]
    per_stem = metric.per_stem(mix[None], est.transpose(0, 1)[None], ref.transpose(0, 1)[None])
    want = per_stem[0].mean(dim=0)  # p=0 pooling = mean of the per-channel scores
    got = M.neg_log_wmse(est, ref, mix)
    assert torch.allclose(got, want, atol=2e-3), (got, want)
    one = metric(mix[None], est[1].unsqueeze(1)[None], ref[1].unsqueeze(1)[None])
    assert float(got[1]) == pytest.approx(float(one), abs=2e-3)
    silent = M.neg_log_wmse(torch.zeros_like(est), torch.zeros_like(ref), mix)
    assert torch.allclose(silent, torch.full_like(silent, 73.6827), atol=1e-3)  # its ceiling


def test_aura_stft_is_auraloss():
    auraloss = pytest.importorskip("auraloss.freq")
    est, ref, _ = signals(seconds=1.0)
    loss = auraloss.STFTLoss(w_log_mag=1.0, w_lin_mag=0.0, w_sc=1.0)
    want = torch.stack([100 / (1 + 10 * loss(r[None], e[None])) for e, r in zip(est, ref)])
    assert torch.allclose(M.aura_stft(est, ref), want, rtol=1e-5)


def test_aura_mrstft_is_auraloss():
    auraloss = pytest.importorskip("auraloss.freq")
    pytest.importorskip("librosa")  # auraloss' mel filterbank
    pytest.importorskip("scipy")
    est, ref, _ = signals(seconds=1.0)
    loss = auraloss.MultiResolutionSTFTLoss(
        fft_sizes=[1024, 2048, 4096], hop_sizes=[256, 512, 1024], win_lengths=[1024, 2048, 4096],
        scale="mel", n_bins=128, sample_rate=SR, perceptual_weighting=True)
    want = torch.stack([100 / (1 + 10 * loss(r[None], e[None])) for e, r in zip(est, ref)])
    assert torch.allclose(M.aura_mrstft(est, ref), want, rtol=1e-4)


def test_unknown_metric_names_the_close_one():
    est, ref, mix = signals(sources=1, seconds=0.2)
    with pytest.raises(ValueError, match="did you mean 'aura_stft'"):
        M.track_metrics(est, ref, ["a"], ["aura_sftf"], mix=mix)


def test_test_pretrained_selects_metrics(tmp_path, monkeypatch, capsys):
    """`--metrics` picks the columns (MSST's names, space or comma separated), and an
    override after it still counts as an override."""
    import json
    from helpers import check_table_matches_json, make_xp
    from demucs_lora.commands.score_model import main
    xp = make_xp(tmp_path)
    monkeypatch.chdir(xp.root)
    chosen = ["sdr", "aura_stft", "nsdr"]
    if importlib.util.find_spec("torch_log_wmse") is not None:
        chosen.append("neg_log_wmse")
    out = tmp_path / "res.json"
    main(["-n", xp.sig, "--json", str(out), "--no-progress", "--metrics", chosen[0],
          ",".join(chosen[1:]), "test.shifts=0"])
    results = json.loads(out.read_text())
    assert results["metrics"] == chosen and results["settings"]["shifts"] == 0
    check_table_matches_json(capsys.readouterr().out, results)
    summary = results["summary"]
    assert all(summary[m] is not None for m in chosen if m != "sdr"), summary
    # this synthetic track has silent vocals: museval scores no frame (NaN -> null)
    assert summary["nsdr_vocals"] < -50 and "sdr" in summary and summary["sdr"] is None
    with pytest.raises(SystemExit):
        main(["-n", xp.sig, "--metrics", "sdrr", "--no-progress"])
    assert "did you mean 'sdr'" in capsys.readouterr().err
