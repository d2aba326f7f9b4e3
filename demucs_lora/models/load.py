"""The one way a model is loaded by name or file: training's base, ``get_model``, export,
the demo and the benchmarks all call `load_model`.

Why one entry: a name that works in one place works in all of them, and every model
passes the same gates in the same order: ``model_files.resolve`` finds the files (a path, an XP
signature, a name in ``repo``, the HF / torch hub caches), ``model_files.packages`` builds each one
strictly through the allowlisted unpickler (``trust_remote_code`` widens it), each member
must be an HTDemucs, NaN/inf weights are refused (core.finite's policy: nothing non-finite
is trained on or served), and an adapter, when given, must fit (`put_adapter`: the one
place an ``AdapterMismatch`` gets the context of where the adapter was going).
"""
from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

from demucs.htdemucs import HTDemucs
from torch import nn

from demucs_lora.core.errors import AdapterMismatch, ConfigError, ModelLoadError

logger = logging.getLogger(__name__)
PathLike = tp.Union[str, Path]


def load_model(name: PathLike, repo: tp.Optional[PathLike] = None,
               adapter: tp.Optional[PathLike] = None, trust_remote_code: bool = False,
               root: tp.Optional[PathLike] = None, bag_member: tp.Optional[int] = None
               ) -> nn.Module:
    """The model ``name`` names (``model_files.resolve`` has the lookup order), in eval mode.

    One model (or a bag of one) gives an HTDemucs; a bag of several a ``bag.TrainableBag``
    (a ``demucs.apply.BagOfModels``) of HTDemucs, or its member ``bag_member`` alone.
    ``adapter`` (a ``.safetensors`` + ``.json`` pair or an XP signature for its
    ``lora_best``) is loaded unmerged on top. ModelLoadError, ConfigError (bag_member) or
    AdapterMismatch, each naming the file."""
    from demucs_lora.core.finite import check_finite_model
    from demucs_lora.model_files.resolve import find_model, load_found, xp_folder
    found = find_model(str(name), repo, root)
    loaded = load_found(found, trust_remote_code)
    _log_base_files(str(name), found)
    members = [_check_htdemucs(m, str(f)) for m, f in zip(loaded.members, found.files)]
    if bag_member is not None:
        if not 0 <= bag_member < len(members):
            raise ConfigError(f"bag_member={bag_member}: {name} has {len(members)} "
                              f"member(s) (valid: 0..{len(members) - 1})")
        members = [members[bag_member]]
    if len(members) == 1:
        if loaded.segment is not None:
            members[0].segment = loaded.segment
        model = members[0]
    else:
        from demucs_lora.models.bag import TrainableBag  # a BagOfModels that can be called
        model = TrainableBag(members, loaded.weights, loaded.segment)
    model = check_finite_model(model, str(name)).eval()
    if adapter is None:
        return model
    hint = ""
    if xp_folder(str(name), root) is not None:
        hint = (f"; {name} is an XP whose best.th has its adapter merged in: load adapters "
                "on its base (continue_from in its config.yaml)")
    return put_adapter(model, adapter, root, suffix=f" [base: {name}]{hint}").eval()


def put_adapter(model: nn.Module, adapter: PathLike, root: tp.Optional[PathLike] = None,
                prefix: str = "", suffix: str = "") -> nn.Module:
    """``adapter`` (resolved: a path or an XP signature) loaded onto ``model`` with
    ``load_lora_weights``; an AdapterMismatch is raised again as ``prefix + its message +
    suffix`` (what the adapter was for and what to do), without the chained traceback."""
    from demucs_lora.model_files.resolve import resolve_adapter
    from demucs_lora.models.guide_methods import load_lora_weights
    path = resolve_adapter(adapter, root)
    try:
        return load_lora_weights(model, path)
    except AdapterMismatch as exc:
        raise AdapterMismatch(f"{prefix}{exc}{suffix}") from None


def _check_htdemucs(model: nn.Module, source: str) -> HTDemucs:
    if not isinstance(model, HTDemucs):
        raise ModelLoadError(
            f"{source} holds a {type(model).__module__}.{type(model).__name__}, not an "
            "HTDemucs: demucs-lora adapts HTDemucs models (demucs v4: htdemucs, htdemucs_6s, "
            "htdemucs_ft) only; HDemucs (v3, e.g. hdemucs_mmi) and Demucs (v2) are not "
            "supported")
    return model


def _log_base_files(name: str, found) -> None:
    """Which files the model came from, with their sha256 (train.log: the base a run
    adapted stays known after the cache or repo changes)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    from demucs_lora.core.files import file_sha256
    for path in found.files:
        logger.info("base %s: %s from %s (sha256 %s)", name, path, found.where,
                    file_sha256(path))
