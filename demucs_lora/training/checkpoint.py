"""What a run writes to disk, atomically: resume state, the best model, adapters.

`checkpoint.th` holds only what training changes (trainable tensors, optimizer, scheduler,
EMA, RNG, epoch, history) plus a fingerprint of the frozen base; the base itself is
rebuilt from the config on resume. It holds tensors and plain Python values only (the RNG
states too), so it is read back with ``torch.load(weights_only=True)``: an XP folder is
untrusted input, and a checkpoint.th carrying anything else is refused before any of it
runs. Which entries it holds is the Solver's `StateRegistry`; what each entry must look
like is below (its ``check``). `best.th` is a plain demucs package (adapters merged) that
the stock CLI loads.
"""
from __future__ import annotations

import copy
import json
import logging
import pickle
import typing as tp
from pathlib import Path

import torch
from demucs.apply import BagOfModels
from demucs.states import serialize_model
from demucs_lora.models.spec import BaseSpec
from torch import nn

from demucs_lora.training.epoch import partial_problem
from demucs_lora.training.state_registry import StateRegistry
from demucs_lora.core.errors import CheckpointError
from demucs_lora.core.files import atomic_torch_save
from demucs_lora.lora.inject import has_lora, remove_lora
from demucs_lora.lora.state import base_fingerprint, fingerprints_match, save_adapter
from demucs_lora.models.trainable import swapped_trainables

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "demucs-lora-checkpoint/2"  # the Solver's StateRegistry writes it


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


def load_resume_state(path: Path, problem: tp.Callable[[tp.Any], tp.Optional[str]]
                      ) -> tp.Optional[dict]:
    """checkpoint.th read with weights_only=True and checked by `problem` (the Solver's
    `StateRegistry.problem`: what is wrong with it, or None); None if there is none.

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
    wrong = problem(state)
    if wrong:
        raise CheckpointError(f"{path} is not a checkpoint of this XP ({wrong}): {hint}")
    return state


def restore_checkpoint(path: Path, registry: StateRegistry) -> bool:
    """Load every part of `registry` from checkpoint.th (read with weights_only=True and
    checked by the registry first); False when there is none. CheckpointError, one line
    with the fix, when it cannot be used."""
    state = load_resume_state(path, registry.problem)
    if state is None:
        return False
    try:
        registry.restore(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{path} does not fit this run's model or optimizer ({str(exc)[:300]}): was "
            f"it copied from another XP or config? {restart_hint(path)}") from None
    return True


# ------------------------------------------------------------- entry checks
# What each checkpoint.th entry must look like: the ``check`` of its stateful part
# (`state_registry.StateRegistry`), called with the entry and the whole loaded dict.
def tensor_dict(value, state=None) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def optional_tensor_dict(value, state=None) -> bool:
    return value is None or tensor_dict(value)


def is_dict(value, state=None) -> bool:
    return isinstance(value, dict)


def optimizer_ok(value, state=None) -> bool:
    return isinstance(value, dict) and {"state", "param_groups"} <= set(value)


def ema_ok(value, state=None) -> bool:
    return value is None or (isinstance(value, dict) and tensor_dict(value.get("shadow")))


def rng_ok(value, state=None) -> bool:
    return isinstance(value, dict) and {"torch", "numpy", "python"} <= set(value)


def epoch_ok(value, state=None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def history_ok(value, state) -> bool:
    """A list of per-epoch dicts, one per finished epoch."""
    return (isinstance(value, list) and all(isinstance(h, dict) for h in value)
            and len(value) == state["epoch"])


def number_ok(value, state=None) -> bool:
    return isinstance(value, (int, float))


def base_ok(value, state=None) -> bool:
    return isinstance(value, dict) and _fingerprint_ok(value.get("fingerprint"))


def _fingerprint_ok(value) -> bool:
    if value is None:
        return True
    return (isinstance(value, dict) and isinstance(value.get("shapes_sha256"), str)
            and isinstance(value.get("stats"), list)
            and all(isinstance(s, (list, tuple)) and len(s) == 2
                    and all(isinstance(x, (int, float)) for x in s) for s in value["stats"]))


def partial_ok(value, state) -> bool:
    """A stopped epoch's progress (or None), for the epoch after the finished ones."""
    return partial_problem(value, state["epoch"]) is None


def rank_adaptation_ok(value, state=None) -> bool:
    return value is None or (isinstance(value, dict) and isinstance(value.get("ranks"), dict))


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


# ---------------------------------------------------------------------------- XP folder
def forget_other_base(folder: Path, base: tp.Mapping) -> None:
    """No checkpoint yet, but an earlier start of this XP (lora_init) was on another
    base: nothing was trained, so start over, dropping its initial validation."""
    header = folder / "lora_init.json"
    try:
        saved = json.loads(header.read_text()).get("base_fingerprint")
        other = not fingerprints_match(saved, base["fingerprint"])
    except Exception:  # no, unreadable or foreign header: it is rewritten by the run
        return
    if other:
        logger.warning("%s was made on another base than this run's (%s): no epoch was "
                       "finished, starting over on this base", header, base["continue_from"])
        (folder / "validation" / "epoch_000.json").unlink(missing_ok=True)

