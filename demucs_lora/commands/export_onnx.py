"""``tools.export --format onnx``: the separator as an ONNX graph onnxruntime runs.

What is in the graph: ``HTDemucs.forward`` between the STFT and the iSTFT, traced by
``torch.onnx.export`` at the model's own segment (``segment * samplerate`` samples, batch
1): inputs the mixture chunk and its complex-as-channels spectrogram, outputs the
separated spectrogram and the time branch. The STFT and iSTFT stay in Python, in the
runner (``inference.onnx_model``), because ONNX has no iSTFT and the DFT-as-convolution
stand-in is what makes demucs-onnx's files 70x the weights; without it the file is the
weights plus the graph. The trace runs demucs' own ``forward`` with its four spectral
steps swapped for pass-throughs, so nothing of the network is rewritten here. A bag is
one graph per member plus ``NAME.onnx.json`` (members, weights, sources) for the runner.
The model's metadata (sources, samplerate, channels, segment, nfft) rides in the ONNX
file's metadata, as JSON.
"""
from __future__ import annotations

import json
import typing as tp
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError

META_KEY = "demucs_lora"


class SpectralCore(nn.Module):
    """``(mix, mag) -> (spec, time)``: an HTDemucs with the STFT (``_spec``,
    ``_magnitude``) and the iSTFT (``_mask``, ``_ispec``) cut out of its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mix: torch.Tensor, mag: torch.Tensor):
        from demucs.htdemucs import HTDemucs
        model, seen = self.model, {}

        def mask(z, m):
            seen["spec"] = m
            return m
        patches = {"_spec": lambda x: None, "_magnitude": lambda z: mag, "_mask": mask,
                   "_ispec": lambda z, length=None, scale=0: 0}
        model.__dict__.update(patches)  # instance attributes shadow the methods
        try:
            time = HTDemucs.forward(model, mix)
        finally:
            for key in patches:
                model.__dict__.pop(key, None)
        return seen["spec"], time


def metadata(model: nn.Module) -> dict:
    segment = Fraction(model.segment).limit_denominator(10000)
    return {"sources": list(model.sources), "samplerate": int(model.samplerate),
            "audio_channels": int(model.audio_channels), "nfft": int(model.nfft),
            "segment": [segment.numerator, segment.denominator]}


def check_exportable(model: nn.Module) -> None:
    from demucs.htdemucs import HTDemucs
    if not isinstance(model, HTDemucs) or not model.cac or model.wiener_iters:
        raise ConfigError("--format onnx: only HTDemucs with complex-as-channels output "
                          "(cac, no Wiener filtering: every demucs v4 model) is exported")
    if not model.use_train_segment:
        raise ConfigError("--format onnx: the model has use_train_segment=false (its "
                          "input length varies); the graph has the model's fixed segment")


def export_graph(model: nn.Module, path: str) -> None:
    """Trace ``model`` (eval, float32, CPU) into ``path`` with its metadata."""
    import onnx
    from demucs.htdemucs import HTDemucs
    check_exportable(model)
    model = model.float().cpu().eval()
    length = int(model.segment * model.samplerate)
    mix = torch.zeros(1, model.audio_channels, length)
    mag = HTDemucs._magnitude(model, HTDemucs._spec(model, mix))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused op has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(SpectralCore(model), (mix, mag), path, input_names=["mix", "mag"],
                              output_names=["spec", "time"], opset_version=17, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph = onnx.load(path)
    entry = graph.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(metadata(model))
    onnx.save(graph, path)


def onnx_writes(model: nn.Module, out: Path, name: str) -> tp.Tuple[list, tp.List[str]]:
    """(writes, lines) of NAME.onnx, or a bag's NAME_mK.onnx + NAME.onnx.json."""
    from demucs.apply import BagOfModels
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("--format onnx needs the onnx package: pip install "
                          "'demucs-lora[onnx]' (onnx, onnxscript, onnxruntime)") from None
    members = list(model.models) if isinstance(model, BagOfModels) else [model]
    for member in members:
        check_exportable(member)
    if len(members) == 1 and not isinstance(model, BagOfModels):
        path = out / f"{name}.onnx"
        writes = [(path, lambda tmp: export_graph(model, tmp))]
    else:
        names = [f"{name}_m{k}.onnx" for k in range(len(members))]
        spec = json.dumps({"models": names, "sources": list(model.sources),
                           "weights": [[float(w) for w in row] for row in model.weights]},
                          indent=2)
        path = out / f"{name}.onnx.json"
        writes = [(out / n, lambda tmp, m=m: export_graph(m, tmp)) for n, m in zip(names, members)]
        writes.append((path, lambda tmp: Path(tmp).write_text(spec)))
    weights = sum(p.numel() * 4 for m in members for p in m.state_dict().values())
    lines = [f"wrote {path}" + (f" + {len(members)} graphs" if path.suffix == ".json" else "")
             + f" (ONNX, STFT/iSTFT in the runner; float32 weights {weights:,} bytes)",
             f"  onnxruntime: python -m demucs_lora.commands.separate -n {path} SONG"]
    return writes, lines
