"""`dora grid`: a torn ranks.json or history in one XP shows that row as unreadable and
keeps the table; no Slurm on the machine is one line naming tools/slurm_local.sh and
--dry_run, not submitit's traceback."""
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from demucs_lora.grids._explorers import UNREADABLE, RankModesExplorer


@functools.lru_cache()
def _cfg(rank):
    from demucs_lora.config.compose import compose
    return compose(["model=htdemucs_tiny", f"htdemucs.lora_rank={rank}"])


def _sheep(folder, rank=8):
    return SimpleNamespace(xp=SimpleNamespace(cfg=_cfg(rank), folder=folder))


@pytest.mark.parametrize("text", ['{"layers": [{"trainable": 4', "[1, 2]",
                                  '{"layers": [{"trainable": "x"}]}', ""])
def test_torn_ranks_json_is_one_unreadable_row(tmp_path, text):
    explorer = RankModesExplorer(lambda launcher: None)
    (tmp_path / "ranks.json").write_text(text)
    history = [{"train_loss": 0.5, "valid_nsdr": 1.0}]
    row = explorer.process_sheep(_sheep(tmp_path), history)
    assert row["lora"]["params"] == UNREADABLE and row["train"]["loss"] == 0.5
    good = tmp_path / "good"
    good.mkdir()
    (good / "ranks.json").write_text(json.dumps({"layers": [{"trainable": 4},
                                                            {"trainable": 6}]}))
    assert explorer.process_sheep(_sheep(good), history)["lora"]["params"] == 10
    assert explorer.process_sheep(_sheep(good), [["not", "a dict"]])["lora"]["params"] == \
        UNREADABLE


def test_no_slurm_is_one_line():
    from demucs_lora.training.dora_cli import no_slurm_error
    error = no_slurm_error(RuntimeError('Could not detect "srun", are you indeed on a slurm '
                                        'cluster?'))
    assert "tools/slurm_local.sh start" in str(error) and "--dry_run" in str(error)
    assert no_slurm_error(RuntimeError("other")) is None


@pytest.mark.slow
def test_dora_grid_without_slurm(tmp_path):
    from integration.dora_helpers import dora
    proc = dora(tmp_path, "grid", "rank_modes", timeout=300, check=False, extra_env={
        "PATH": str(Path(sys.executable).parent),   # no srun on this PATH
        "DEMUCS_LORA_GRID_ARGS": "model=htdemucs_tiny epochs=1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tools/slurm_local.sh" in errors[0]
    assert "Traceback" not in proc.stderr
