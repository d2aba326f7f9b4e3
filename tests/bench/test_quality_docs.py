"""docs/quality.md holds the tables its JSON files give; the protocol's statistics; the
mid-size base's chunked recipe."""
import math
from pathlib import Path

import pytest

from benchmarks import quality_report, quality_stats as stats
from demucs_lora.commands import base_recipe

REPO = Path(__file__).resolve().parents[2]


def test_docs_tables_match_the_json():
    """Run `python -m benchmarks.quality_protocol --docs` after new results."""
    text = quality_report.DOCS.read_text()
    assert quality_report.render(text, quality_report.load()) == text
    for section in quality_report.SECTIONS:
        assert f"<!-- {section}:start -->" in text and f"<!-- {section}:end -->" in text


def test_mean_ci_and_welch_difference():
    out = stats.mean_ci([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["n"] == 3
    assert out["ci"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(stats.mean_ci([1.0])["ci"]) and stats.mean_ci([])["n"] == 0
    diff = stats.difference_ci([3.0, 3.2, 3.4], [1.0, 1.2, 1.4])
    assert diff["diff"] == pytest.approx(2.0) and diff["low"] > 0   # clearly apart
    noisy = stats.difference_ci([1.0, 3.0, 5.0], [0.0, 4.0, 2.0])
    assert noisy["low"] < 0 < noisy["high"]
    assert stats.t975(4.5) == stats.T975[4] and stats.t975(1000) == 1.96


def test_steps_to_target_and_curves():
    assert stats.steps_to([0.1, 0.5, 0.9], 0.5, 12) == 24
    assert stats.steps_to([0.1, 0.2], 0.5, 12) is None
    assert stats.mean_curve([[1, 2, 3], [3, 4]]) == [2, 3]


def test_base_recipe_chunks_and_plateau(tmp_path):
    asset = base_recipe.REPO_DIR / "demucs_lora" / "assets" / "x.th"
    first = base_recipe.chunk_args(["model=htdemucs_medium"], 0, asset)
    assert first == ["model=htdemucs_medium", f"epochs={base_recipe.CHUNK_EPOCHS}", "seed=0"]
    later = base_recipe.chunk_args(["model=htdemucs_medium"], 3, asset)
    assert "seed=3" in later and "continue_from=demucs_lora/assets/x.th" in later
    assert "test.initial=false" in later
    chunk = lambda v: {"best_valid_nsdr": v}  # noqa: E731
    assert not base_recipe.converged([chunk(1.0), chunk(2.0)])
    assert not base_recipe.converged([chunk(1.0), chunk(2.0), chunk(2.5)])
    assert base_recipe.converged([chunk(1.0), chunk(2.0), chunk(2.05), chunk(1.9)])


def test_medium_config_is_in_the_low_rank_regime():
    from demucs_lora.config.compose import compose
    from demucs_lora.lora.config import LoraConfig
    from demucs_lora.lora.ranks import allocate_ranks
    from demucs_lora.config.run_config import model_spec
    from demucs_lora.models.build import build_model
    model, _ = build_model(model_spec(compose(["model=htdemucs_medium"])))
    params = sum(p.numel() for p in model.parameters())
    share = allocate_ranks(model, LoraConfig(lora_rank=8)).trainable_params() / params
    assert params >= 4_000_000 and share <= 0.07


def test_protocol_refuses_to_resume_on_another_base(tmp_path):
    import json
    from benchmarks import quality_protocol
    results = tmp_path / "quality_protocol.json"
    assert quality_protocol.check_same_base(results, "a" * 64) is None
    results.write_text(json.dumps({"settings": {"base_sha256": "a" * 64}}))
    assert quality_protocol.check_same_base(results, "a" * 64) is None
    problem = quality_protocol.check_same_base(results, "b" * 64)
    assert "another version of the base" in problem and str(results) in problem


def test_partial_protocol_lists_its_finished_runs():
    """Between sittings (no summary yet) the docs give each method's sweep, its best lr and
    the seeds run there (mean ± CI), then every finished run, sorted."""
    from benchmarks.quality_report import protocol_lines
    run = {"task": "five_stem", "method": "full", "params": 4085274, "train_seconds": 256.6}
    data = {"runs": {
        "b": {**run, "lr": "1e-3", "seed": 0, "valid_gain": 7.05, "test_gain": 7.0},
        "a": {**run, "lr": "3e-4", "seed": 0, "valid_gain": 5.24, "test_gain": 5.2},
        "c": {**run, "lr": "3e-3", "seed": 0, "valid_gain": 6.8, "test_gain": 6.8},
        "d": {**run, "lr": "1e-3", "seed": 1, "valid_gain": 6.9, "test_gain": 8.0}}}
    lines = protocol_lines(data)
    assert "4 runs finished" in lines[0]
    rows = [line for line in lines if line.startswith("| five_stem")]
    assert rows[0] == ("| five_stem | full | 3e-4: +5.24, 1e-3: +7.05, 3e-3: +6.80 | 1e-3 | "
                       "+7.50 ± 6.35 (2 seeds) |")
    assert rows[1:3] == ["| five_stem | full | 3e-4 | 0 | 4,085,274 | +5.24 | +5.20 | 257 |",
                         "| five_stem | full | 1e-3 | 0 | 4,085,274 | +7.05 | +7.00 | 257 |"]
    del data["runs"]["c"]
    assert "1e-3 (edge: sweep goes on)" in protocol_lines(data)[4]
    assert "Not measured yet" in protocol_lines({"runs": {}})[0]


def test_a_method_earns_its_place_only_beyond_noise_on_every_task():
    from benchmarks.quality_protocol import earned
    from benchmarks.quality_report import recommendation_lines

    def task(gora, gradient):
        return {"uniform": {"test_gains": [5.0, 5.1, 4.9], "label": "uniform r=8"},
                "gora": {"test_gains": gora, "label": "GoRA"},
                "gradient": {"test_gains": gradient, "label": "gradient"}}
    clear, noisy = [5.6, 5.7, 5.5], [5.0, 6.4, 4.4]
    assert earned({"a": task(clear, noisy), "b": task(clear, clear)}) == ["gora"]
    assert earned({"a": task(clear, clear), "b": task([5.2, 5.3, 5.1], clear)}) == ["gradient"]
    assert earned({"a": task(noisy, noisy)}) == []
    tasks = {"a": task(clear, clear)}
    assert "GoRA" in recommendation_lines({"tasks": tasks, "earned": ["gora"]})[1]
    assert "uniform is the recommendation" in recommendation_lines(
        {"tasks": tasks, "earned": []})[1]
    assert recommendation_lines({"tasks": tasks}) == []
