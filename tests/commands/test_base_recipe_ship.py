"""`make base-medium` ships the best chunk's model once converged, and says which."""
import json

import torch
from demucs.states import serialize_model
from helpers import tiny_htdemucs
from omegaconf import OmegaConf

from demucs_lora.commands import base_recipe


def _xp(root, name, seed):
    xp = root / "outputs" / "xps" / name
    xp.mkdir(parents=True)
    model = tiny_htdemucs(seed=seed).eval()
    torch.save(serialize_model(model, OmegaConf.create({}), half=False), xp / "best.th")
    return model


def test_the_shipped_asset_is_the_best_chunks_model(tmp_path):
    best = _xp(tmp_path, "aaaa0001", seed=1)
    last = _xp(tmp_path, "aaaa0002", seed=2)
    asset = tmp_path / "base.th"
    torch.save(serialize_model(last, OmegaConf.create({}), half=True), asset)  # chunk 1 wrote it
    chunks = [{"chunk": 0, "xp": "aaaa0001", "best_valid_nsdr": 5.0},
              {"chunk": 1, "xp": "aaaa0002", "best_valid_nsdr": 4.0}]
    asset.with_suffix(".json").write_text(json.dumps({"chunks": chunks, "status": "converged"}))
    recipe = base_recipe.ship_best_chunk(asset, tmp_path)
    assert recipe["asset"] == {"chunk": 0, "xp": "aaaa0001", "valid_nsdr": 5.0}
    assert json.loads(asset.with_suffix(".json").read_text())["asset"]["chunk"] == 0
    from demucs_lora.models.load import load_model
    shipped = load_model(asset)
    for (name, p), q in zip(shipped.state_dict().items(), best.state_dict().values()):
        assert torch.allclose(p.float(), q.half().float()), name   # stored float16
    assert base_recipe.ship_best_chunk(asset, tmp_path) == recipe   # idempotent
