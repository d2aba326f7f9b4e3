"""Weight-only int8 quantization of demucs models into plain-tensor packages.

``quantize(model)`` returns a demucs-style package::

    {klass: Int8Package, args, kwargs, training_args: {}, state,
     quantized: {bits, scheme: 'per_channel_symmetric', scale_suffix: '::scale',
                 klass: HTDemucs, scale_method: 'max_abs' | 'mse', ...}}

Every floating parameter with >= 2 dims (conv, conv-transpose, linear, attention and
embedding weights) is stored as an int8 tensor ``q`` plus a float32 tensor
``state[name + '::scale']`` shaped to broadcast against it, one scale per output
channel: ``w ~= q * scale`` with ``scale = max|w| / (2^(bits-1) - 1)`` over the other
dims (axis 0 for Conv/Linear/attention/embedding weights, axis 1 for ConvTranspose,
whose weight is (in, out, ...)). ``optimize_scales=True`` picks, per channel, the scale
that minimises the reconstruction error ``sum (w - q * scale)^2`` instead: a search over
clipping ratios ``scale = c * max|w| / qmax`` (c from 0.3 to 1 by 0.1, then by 0.01 around
each channel's best; max-abs included, so it is never worse) refined by two least-squares
steps ``scale = <w, q> / <q, q>``. Biases, norms and layer scales stay float32. The
package holds only tensors and builtins (plus the demucs ``klass``), so it opens with
``torch.load(weights_only=True)`` and the allowlist of ``demucs_lora.model_files.safe_load``:
``safe_load.model_from_package`` (which ``model_files.packages.load_model_file`` calls) sees the
``quantized`` key, dequantizes and builds ``quantized["klass"]``. The stock loader (``python
-m demucs --repo DIR -n NAME``) calls ``klass(*args, **kwargs)`` first: ``klass`` is
`Int8Package`, which raises demucs' own ``ModelLoadingError`` "int8 file: load it with
demucs_lora.get_model", which the stock CLI prints as its one-line error (packages written
before kept ``klass: HTDemucs`` and still load here). Export without ``--quantize`` (or
``--half``) for the stock CLI.

Quantize a plain model: merge LoRA adapters first (the state must match what
``klass(*args, **kwargs)`` builds, which is checked).
"""
from __future__ import annotations

import inspect
import typing as tp

import torch
from torch import nn

from demucs_lora.core.errors import ConfigError, ModelLoadError

SCHEME = "per_channel_symmetric"
SCALE_SUFFIX = "::scale"


INT8_MESSAGE = ("int8 file: load it with demucs_lora.get_model(NAME, repo=DIR) (or "
                "`demucs-lora -n NAME --repo DIR`); the stock demucs loader cannot read "
                "weight-only int8 packages: export without --quantize (or with --half) for it")


def _stock_signature() -> inspect.Signature:
    """Every constructor argument of the demucs model classes, so that the stock loader's
    non-strict mode drops none of a package's kwargs (with a warning each) before failing."""
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs
    names = dict.fromkeys(n for klass in (HTDemucs, HDemucs, Demucs)
                          for n in inspect.signature(klass).parameters)
    return inspect.Signature(
        [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names])


class Int8Package:
    """The ``klass`` of an int8 package, for the stock demucs loader: it refuses to build.

    demucs_lora's loaders build ``package['quantized']['klass']`` instead."""

    def __init__(self, *args, **kwargs):
        from demucs.repo import ModelLoadingError  # what `python -m demucs` prints, alone
        raise ModelLoadingError(INT8_MESSAGE)


Int8Package.__signature__ = _stock_signature()


