"""What `dora grid NAME` prints per XP: method, rank, trainable params, metrics."""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import treetable as tt
from dora import Explorer

from demucs_lora.core.sources import DEFAULT_SOURCES
from demucs_lora.grids.methods import describe

UNREADABLE = "unreadable"


def _trainable(folder: Path) -> tp.Union[int, str, None]:
    """Trainable LoRA parameters from the XP's ranks.json; None when there is none yet,
    UNREADABLE when it is torn or edited (that row says so, the table still prints)."""
    ranks = folder / "ranks.json"
    if not ranks.exists():
        return None
    try:
        total = sum(row["trainable"] for row in json.loads(ranks.read_text())["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return UNREADABLE
    return total if isinstance(total, int) else UNREADABLE


class RankModesExplorer(Explorer):
    """Columns: method (`methods.describe`), rank, trainable LoRA params; train epoch/loss;
    valid nSDR per source."""

    sources: tp.Sequence[str] = DEFAULT_SOURCES

    def get_grid_meta(self):
        return [tt.leaf("index", align=">"), tt.leaf("name"), tt.leaf("state"),
                tt.leaf("sig", align=">")]

    def get_grid_metrics(self):
        return [
            tt.group("lora", [tt.leaf("method"), tt.leaf("rank", align=">"),
                              tt.leaf("params", align=">")]),
            tt.group("train", [tt.leaf("epoch"), tt.leaf("loss", ".4f")], align=">"),
            tt.group("valid", [tt.leaf(name, ".2f") for name in self.sources]
                     + [tt.leaf("nsdr", ".2f"), tt.leaf("best", ".2f")], align=">"),
        ]

    def process_sheep(self, sheep, history: tp.List[dict]) -> dict:
        cfg = sheep.xp.cfg
        params = _trainable(Path(sheep.xp.folder))
        out = {"lora": {"method": describe(cfg), "rank": cfg.htdemucs.lora_rank,
                        "params": params if params is not None else "-"}}
        if not history:
            return out
        try:
            return {**out, **self._metrics(history)}
        except (AttributeError, KeyError, TypeError, ValueError):  # an edited history
            return {"lora": {**out["lora"], "params": UNREADABLE}}

    def _metrics(self, history: tp.List[dict]) -> dict:
        out: dict = {}
        last = history[-1]
        out["train"] = {"epoch": len(history), "loss": last.get("train_loss")}
        valid = {name: last.get(f"valid_nsdr_{name}") for name in self.sources}
        valid["nsdr"] = last.get("valid_nsdr")
        valid["best"] = max((h.get("valid_nsdr", float("-inf")) for h in history),
                            default=None)
        out["valid"] = {k: v for k, v in valid.items() if v is not None}
        return out

    def process_history(self, history):  # pragma: no cover - process_sheep wins
        return {}
