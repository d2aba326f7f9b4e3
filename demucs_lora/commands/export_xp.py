"""What every export format starts from: the XP's plain merged model (``load_xp_model``)
and the one error for a target that exists already (``OutputExists``)."""
from __future__ import annotations

import typing as tp
from pathlib import Path

from demucs_lora.core.errors import DemucsLoRAError, ModelLoadError

if tp.TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig
    from torch import nn


class OutputExists(DemucsLoRAError, FileExistsError):
    """An export target exists already (names the file; --force overwrites)."""


def load_xp_model(folder: Path, which: str = "best", trust_remote_code: bool = False,
                  root: tp.Optional[Path] = None) -> tp.Tuple["nn.Module", "DictConfig"]:
    """(plain merged HTDemucs, config) of an XP: best.th, or base + lora_last merged."""
    from demucs_lora.config.compose import load_xp_config
    from demucs_lora.core.finite import check_finite_model
    from demucs_lora.lora.inject import remove_lora
    from demucs_lora.models.load import load_model
    cfg = load_xp_config(folder / "config.yaml")
    if which == "best":
        best = folder / "best.th"
        if not best.is_file() and not (folder / "best.yaml").is_file():
            raise ModelLoadError(f"XP {folder} has no best.th yet (no epoch finished?)")
        return load_model(folder, trust_remote_code=trust_remote_code), cfg
    if cfg.get("continue_from") is None:
        raise ModelLoadError(f"XP {folder} trained from a random init (continue_from=null): "
                             "its base cannot be rebuilt, export --adapter best")
    model = load_model(cfg.continue_from, cfg.get("pretrained_repo"), folder / "lora_last",
                       trust_remote_code, root, cfg.get("bag_member"))
    return check_finite_model(remove_lora(model).eval(), f"{folder} (base + lora_last)"), cfg
