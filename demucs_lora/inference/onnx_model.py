"""Run an exported ONNX separator (``tools.export --format onnx``) with onnxruntime.

``OnnxHTDemucs`` stands where an HTDemucs stands for ``demucs.apply.apply_model``: the
same attributes (sources, samplerate, audio_channels, segment), ``valid_length`` = the
model's segment (chunks are padded to it, as an HTDemucs trained with
``use_train_segment`` pads them), and ``forward`` = demucs' own ``_spec``/``_magnitude``
in PyTorch, the graph in onnxruntime, demucs' own ``_mask``/``_ispec`` in PyTorch. So
separation goes through the same chunked overlap-add, shifts and normalization as the
PyTorch model (``inference.separation.separate_tensor``). A bag (``NAME.onnx.json``) is
demucs' ``BagOfModels`` of such members. No pickle is read: the graph and JSON metadata.
"""
from __future__ import annotations

import json
import typing as tp
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError, ModelLoadError

META_KEY = "demucs_lora"


class OnnxHTDemucs(nn.Module):
    """An exported HTDemucs run by onnxruntime, for ``apply_model``."""

    def __init__(self, path: Path, session: tp.Any, meta: dict):
        super().__init__()
        self.path, self.session = path, session
        self.sources = list(meta["sources"])
        self.samplerate = int(meta["samplerate"])
        self.audio_channels = int(meta["audio_channels"])
        self.segment = Fraction(*meta["segment"])
        self.nfft = int(meta["nfft"])
        self.hop_length = self.nfft // 4
        self.cac, self.wiener_iters, self.use_train_segment = True, 0, True
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # a device to report

    @property
    def length(self) -> int:
        return int(self.segment * self.samplerate)

    def valid_length(self, length: int) -> int:
        if length > self.length:
            raise ValueError(f"{self.path}: chunk of {length} samples is longer than the "
                             f"graph's {self.length}")
        return self.length

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        from demucs.htdemucs import HTDemucs
        outs = []
        for one in mix.float().cpu().split(1):
            z = HTDemucs._spec(self, one)
            mag = HTDemucs._magnitude(self, z)
            spec, time = self.session.run(None, {"mix": one.numpy(), "mag": mag.numpy()})
            zout = HTDemucs._mask(self, z, torch.from_numpy(spec))
            outs.append(torch.from_numpy(time) + HTDemucs._ispec(self, zout, self.length))
        return torch.cat(outs).to(mix.device)


def _session(path: Path) -> tp.Tuple[tp.Any, dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"-n {path}: running an ONNX model needs onnxruntime: pip install "
                          "'demucs-lora[onnx]'") from None
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} not found")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        raise ModelLoadError(f"{path} is not an ONNX model onnxruntime can load: "
                             f"{str(exc).splitlines()[0]}") from None
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if meta is None:
        raise ModelLoadError(f"{path} has no '{META_KEY}' metadata: only graphs written by "
                             "`tools.export --format onnx` run here")
    return session, json.loads(meta)


def load_onnx_model(path: Path) -> nn.Module:
    """``FILE.onnx`` as an ``OnnxHTDemucs``, or ``NAME.onnx.json`` as a bag of them."""
    from demucs.apply import BagOfModels
    path = Path(path)
    if path.name.endswith(".onnx.json"):
        try:
            spec = json.loads(path.read_text())
            members = [load_onnx_model(path.parent / name) for name in spec["models"]]
            weights = spec["weights"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"ONNX bag {path} cannot be read: {exc}") from None
        return BagOfModels(members, weights).eval()
    return OnnxHTDemucs(path, *_session(path)).eval()
