"""`make base-medium`'s chunked pre-training, on the tiny model: each chunk writes the
asset and its recipe; the next chunk starts from the asset, also once outputs/ is gone
(a later sitting)."""
import json
import shutil

from demucs_lora.commands import base_recipe

from .dora_helpers import QUICK


def test_chunks_resume_from_the_asset_across_sittings(tmp_path, monkeypatch):
    asset = tmp_path / "base.th"
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    args = [*QUICK, "htdemucs.t_layers=1"]
    recipe = base_recipe.train_base(asset, args, epochs=1, stop_after=2, workdir=workdir)
    assert asset.exists() and [c["chunk"] for c in recipe["chunks"]] == [0, 1]
    assert "continue_from" not in recipe["chunks"][0]["command"]
    assert f"continue_from={asset}" in recipe["chunks"][1]["command"]
    assert recipe["epochs"] == 2 and len(recipe["valid_nsdr_curve"]) == 2
    assert recipe["valid_initial_nsdr"] is not None and recipe["status"] == "training"
    shutil.rmtree(workdir / "outputs")   # a new sitting: only the asset pair is kept
    again = base_recipe.train_base(asset, args, epochs=1, stop_after=1, workdir=workdir)
    assert [c["chunk"] for c in again["chunks"]] == [0, 1, 2]
    assert "seed=2" in again["chunks"][2]["command"]
    assert json.loads(asset.with_suffix(".json").read_text()) == again
