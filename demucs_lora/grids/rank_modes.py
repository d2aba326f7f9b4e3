"""Sweep rank modes at a matched budget, uniform ranks 4/8/16, and a full fine-tune.

`dora grid rank_modes` adapts one base on one dataset. Which base, data and resources
come from the environment so one grid file serves a laptop cluster and a real one:

    DEMUCS_LORA_GRID_ARGS="continue_from=htdemucs pretrained_repo=/models dset.wav=/data"
    (default: the shipped tiny base adapted to synthetic domain B, a few epochs)

Slurm resources are the config's `slurm.*` keys (override them in the same variable,
e.g. `slurm.partition=gpu slurm.gpus=1`).
"""
import os
import shlex

from demucs_lora.grids._explorers import RankModesExplorer

DEFAULT_ARGS = ("model=htdemucs_tiny continue_from=demucs_lora/assets/base_tiny_A.th "
                "dset.synth.domain=B epochs=4")


@RankModesExplorer
def explorer(launcher):
    args = shlex.split(os.environ.get("DEMUCS_LORA_GRID_ARGS", DEFAULT_ARGS))
    launcher.bind_(args)
    launcher.slurm_(**_slurm_from(args))
    launcher({"htdemucs.lora_rank": 0})  # full fine-tune reference
    launcher({"htdemucs.lora_rank": 8})  # uniform: the parameter budget the others match
    launcher({"htdemucs.lora_rank": 8, "htdemucs.lora_rank_mode": "heuristic",
              "htdemucs.lora_budget_match": True})
    launcher({"htdemucs.lora_rank": 8, "htdemucs.lora_rank_mode": "gradient"})
    for rank in (4, 16):
        launcher({"htdemucs.lora_rank": rank, "htdemucs.lora_rank_mode": "uniform"})


def _slurm_from(args):
    """`slurm.KEY=VALUE` overrides also set the launcher's Slurm resources."""
    out = {}
    for arg in args:
        if arg.startswith("slurm.") and "=" in arg:
            key, value = arg[len("slurm."):].split("=", 1)
            out[key] = None if value == "null" else (int(value) if value.isdigit() else value)
    return out