def _channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in ``module.weight``."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def quantize_tensor(weight: torch.Tensor, axis: int = 0, bits: int = 8,
                    optimize_scales: bool = False) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel quantization along ``axis``: returns (int8 q, float32 scale).

    ``optimize_scales``: the per-channel scale of least reconstruction error (module
    docstring) instead of max-abs."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float().cpu()
    other = [d for d in range(w.dim()) if d != axis]
    scale = w.abs().amax(dim=other, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if optimize_scales:
        scale = _mse_scale(w, scale, other, qmax)
    q = torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _error(w: torch.Tensor, scale: torch.Tensor, other: tp.List[int], qmax: int
           ) -> torch.Tensor:
    q = torch.round(w / scale).clamp(-qmax, qmax)
    return (w - q * scale).square().sum(dim=other, keepdim=True)


def _mse_scale(w: torch.Tensor, max_abs: torch.Tensor, other: tp.List[int], qmax: int,
               refine: int = 2) -> torch.Tensor:
    """Per-channel scale minimising ``sum (w - round(w / s) * s)^2``, starting at max-abs:
    clipping ratios 0.3..1 by 0.1, then by 0.01 around each channel's best, then
    least-squares steps (20 evaluations in all; max-abs is one, so never worse)."""
    best, best_err = max_abs, _error(w, max_abs, other, qmax)
    best_ratio = torch.ones_like(max_abs)

    def consider(candidate: torch.Tensor, ratio: tp.Optional[torch.Tensor] = None) -> None:
        nonlocal best, best_err, best_ratio
        candidate = torch.where(candidate > 0, candidate, max_abs)
        err = _error(w, candidate, other, qmax)
        better = err < best_err
        best, best_err = torch.where(better, candidate, best), torch.where(better, err, best_err)
        if ratio is not None:
            best_ratio = torch.where(better, ratio, best_ratio)

    for ratio in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        consider(max_abs * ratio, torch.full_like(max_abs, ratio))
    center = best_ratio.clone()
    for step in (-0.05, -0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04):
        ratio = (center + step).clamp(0.05, 1.0)
        consider(max_abs * ratio, ratio)
    for _ in range(refine):  # least squares on the scale for the current integers
        q = torch.round(w / best).clamp(-qmax, qmax)
        consider((w * q).sum(dim=other, keepdim=True)
                 / q.square().sum(dim=other, keepdim=True).clamp(min=1))
    return best


def _init_args(model: nn.Module) -> tp.Tuple[tuple, dict]:
    try:
        return model._init_args_kwargs  # type: ignore[attr-defined,return-value]
    except AttributeError:
        raise TypeError(f"{type(model).__name__} does not record its constructor arguments "
                        "(demucs.states.capture_init); it cannot be serialized") from None


def _check_plain(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The model's state keys must be those of a fresh ``klass(*args, **kwargs)``."""
    with torch.random.fork_rng(devices=[]):  # a CPU build (meta has a 1.6 s first-use cost)
        fresh = type(model)(*args, **kwargs)
    extra = sorted(set(model.state_dict()) - set(fresh.state_dict()))
    missing = sorted(set(fresh.state_dict()) - set(model.state_dict()))
    if extra or missing:
        raise ConfigError(
            f"model state does not match {type(model).__name__}(**kwargs): extra keys "
            f"{extra[:5]}, missing {missing[:5]}; merge LoRA adapters (and remove "
            "wrappers) before quantizing")


def quantize_state(model: nn.Module, bits: int = 8, optimize_scales: bool = False
                   ) -> tp.Tuple[tp.Dict[str, torch.Tensor], int]:
    """(quantized state dict, number of quantized tensors) of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    state: tp.Dict[str, torch.Tensor] = {}
    count = 0
    for name, value in model.state_dict().items():
        if name in params and value.is_floating_point() and value.dim() >= 2:
            owner = model.get_submodule(name.rpartition(".")[0])
            q, scale = quantize_tensor(value, _channel_axis(owner), bits, optimize_scales)
            state[name], state[name + SCALE_SUFFIX] = q, scale
            count += 1
        else:
            value = value.detach().cpu()
            state[name] = (value.float() if value.is_floating_point() else value).clone()
    return state, count


SAVE_NOTE = ("save this package (torch.save(package, 'NAME.th')); the model it came from "
             "is unchanged, float32")


def quantize(model: nn.Module, bits: int = 8,
             training_args: tp.Optional[tp.Dict[str, tp.Any]] = None,
             optimize_scales: bool = False) -> tp.Dict[str, tp.Any]:
    """Serialized, weight-quantized package of a demucs model (see module docstring):
    the package is what must be saved, the model is not changed (``SAVE_NOTE``)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"quantize bits={bits!r}: choose an integer from 2 to 8 "
                          "(values are stored as int8)")
    args, kwargs = _init_args(model)
    _check_plain(model, args, kwargs)
    state, count = quantize_state(model, bits, bool(optimize_scales))
    return {
        "klass": Int8Package,
        "args": args,
        "kwargs": kwargs,
        "state": state,
        "training_args": dict(training_args or {}),
        "quantized": {"bits": bits, "scheme": SCHEME, "scale_suffix": SCALE_SUFFIX,
                      "num_quantized": count, "klass": type(model),
                      "scale_method": "mse" if optimize_scales else "max_abs",
                      "note": SAVE_NOTE},
    }


def dequantize_state(state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """Float32 state dict from a quantized one (``q * scale`` for every scaled entry)."""
    out: tp.Dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is None:
            out[name] = value.float() if value.is_floating_point() else value
        elif value.dtype != torch.int8 or scale.dim() != value.dim():
            raise ModelLoadError(f"quantized entry {name}: expected int8 values and a "
                                 f"broadcastable scale, got {value.dtype} and shape "
                                 f"{tuple(scale.shape)}")
        else:
            out[name] = value.float() * scale.float()
    orphans = [n for n in state if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] not in state]
    if orphans:
        raise ModelLoadError(f"quantized state has scales without values: {orphans[:5]}")
    return out

