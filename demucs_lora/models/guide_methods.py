"""The user guide's methods on a model, without changing its class.

Models returned by ``demucs_lora.get_model`` and ``load_lora_weights`` carry::

    model.load_lora_weights(path)      # an adapter (path or XP signature) on this model
    model.get_lora_state()             # {name: tensor} of the adapter (what files hold)
    model.quantize(bits=8, optimize_scales=True)   # the int8 package (adapter merged)
    model.lora_config                  # ranks, alpha, ... of its LoRA layers, or None
    model.config                       # the guide's spelling: the same object as lora_config

Why instance attributes and not a subclass: demucs serializes a model as its class plus
constructor arguments (``demucs.states.serialize_model`` stores ``model.__class__``), and
the stock loader rebuilds exactly that class. These are callables stored on the instance
(`ModelMethod`), so the class stays ``HTDemucs``: ``serialize_model``, the stock CLI,
``state_dict()`` and ``copy.deepcopy`` see a plain HTDemucs (a deep copy's methods are
bound to the copy); pickling a whole model keeps them (``__reduce__`` names the model and
the method, never a half-built bound method). ``lora_config`` is the
`lora.config.LoraLayout` the LoRA injector puts on the model (it reads like the adapter
header's layout keys: ``model.lora_config["ranks"]``); ``inject_lora``, rank adaptation
and ``remove_lora`` replace it, so it is always the model's own.
"""
from __future__ import annotations

import copy
import typing as tp

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn

METHODS = ("load_lora_weights", "get_lora_state", "quantize")


def load_lora_weights(model: "nn.Module", path, check_base: bool = True) -> "nn.Module":
    """Load the adapter pair at ``path`` strictly, injecting the LoRA layers first when
    the model has none (else swapping the tensors of same-layout layers).

    If the adapter was trained for other sources than the model's, the model's heads are
    remapped first (`models.source_remap`), so a new model object may be returned: always use
    the return value; it carries the guide's methods (`attach`)."""
    from demucs_lora.models.source_remap import load_adapter_any_sources
    return attach(load_adapter_any_sources(model, path, check_base=check_base))


def _load_lora_weights(model: "nn.Module", path, check_base: bool = True) -> "nn.Module":
    """Put the adapter ``path`` (``x``, ``x.safetensors``/``.json`` or an XP signature)
    on this model: injected the first time, tensors swapped after. Returns the model
    (a new object only when the adapter's sources differ: always use the result)."""
    from demucs_lora.model_files.resolve import resolve_adapter
    return load_lora_weights(model, resolve_adapter(path), check_base=check_base)


def _get_lora_state(model: "nn.Module") -> dict:
    """The adapter's tensors: LoRA factors plus whatever was trained in full."""
    from demucs_lora.lora.state import get_lora_state
    return get_lora_state(model)


def _quantize(model: "nn.Module", bits: int = 8, optimize_scales: bool = False,
              training_args: tp.Optional[dict] = None, inplace: tp.Any = None) -> dict:
    """Weight-only int8 package of this model, its adapter merged. **The returned package
    is what must be saved** (``torch.save(package, "model.th")``; ``demucs_lora.get_model
    (path)`` loads it): the model itself is left as it is, float32, so
    ``torch.save(model.state_dict())`` after this stores the float model. There is no
    ``inplace=`` (a model object cannot hold int8 weights and still run); its
    ``package["quantized"]["note"]`` says the same. ``optimize_scales``: per-channel scales
    of least reconstruction error instead of max-abs."""
    from demucs_lora.core.errors import ConfigError
    from demucs_lora.lora.inject import has_lora, remove_lora
    from demucs_lora.model_files.int8 import quantize
    if inplace is not None:
        raise ConfigError("model.quantize(inplace=...) is not offered: the model stays "
                          "float32; save the package it returns: package = "
                          "model.quantize(bits=8); torch.save(package, 'model.th')")
    plain = remove_lora(copy.deepcopy(model)) if has_lora(model) else model
    return quantize(plain, bits=bits, training_args=training_args,
                    optimize_scales=optimize_scales)


_IMPLEMENTATIONS: tp.Dict[str, tp.Callable] = {
    "load_lora_weights": _load_lora_weights,
    "get_lora_state": _get_lora_state,
    "quantize": _quantize,
}


class ModelMethod:
    """``model.NAME(...)``: calls the implementation with the model first."""

    __slots__ = ("model", "name")

    def __init__(self, model: "nn.Module", name: str):
        self.model, self.name = model, name

    def __call__(self, *args, **kwargs):
        return _IMPLEMENTATIONS[self.name](self.model, *args, **kwargs)

    def __reduce__(self):
        return (ModelMethod, (self.model, self.name))

    @property
    def __doc__(self):  # help(model.quantize) shows the implementation's docstring
        return _IMPLEMENTATIONS[self.name].__doc__

    def __repr__(self) -> str:
        return f"<demucs_lora method {self.name} of {type(self.model).__name__}>"


def attach(model: "nn.Module") -> "nn.Module":
    """Give ``model`` the guide's methods and ``lora_config`` (idempotent); returns it."""
    from demucs_lora.lora.inject import carried_layout
    for name in METHODS:
        object.__setattr__(model, name, ModelMethod(model, name))
    object.__setattr__(model, "lora_config", carried_layout(model))
    object.__setattr__(model, "config", carried_layout(model))   # the guide's spelling
    return model
