"""`dora run` with the quality protocol's methods together: LoRA-GA init, sensitivity
allocation, mean-rank scaling and LoRA+; the adapter it writes reproduces best.th on the
unmodified base file."""
import json

import torch

from .dora_helpers import BASE_ASSET, QUICK, dora, history, xps

METHODS = ["htdemucs.lora_rank=4", "htdemucs.lora_init=gradient",
           "htdemucs.lora_rank_mode=sensitivity", "htdemucs.lora_scaling=mean_rank",
           "htdemucs.lora_gradient_batches=2", "optim.lora_plus_ratio=4"]


def test_gradient_init_run_saves_a_plain_adapter_of_the_trained_model(tmp_path):
    from demucs_lora.model_files.packages import load_model_file
    from demucs_lora.lora.state import load_adapter
    dora(tmp_path, "run", *QUICK, f"continue_from={BASE_ASSET}", *METHODS, "optim.lr=3e-3",
         "dset.synth.domain=B")
    (xp,) = xps(tmp_path)
    hist = history(xp)
    # LoRA-GA leaves the output at step 0 as the base's: validation before training is
    # the base's score (the ratio of the offset to the weights is float rounding).
    assert len(hist) == 2 and all(h["valid_nsdr"] == h["valid_nsdr"] for h in hist)
    ranks = json.loads((xp / "ranks.json").read_text())
    assert ranks["mode"] == "sensitivity" and min(ranks["ranks"].values()) >= 1
    header = json.loads((xp / "lora_best.json").read_text())
    assert header["lora_init"]["method"] == "gradient"
    assert header["lora_init"]["trained_ranks"] == ranks["ranks"]
    assert header["ranks"] == {k: 2 * r for k, r in ranks["ranks"].items()}
    assert header["scaling_rank"] == 4
    assert "lora_plus_ratio: 4" in (xp / "config.yaml").read_text()
    base = load_model_file(BASE_ASSET).eval()
    adapted = load_adapter(base, xp / "lora_best").eval()
    merged = load_model_file(xp / "best.th").eval()
    x = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        want, got = merged(x), adapted(x)
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-4
