"""The method table the quality protocol and `dora grid rank_modes` share, and the grid's
`method` column: every method composes, and no two are labeled alike."""
import pytest

from demucs_lora.config.compose import compose
from demucs_lora.grids import methods, rank_modes


def _cfg(overrides):
    return compose(["model=htdemucs_tiny", *overrides])


def test_every_method_composes_and_is_labeled_apart():
    labels = {}
    for key in methods.METHODS:
        m = methods.method(key, 8)
        labels[key] = methods.describe(_cfg(m.overrides))
    assert labels["full"] == "full FT" and labels["uniform"] == "uniform r=8"
    assert labels["gora"] == "gradient r=8, init gradient"
    assert labels["lora_plus"] == "uniform r=8, LoRA+ 16"
    assert labels["adaptive"] == "gradient r=8, rank adaptation every 2"
    assert len(set(labels.values())) == len(labels), labels
    assert methods.method("uniform", 4).overrides == ("htdemucs.lora_rank=4",)
    with pytest.raises(KeyError, match="unknown method 'magic'"):
        methods.method("magic")


class _Launcher:
    def __init__(self):
        self.calls = []

    def bind_(self, args):
        self.bound = list(args)

    def slurm_(self, **kwargs):
        self.slurm = kwargs

    def __call__(self, overrides):
        self.calls.append(list(overrides))


def test_grid_launches_its_methods_with_the_protocols_overrides(monkeypatch):
    monkeypatch.setenv("DEMUCS_LORA_GRID_ARGS", "model=htdemucs_tiny slurm.gpus=2")
    launcher = _Launcher()
    rank_modes.explorer(launcher)
    expected = [list(methods.method(k).overrides) for k in rank_modes.GRID_METHODS]
    assert launcher.calls[:len(expected)] == expected
    assert launcher.calls[len(expected):] == [["htdemucs.lora_rank=4"], ["htdemucs.lora_rank=16"]]
    assert launcher.slurm == {"gpus": 2}
    described = [methods.describe(_cfg(c)) for c in launcher.calls]
    assert len(set(described)) == len(described), described


def test_grid_sweeps_every_method_that_earned_its_place():
    """What the quality protocol found (benchmarks/results/quality_protocol.json): the
    grid launches full FT, uniform and every method that beat uniform on every task."""
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / \
        "quality_protocol.json"
    earned = json.loads(results.read_text()).get("earned", [])
    assert {"full", "uniform", *earned} <= set(rank_modes.GRID_METHODS)
    assert set(rank_modes.GRID_METHODS) <= set(methods.METHODS)
