"""The public, load-and-use side of demucs-lora: find a model by name, put adapters on it.

Why a module of its own: every user-facing entry point (the Python API, the export,
test and separate CLIs) resolves "a model name" the same way, so a name that works in one
place works in all of them: they all load through ``models.load.load_model``, which
training's base uses too. Names resolve through ``model_files.resolve``, one order for training
and serving: a path (``.th``, ``.safetensors``, a bag ``.yaml`` or a folder), an XP
signature in Dora's folder, ``NAME`` in ``repo``, then the HF hub / torch hub caches
demucs 4.1 downloads into.

Every file is opened with ``weights_only=True`` and an allowlist of the demucs classes
(``demucs_lora.model_files.safe_load``): model files are code, so nothing else is unpickled unless
``trust_remote_code=True``.

Hot-swapping adapters on one base (what this short script does, and what
tests/api/test_api.py runs): ``load_lora_weights`` injects the LoRA layers the first time and
only replaces their tensors afterwards, so the base is loaded once::

    import soundfile as sf, torch
    from demucs_lora import apply_model, get_model, load_lora_weights

    model = get_model("base", repo="release_models")          # plain HTDemucs, loaded once
    data, sr = sf.read("song.wav", dtype="float32", always_2d=True)   # at model.samplerate
    wav = torch.from_numpy(data.T.copy()); ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8                  # normalize like the demucs CLI
    for adapter in ["adapters/piano", "adapters/guitar"]:     # .safetensors + .json pairs
        model = load_lora_weights(model, adapter)             # 1st: inject; then: swap tensors
        stems = apply_model(model, ((wav - mean) / std)[None], shifts=0)[0] * std + mean
        for source, stem in zip(model.sources, stems):
            sf.write(f"{adapter.split('/')[-1]}_{source}.wav", stem.T.numpy(), sr)

Swapping needs adapters of the same layout (ranks, alpha, targets, sources); for others
start again from a fresh ``get_model`` (or ``copy.deepcopy`` of the plain base).
"""
from __future__ import annotations

import copy
import typing as tp
from pathlib import Path

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn

PathLike = tp.Union[str, Path]

def model_display_name(name_or_sig: str) -> str:
    """Folder-friendly name of a model: a file's stem, else the name itself."""
    text = str(name_or_sig)
    return Path(text).stem if text.endswith((".th", ".safetensors")) else text.replace("/", "_")


def can_swap(model: "nn.Module", adapter: PathLike) -> bool:
    """True when ``adapter`` fits the LoRA layers already injected in ``model``
    (same ranks, alpha, rslora, bias, q/k/v mask, fully trained extras and sources),
    so that loading it only replaces tensors."""
    from demucs_lora.lora.adapter_file import read_header
    from demucs_lora.lora.config import LoraLayout
    from demucs_lora.lora.inject import has_lora, lora_config
    if not has_lora(model):
        return False
    header = read_header(adapter)
    same = LoraLayout.from_header(header) == lora_config(model)  # the layout compares
    return same and list(header.get("sources") or model.sources) == list(model.sources)


def with_adapter(base: "nn.Module", adapter: PathLike,
                 current: tp.Optional["nn.Module"] = None, merge: bool = False
                 ) -> "nn.Module":
    """``adapter`` on ``base`` (left untouched), reusing ``current`` when it can swap.

    ``current`` is a model returned by an earlier call: when the new adapter has the same
    layout, its tensors are replaced in place (no copy of the base); otherwise a fresh
    copy of ``base`` gets the adapter. ``merge`` folds it into the weights (faster
    inference; the next swap unmerges first).
    """
    from demucs_lora.lora.inject import merge_lora
    from demucs_lora.models.guide_methods import load_lora_weights
    if current is not None and can_swap(current, adapter):
        model = load_lora_weights(current, adapter)
    else:
        model = load_lora_weights(copy.deepcopy(base), adapter)
    if merge:
        merge_lora(model)
    return model.eval()


def get_model(name_or_sig: PathLike, repo: tp.Optional[PathLike] = None,
              adapter: tp.Optional[PathLike] = None, trust_remote_code: bool = False,
              root: tp.Optional[PathLike] = None) -> "nn.Module":
    """Load an HTDemucs for inference (eval mode, on CPU), optionally with an adapter.

    Args:
        name_or_sig: a ``.th`` path, a model name in ``repo`` (``NAME.th``, also the
            int8 packages ``tools.export --quantize 8`` writes) or an XP signature
            (``outputs/xps/SIG/best.th`` under ``root``, default the cwd).
        repo: folder of exported / demucs model files.
        adapter: an adapter (``path`` of a ``.safetensors`` + ``.json`` pair, or an XP
            signature for its ``lora_best``), loaded unmerged on top; it must have been
            trained on this base (checked by fingerprint: ``AdapterMismatch`` otherwise).
            An XP's ``best.th`` already has its adapter merged in: put adapters on the base.
        trust_remote_code: allow full unpickling of files outside the demucs allowlist.

    Raises ModelLoadError (unknown name: lists recent XPs, or NaN/inf weights) or
    AdapterMismatch (NaN/inf or malformed adapters too).
    """
    from demucs_lora.models.load import load_model
    model = load_model(name_or_sig, repo, adapter, trust_remote_code, root)
    from demucs_lora.models.guide_methods import attach  # model.load_lora_weights(path), .quantize(...), ...
    return attach(model.eval())
