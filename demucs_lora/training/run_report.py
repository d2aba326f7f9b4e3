"""What a run reports after each epoch: one log line with every metric, the numeric
metrics as tensorboard scalars (``train/loss``, ``valid/nsdr``, ...) and
``validation/epoch_NNN.json``; epoch_000.json is the initial validation, read back on
resume so that the base is not validated twice."""
from __future__ import annotations

import json
import logging
import typing as tp
from pathlib import Path

from demucs_lora.core.files import atomic_write_text


class RunReport:
    """The reports of the XP in `folder`. Only the master writes (`master`: tensorboard,
    the JSON files); logs through `log`, the Solver's logger."""

    def __init__(self, folder: Path, log: logging.Logger, master: bool):
        self.folder, self.log = folder, log
        self.writer = None
        if master:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(folder / "tensorboard"))

    def _json(self, epoch: int) -> Path:
        return self.folder / "validation" / f"epoch_{epoch + 1:03d}.json"

    def epoch(self, epoch: int, epochs: int, metrics: tp.Mapping[str, tp.Any],
              is_best: tp.Optional[bool] = None) -> None:
        """`epoch` counts from 0 (-1: the initial validation, before any step); the JSON
        file also says whether the epoch is the best so far (`is_best`, when given)."""
        if self.writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
            self.writer.flush()
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        self.log.info("Epoch %d/%d: %s", epoch + 1, epochs, text)
        saved = dict(metrics) if is_best is None else dict(metrics, is_best=is_best)
        atomic_write_text(self._json(epoch), json.dumps(saved, indent=2))

    def saved_initial(self) -> tp.Optional[dict]:
        """The base's nSDR an earlier start of this XP wrote (epoch_000.json), or None:
        absent, or torn or foreign (a disk that filled up), to be computed again."""
        path = self._json(-1)
        try:
            metrics = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            metrics = None
        if isinstance(metrics, dict) and all(isinstance(k, str) and k.startswith(
                "valid_initial_") for k in metrics) and metrics:
            return metrics
        if path.exists():
            self.log.warning("%s is unreadable (cut short?): validating the base again", path)
        return None

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
