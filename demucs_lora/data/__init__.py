"""Data: stem-folder datasets (formats, part folders, roots, MUSDB18-HQ, hold-out), their
checks, export preparation, augmentation, and the embedded synthetic generator.

Names are imported lazily (PEP 562), so `python -m demucs_lora.data.synth` does not import
torch, and nothing here imports torchaudio (nor demucs.wav/train/solver/repitch).
"""
import importlib

_EXPORTS = {
    "stems": ["MIXTURE", "Metadata", "StemDataset", "augment_batch", "build_augment",
              "build_metadata", "config_metadata", "dataset_root", "dataset_roots",
              "get_datasets", "train_segment"],
    "roots": ["Root", "split_tracks"],
    "prepare": ["prepare_dataset"],
    "synth": ["LAYOUTS", "ensure_synth", "generate_dataset", "synth_track"],
    "verify": ["Problem", "Report", "verify_config", "verify_dataset"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
