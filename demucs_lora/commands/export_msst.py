"""``tools.export --format msst``: a config + checkpoint that Music-Source-Separation-
Training (MSST) runs with no edits.

What MSST reads (``utils/settings.get_model_from_config`` -> ``models/demucs4ht.get_model``,
``utils/model_utils.demix``, ``load_start_checkpoint``): ``model: htdemucs`` and an
``htdemucs:`` block passed as keyword arguments to its copy of demucs' HTDemucs,
``HTDemucs(sources=training.instruments, audio_channels=training.channels,
samplerate=training.samplerate, segment=training.segment, **htdemucs)``; the checkpoint
is loaded strictly (a plain state dict). MSST's defaults differ from the ones our model
was built with (``use_train_segment``, ``dconv_mode``, ``bottom_channels``...), so every
constructor argument is written out. It cuts the song into chunks of
``samplerate * segment`` samples with a Python slice, so ``segment`` must be an integer
(``segment: 2.0`` crashes with "slice indices must be integers"): a model trained on a
fractional segment (htdemucs: 7.8 s) is written with the whole seconds below it: MSST then
builds it with that segment and runs it on windows of that length (the model accepts any
length up to its own), and export says so. A bag has no MSST form.
"""
from __future__ import annotations

import inspect
import math
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import ConfigError

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn

TRAINING_KEYS = ("sources", "audio_channels", "samplerate", "segment")


def htdemucs_arguments(model: "nn.Module") -> tp.Dict[str, tp.Any]:
    """Every HTDemucs constructor argument but the four MSST takes from ``training:``,
    with the model's value (recorded by demucs' ``capture_init``) or the default."""
    from demucs.htdemucs import HTDemucs
    _, kwargs = model._init_args_kwargs
    out = {}
    for name, param in inspect.signature(HTDemucs.__init__).parameters.items():
        if name == "self" or name in TRAINING_KEYS:
            continue
        value = kwargs.get(name, param.default)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def msst_segment(model: "nn.Module") -> tp.Tuple[int, str]:
    """(integer segment for MSST, a line when it is not the model's own)."""
    segment = float(model.segment)
    whole = int(math.floor(segment + 1e-9))
    if whole < 1:
        raise ConfigError(f"--format msst: the model's segment is {segment} s; MSST needs a "
                          "whole number of seconds >= 1 (its chunks are samplerate * segment "
                          "samples)")
    if whole == segment:
        return whole, ""
    return whole, (f"  note: MSST needs an integer segment: the model's {segment} s is "
                   f"written as {whole} s, so MSST runs it on {whole} s windows where demucs "
                   f"uses {segment} s (the model accepts any length up to its own): stems "
                   "differ slightly from ours")


def msst_config(model: "nn.Module", segment: int) -> dict:
    """The MSST config: ``audio`` (inference.py loads songs at ``audio.sample_rate``, 44100
    when absent), ``training``, ``inference``, ``model``, ``htdemucs``."""
    return {
        "audio": {"chunk_size": int(model.samplerate) * segment, "min_mean_abs": 0.0,
                  "hop_length": 1024, "sample_rate": int(model.samplerate),
                  "num_channels": int(model.audio_channels)},  # inference.py reads the song
        "training": {"segment": segment, "samplerate": int(model.samplerate),
                     "channels": int(model.audio_channels),
                     "instruments": list(model.sources), "target_instrument": None,
                     "use_amp": False, "batch_size": 1, "normalize": False},
        "inference": {"num_overlap": 4, "batch_size": 1, "normalize": False},
        "model": "htdemucs",
        "htdemucs": htdemucs_arguments(model),
    }


def msst_writes(model: "nn.Module", out: Path, name: str, sig: str
                ) -> tp.Tuple[list, tp.List[str]]:
    """(writes, lines) of ``NAME.msst.yaml`` + ``NAME.msst.ckpt`` (float32 state dict)."""
    import torch
    import yaml
    from demucs.apply import BagOfModels
    if isinstance(model, BagOfModels):
        raise ConfigError(f"--format msst: XP {sig} is a bag of {len(model.models)} models "
                          "and MSST runs one model: export a single-model XP (bag_member=K), "
                          "or use --format th/uvr/onnx for the bag")
    segment, note = msst_segment(model)
    text = yaml.safe_dump(msst_config(model, segment), sort_keys=False)
    state = {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()}
    config, ckpt = out / f"{name}.msst.yaml", out / f"{name}.msst.ckpt"
    writes = [(ckpt, lambda tmp: torch.save(state, tmp)),
              (config, lambda tmp: Path(tmp).write_text(text))]
    lines = [f"wrote {config} + {ckpt.name} (MSST htdemucs, segment {segment} s)",
             *([note] if note else []),
             f"  MSST: python inference.py --model_type htdemucs --config_path {config} "
             f"--start_check_point {ckpt} --input_folder SONGS --store_dir separated"]
    return writes, lines
