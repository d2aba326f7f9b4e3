"""What a run writes to disk, atomically: resume state, the best model, adapters.

`checkpoint.th` holds only what training changes (trainable tensors, optimizer, scheduler,
EMA, RNG, epoch, history) plus a fingerprint of the frozen base; the base itself is
rebuilt from the config on resume. It holds tensors and plain Python values only (the RNG
states too), so it is read back with ``torch.load(weights_only=True)``: an XP folder is
untrusted input, and a checkpoint.th carrying anything else is refused before any of it
runs. `best.th` is a plain demucs package (adapters merged) that the stock CLI loads.
"""
from __future__ import annotations

import copy
import pickle
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.states import serialize_model
from demucs_lora.models.spec import BaseSpec
from torch import nn

from demucs_lora.training.epoch import partial_problem
from demucs_lora.core.errors import CheckpointError
from demucs_lora.core.files import atomic_torch_save
from demucs_lora.lora.inject import has_lora, remove_lora
from demucs_lora.lora.state import base_fingerprint, fingerprints_match, save_adapter
from demucs_lora.models.trainable import swapped_trainables

CHECKPOINT_FORMAT = "demucs-lora-checkpoint/2"
RESUME_KEYS = ("format", "model", "optimizer", "scheduler", "scaler", "ema", "rng", "epoch",
               "history", "best_state", "best_nsdr", "base", "partial", "rank_adaptation")


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG as tensors and plain values (what weights_only=True can read back)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(py_state,
                                                                      dtype=torch.int64),
                       "gauss": py_gauss},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`; ValueError/TypeError/KeyError on a malformed state."""
    np_state, py = state["numpy"], state["python"]
    keys = np_state["keys"]
    if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (624,):
        raise ValueError("numpy RNG state: expected 624 keys")
    if not isinstance(py["state"], torch.Tensor) or py["state"].numel() != 625:
        raise ValueError("python RNG state: expected 625 words")
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["gauss"])))
    gauss = py["gauss"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()),
                     None if gauss is None else float(gauss)))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- base
def base_record(model: nn.Module, base: BaseSpec) -> dict:
    """What the XP's frozen base is: the config that named it and a fingerprint of its
    loaded tensors (independent of how it was found). No fingerprint for a full fine-tune:
    every weight is then in the checkpoint, and the base does not matter on resume."""
    model = getattr(model, "module", model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    fingerprint = base_fingerprint(model, exclude=trained) if has_lora(model) else None
    return {"fingerprint": fingerprint,
            "continue_from": _text(base.continue_from),
            "pretrained_repo": _text(base.pretrained_repo)}


def _text(value) -> tp.Optional[str]:
    return None if value is None else str(value)


def _describe(record: tp.Mapping) -> str:
    return (f"continue_from={record.get('continue_from')} "
            f"pretrained_repo={record.get('pretrained_repo')}")


def restart_hint(path: Path) -> str:
    return (f"to start this XP over, run the same command with `dora run --clear ...`, "
            f"or delete {path}")


def check_same_base(saved: tp.Optional[tp.Mapping], current: tp.Mapping, path: Path,
                    what: str = "checkpoint") -> None:
    """CheckpointError when the XP was started on another base than this run loaded."""
    if not saved or saved.get("fingerprint") is None or current.get("fingerprint") is None:
        return
    if fingerprints_match(saved["fingerprint"], current["fingerprint"]):
        return
    raise CheckpointError(
        f"{path}: this XP was started on the base {_describe(saved)}, but this run loaded "
        f"{_describe(current)}, whose weights differ (base fingerprint): resuming would "
        f"continue the {what}'s adapters on another model. Fix: run with the XP's base "
        f"(pretrained_repo/continue_from as above), or {restart_hint(path)}")


# ---------------------------------------------------------------------------- load
def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def load_resume_state(path: Path) -> tp.Optional[dict]:
    """checkpoint.th read with weights_only=True and checked; None if there is none.

    Raises CheckpointError (one line: the file, what is wrong, how to start over) for an
    empty, truncated, hostile, foreign or other-version file. Nothing in it is executed."""
    path = Path(path)
    if not path.exists():
        return None
    hint = restart_hint(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes: a write was cut short): {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            found = []
        raise CheckpointError(
            f"refusing to resume from {path}: it holds objects that are not tensors or plain "
            f"values ({', '.join(found) or 'unknown globals'}), so it was edited or written "
            f"by another program or an older demucs-lora; nothing in it was run. {hint}"
        ) from None
    except Exception as exc:  # truncated zips, junk bytes: many exception types
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                              f"{_short(exc)}): {hint}") from None
    problem = resume_state_problem(state)
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint of this XP ({problem}): {hint}")
    return state


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _fingerprint_ok(value) -> bool:
    if value is None:
        return True
    return (isinstance(value, dict) and isinstance(value.get("shapes_sha256"), str)
            and isinstance(value.get("stats"), list)
            and all(isinstance(s, (list, tuple)) and len(s) == 2
                    and all(isinstance(x, (int, float)) for x in s) for s in value["stats"]))


def resume_state_problem(state) -> tp.Optional[str]:
    """What is wrong with a loaded checkpoint.th, or None when it has the right shape."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a checkpoint dict"
    if state.get("format") != CHECKPOINT_FORMAT:
        return (f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}: another "
                "program or demucs-lora version wrote it")
    unknown = sorted(map(str, set(state) - set(RESUME_KEYS)))
    missing = sorted(set(RESUME_KEYS) - set(state))
    if unknown or missing:
        return f"unexpected keys {unknown[:5]}, missing keys {missing[:5]}"
    checks = {
        "model": _tensor_dict(state["model"]),
        "best_state": state["best_state"] is None or _tensor_dict(state["best_state"]),
        "ema": state["ema"] is None or (isinstance(state["ema"], dict)
                                        and _tensor_dict(state["ema"].get("shadow"))),
        "optimizer": isinstance(state["optimizer"], dict)
        and {"state", "param_groups"} <= set(state["optimizer"]),
        "scheduler": isinstance(state["scheduler"], dict),
        "scaler": isinstance(state["scaler"], dict),
        "rng": isinstance(state["rng"], dict)
        and {"torch", "numpy", "python"} <= set(state["rng"]),
        "epoch": isinstance(state["epoch"], int) and not isinstance(state["epoch"], bool)
        and state["epoch"] >= 0,
        "history": isinstance(state["history"], list)
        and all(isinstance(h, dict) for h in state["history"])
        and len(state["history"]) == state["epoch"],
        "best_nsdr": isinstance(state["best_nsdr"], (int, float)),
        "base": isinstance(state["base"], dict)
        and _fingerprint_ok(state["base"].get("fingerprint")),
        "partial": partial_problem(state["partial"], state["epoch"]) is None,
        "rank_adaptation": state["rank_adaptation"] is None or (
            isinstance(state["rank_adaptation"], dict)
            and isinstance(state["rank_adaptation"].get("ranks"), dict)),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"malformed entries {bad}" if bad else None


# ---------------------------------------------------------------------------- outputs
def plain_model(model: nn.Module, state: tp.Optional[tp.Mapping] = None) -> nn.Module:
    """A deep copy of `model` with `state` (trainable tensors) loaded and LoRA merged away."""
    model = getattr(model, "module", model)
    with swapped_trainables(model, state):
        plain = copy.deepcopy(model).cpu().float()
    if has_lora(plain):
        remove_lora(plain)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


def save_best_model(model: nn.Module, state, training_args: tp.Any, path: Path,
                    half: bool = False) -> None:
    """demucs' own serialized format (klass, args, kwargs, state, training_args: the run's
    composed config, stored as demucs stores it); a bag is written as demucs lays bags
    out: ``best.yaml`` + ``best_mK.th`` (``bag.write_bag``)."""
    plain = plain_model(model, state)
    if isinstance(plain, BagOfModels):
        from demucs_lora.models.bag import write_bag
        write_bag(plain, path.parent, path.stem, training_args, half=half)
        return
    package = serialize_model(plain, training_args, half=half)
    atomic_torch_save(package, path)


def save_adapter_with_state(model: nn.Module, state, path: Path, **header) -> None:
    """Write the adapter of `model` as it would be with `state` loaded."""
    model = getattr(model, "module", model)
    if not has_lora(model):
        return
    with swapped_trainables(model, state):
        save_adapter(model, path, **header)
