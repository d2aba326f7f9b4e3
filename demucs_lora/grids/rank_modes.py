"""Sweep the adaptation methods at a matched budget, uniform ranks 4/8/16, and a full
fine-tune. The methods (GRID_METHODS) are named in `grids.methods`, the table the quality
protocol measures them with (docs/quality.md).

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
from demucs_lora.grids.methods import method

# full + uniform + what the quality protocol found beating uniform (nothing: its results
# JSON's `earned`), plus heuristic and gradient, the sweep the user guide promises.
GRID_METHODS = ("full", "uniform", "heuristic", "gradient")
DEFAULT_ARGS = ("model=htdemucs_tiny continue_from=demucs_lora/assets/base_tiny_A.th "
                "dset.synth.domain=B epochs=4")


@RankModesExplorer
def explorer(launcher):
    args = shlex.split(os.environ.get("DEMUCS_LORA_GRID_ARGS", DEFAULT_ARGS))
    launcher.bind_(args)
    launcher.slurm_(**_slurm_from(args))
    for key in GRID_METHODS:   # uniform r=8: the parameter budget the others match
        launcher(list(method(key).overrides))
    for rank in (4, 16):
        launcher(list(method("uniform", rank).overrides))


def _slurm_from(args):
    """`slurm.KEY=VALUE` overrides also set the launcher's Slurm resources."""
    out = {}
    for arg in args:
        if arg.startswith("slurm.") and "=" in arg:
            key, value = arg[len("slurm."):].split("=", 1)
            out[key] = None if value == "null" else (int(value) if value.isdigit() else value)
    return out
