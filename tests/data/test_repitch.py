"""dset.augment.repitch: pitch and tempo change without soundstretch (julius + a phase
vocoder), the same for every stem, the mixture still the stems' sum."""
import pytest
import torch

from demucs_lora.core.errors import ConfigError
from demucs_lora.data import repitch, stems
from demucs_lora.data.augment import augment_batch, build_augment

SR = 16000


def tone(freq, seconds=1.0):
    t = torch.arange(int(seconds * SR)) / SR
    return (0.3 * torch.sin(2 * torch.pi * freq * t))[None]


def peak_hz(wav):
    spectrum = torch.fft.rfft(wav[0] * torch.hann_window(wav.shape[-1]))
    return float(spectrum.abs().argmax()) * SR / wav.shape[-1]


@pytest.mark.parametrize("semitones, tempo", [(2, 0.0), (-2, 0.0), (0, 10.0), (1, -8.0)])
def test_pitch_and_tempo_move_independently(semitones, tempo):
    out = repitch.repitch(tone(440.0), semitones, tempo, n_fft=512)
    assert out.shape[-1] == pytest.approx(SR / (1 + tempo / 100), abs=2)
    assert peak_hz(out) == pytest.approx(440.0 * 2 ** (semitones / 12), rel=0.01)


def test_batch_augment_keeps_shape_sum_and_draws():
    aug = {"time_shift": False, "flip": False, "scale": None, "remix": False,
           "repitch": {"proba": 1.0, "max_pitch": 2, "max_tempo": 12.0, "tempo_std": 5.0}}
    module = build_augment(aug, SR, 0.5)
    assert isinstance(module[0], repitch.Repitch)
    gen = torch.Generator().manual_seed(0)
    stems4 = 0.1 * torch.randn(3, 4, 2, int(0.6 * SR), generator=gen)
    batch = torch.cat([stems4.sum(1, keepdim=True), stems4], 1)
    torch.manual_seed(1)
    out = augment_batch(module, batch)
    torch.manual_seed(1)
    again = augment_batch(module, batch)
    assert out.shape == (3, 5, 2, SR // 2) and torch.equal(out, again)   # torch RNG: resumable
    assert torch.allclose(out[:, 0], out[:, 1:].sum(1), atol=1e-6)
    assert not torch.allclose(out[:, 1:], batch[:, 1:, :, :SR // 2], atol=1e-3)
    off = build_augment({**aug, "repitch": {"proba": 0.0}}, SR, 0.5)
    assert not any(isinstance(m, repitch.Repitch) for m in off)
    with pytest.raises(ConfigError, match="dset.augment.repitch.prob: unknown key"):
        build_augment({**aug, "repitch": {"prob": 0.5}}, SR, 0.5)


def test_train_segment_has_room_for_the_fastest_tempo():
    from demucs_lora.data.settings import DataConfig
    data = DataConfig.of(segment=2.0, shift=1.0,
                         augment={"repitch": {"proba": 0.2, "max_tempo": 12.0}})
    assert stems.train_segment(data) == pytest.approx(3.0 * 1.12)
    data = DataConfig.of(segment=2.0, shift=1.0, augment={"repitch": {"proba": 0.0}})
    assert stems.train_segment(data) == 3.0
