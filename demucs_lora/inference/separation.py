"""Audio in and stems out: what separation, evaluation and export share.

Why one module: ``tools.test_pretrained`` (and the int8 check of ``tools.export``) must
score exactly what ``demucs-lora`` writes, and both must match the stock demucs CLI. So the
mixture is read one way (soundfile, resampled with julius to the model rate, mono made
stereo), normalized one way (by its mono mean/std before ``apply_model``, restored after,
as ``demucs.api.Separator``); stems are written by ``inference.stem_files`` with demucs'
own encoders.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

from demucs_lora.core.errors import AudioError, ConfigError

if tp.TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def inference_device(name: tp.Optional[str]) -> str:
    """``name`` checked (cpu, cuda, cuda:N), or cuda when one is visible else cpu: a
    ConfigError naming --device instead of torch's error deep in the first forward."""
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r}: {str(exc).splitlines()[0]} (use cpu or "
                          "cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible; use --device cpu "
                          "(or leave --device out)")
    return name


def read_audio(path: tp.Union[str, Path], samplerate: int, channels: int) -> "torch.Tensor":
    """(channels, time) float32 tensor of ``path`` at ``samplerate`` (soundfile + julius)."""
    import julius
    import soundfile as sf
    import torch
    from demucs.audio import convert_audio_channels
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types
        raise AudioError(f"cannot read audio file {path}: {exc} (soundfile reads wav, flac, "
                         "ogg and mp3; convert other formats first)") from exc
    wav = torch.from_numpy(data.T.copy())
    try:
        wav = convert_audio_channels(wav, channels)
    except ValueError as exc:
        raise AudioError(f"{path}: {exc} ({wav.shape[0]} channels, model wants "
                         f"{channels})") from exc
    check_audio(wav, path)
    if sr != samplerate:
        wav = julius.resample_frac(wav, int(sr), int(samplerate))
    return wav.contiguous()


def check_audio(wav: "torch.Tensor", where: tp.Union[str, Path]) -> "torch.Tensor":
    """``wav`` when it can be separated; AudioError for no samples or NaN/inf samples
    (torch's and demucs' own errors on them say nothing about the file)."""
    import torch
    if wav.shape[-1] == 0:
        raise AudioError(f"{where} holds no samples (0 frames): re-export it")
    if not torch.isfinite(wav).all():
        raise AudioError(f"{where} holds NaN/inf samples: re-export it")
    return wav


def separate_tensor(model: "nn.Module", wav: "torch.Tensor", shifts: int = 1,
                    overlap: float = 0.25, split: bool = True, segment: tp.Optional[float] = None,
                    device: tp.Optional[str] = None, progress: bool = False,
                    jobs: int = 0) -> "torch.Tensor":
    """Stems (S, C, T) of ``wav`` (C, T), normalized exactly as ``demucs.api.Separator``:
    ``ref = wav.mean(0)``, input ``(wav - ref.mean()) / (ref.std() + 1e-8)``, output
    ``* std + mean``. Same numbers as ``python -m demucs`` for the same (merged) weights;
    ``jobs`` is its ``-j`` (chunks in parallel threads on CPU)."""
    import torch
    from demucs.apply import apply_model
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.no_grad():
        out = apply_model(model, ((wav - mean) / std)[None], shifts=shifts, split=split,
                          overlap=overlap, segment=segment, device=device, progress=progress,
                          num_workers=jobs)
    return out[0] * std + mean
