"""`continue_from=NAME` finds a user's demucs model wherever demucs 4.1 put it.

One tiny HTDemucs written three ways (a repo folder, torch hub's checkpoints, the HF hub
cache): `dora run continue_from=htdemucs ...` trains from each (the caches with no
`pretrained_repo`), `tools.test_pretrained -n htdemucs` scores the same model from each.
"""
import json

import pytest
from helpers import tiny_htdemucs
from model_layouts import write_hf_cache, write_repo_th, write_torch_hub

from .dora_helpers import QUICK, dora, history, tool, xps

RUN = [*QUICK, "continue_from=htdemucs", "htdemucs.lora_rank=8", "epochs=1", "max_batches=1",
       "test.initial=false"]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("layout", ["repo", "torch_hub", "hf_cache"])
def test_train_and_test_from_each_layout(caches, layout):
    model = tiny_htdemucs()
    extra = []
    if layout == "repo":
        write_repo_th(model, caches / "models", "htdemucs")
        extra = [f"pretrained_repo={caches / 'models'}"]
    elif layout == "torch_hub":
        write_torch_hub(model, caches / "torch", "955717e8")
    else:
        write_hf_cache([model], caches / "hf", "htdemucs", ["955717e8"])
    dora(caches, "run", *RUN, *extra)
    (xp,) = xps(caches)
    assert (xp / "lora_best.safetensors").is_file() and len(history(xp)) == 1
    repo = ["--repo", str(caches / "models")] if layout == "repo" else []
    out = caches / "scores.json"
    tool(caches, "tools.test_pretrained", "-n", "htdemucs", *repo, "--json", str(out),
         "--max-tracks", "1", "--no-progress", "variant=debug")
    scores = json.loads(out.read_text())
    # The same random-init tiny model scored on the same synthetic track: same numbers.
    ref = tiny_htdemucs()
    from demucs_lora.config.compose import compose
    from demucs_lora.config.run_config import data_config
    from demucs_lora.inference.evaluation import build_dataset, evaluate_model
    cfg = compose(["variant=debug", f"dset.metadata={caches / 'metadata'}"])
    data = build_dataset(data_config(cfg, ref.sources), "test", ref.samplerate, ref.audio_channels,
                         progress=False)
    expected = evaluate_model(ref.eval(), data, shifts=0, overlap=float(cfg.test.overlap),
                              split=bool(cfg.test.split), max_tracks=1, progress=False)
    assert abs(scores["summary"]["nsdr"] - expected["summary"]["nsdr"]) < 1e-4


def test_bag_adapted_evaluated_exported_and_separated_by_stock_cli(caches):
    """A 3-member bag with identity-like weights from the HF cache: one XP adapts every
    member, test_pretrained scores the bag, the export is a bag the stock CLI runs."""
    members = [tiny_htdemucs(seed=s) for s in range(3)]
    weights = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    write_hf_cache(members, caches / "hf", "htdemucs_ft", ["f7e0c4bc", "d12395a8", "92cfc3b6"],
                   repo="adefossez/HTDemucs-ft", weights=weights)
    run = dora(caches, "run", *[a.replace("continue_from=htdemucs", "continue_from=htdemucs_ft")
                                for a in RUN])
    assert "bag of 3 models" in run.stdout + run.stderr
    (xp,) = xps(caches)
    assert sorted(p.name for p in xp.glob("best*")) == [
        "best.yaml", "best_m0.th", "best_m1.th", "best_m2.th"]
    header = json.loads((xp / "lora_best.json").read_text())
    assert header["bag"] == {"members": 3, "weights": weights}
    assert {k.split(".")[1] for k in header["ranks"]} == {"0", "1", "2"}
    out = caches / "bag_scores.json"
    tool(caches, "tools.test_pretrained", "-n", xp.name, "--json", str(out), "--max-tracks",
         "1", "--no-progress")
    assert json.loads(out.read_text())["summary"]["nsdr"] is not None
    tool(caches, "tools.export", xp.name, "--name", "ftbag", "-o", "release")
    assert sorted(p.name for p in (caches / "release").iterdir()) == [
        "ftbag.yaml", "ftbag_m0.th", "ftbag_m1.th", "ftbag_m2.th"]
    mix = sorted(caches.glob("metadata/synth/*/test/*/mixture.wav"))[0]
    tool(caches, "demucs", "--repo", "release", "-n", "ftbag", str(mix), "-o", "sep",
         "--shifts", "0")
    stems = sorted(p.name for p in caches.glob("sep/ftbag/*/*.wav"))
    assert stems == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
