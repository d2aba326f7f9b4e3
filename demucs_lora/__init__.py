"""demucs-lora: LoRA adaptation of HTDemucs (demucs v4), with Hydra + Dora.

Public API (imported lazily, so ``import demucs_lora`` loads neither torch nor demucs)::

    from demucs_lora import get_model, load_lora_weights, apply_model
    model = get_model("NAME", repo="release_models")          # or an XP sig, or a .th path
    model = load_lora_weights(model, "outputs/xps/SIG/lora_best")   # unmerged adapter

- ``get_model(name_or_sig, repo=None, adapter=None, trust_remote_code=False)``
- ``load_lora_weights(model, path)``: inject + load an adapter (swaps tensors when the
  model already has LoRA layers of the same layout); always use the returned model
- ``inject_lora(model, LoraConfig(lora_rank=8))``: adapters on any HTDemucs, base frozen,
  for your own training loop (PEFT's ``get_peft_model`` shape; docs/api.md)
- ``get_lora_state(model)``, ``save_adapter(model, path, **header)``
- ``merge_lora``, ``unmerge_lora``, ``remove_lora`` (merge and drop the wrappers)
- ``quantize(model, bits=8)``: weight-only int8 package (``demucs_lora.model_files.int8``)
- ``apply_model``: ``demucs.apply.apply_model`` (normalize the mixture first, see api.py)
"""
import importlib

from demucs_lora.core.version import __version__  # noqa: F401 (public)

_EXPORTS = {
    "api": ["get_model"],
    "model_files.int8": ["quantize"],
    "models.guide_methods": ["load_lora_weights"],
    "lora.state": ["get_lora_state", "save_adapter"],
    "lora.config": ["LoraConfig"],
    "lora.adapt": ["inject_lora"],
    "lora.inject": ["merge_lora", "unmerge_lora", "remove_lora"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted([*_WHERE, "apply_model", "__version__"])


def __getattr__(name):
    if name == "apply_model":
        from demucs.apply import apply_model
        return apply_model
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
