"""Bags (htdemucs_ft-like): every member adapted in one model, gradient isolated by the
identity weights, adapters keyed by member, bag files as demucs lays them out."""
import pytest
import torch
from helpers import randomize_b, tiny_htdemucs
from model_layouts import isolate_caches, write_hf_cache

from demucs_lora.models.bag import TrainableBag, bag_weights
from demucs_lora.config.compose import compose
from demucs_lora.config.run_config import model_spec
from demucs_lora.models.build import build_model

WEIGHTS = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
X = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(4))


@pytest.fixture
def bag_cache(tmp_path, monkeypatch):
    isolate_caches(tmp_path, monkeypatch)
    members = [tiny_htdemucs(seed=s) for s in range(3)]
    write_hf_cache(members, tmp_path / "hf", "htdemucs_ft", ["f7e0c4bc", "d12395a8", "92cfc3b6"],
                   repo="adefossez/HTDemucs-ft", weights=WEIGHTS)
    return members


def _bag_model(*overrides):
    return build_model(model_spec(compose(["model=htdemucs_tiny", "continue_from=htdemucs_ft",
                                           "htdemucs.lora_rank=4", *overrides])))


def test_bag_forward_is_apply_models_combination(bag_cache):
    from demucs.apply import apply_model
    model, report = _bag_model()
    assert isinstance(model, TrainableBag) and len(model.models) == 3
    assert all(name.startswith(("models.0.", "models.1.", "models.2."))
               for name in report["ranks"])
    assert {n.split(".")[1] for n in report["ranks"]} == {"0", "1", "2"}
    with torch.no_grad():
        ours = model.eval()(X)
        theirs = apply_model(model, X, shifts=0, split=False)
        by_hand = torch.stack([bag_cache[0](X)[:, 0], bag_cache[1](X)[:, 1],
                               bag_cache[2](X)[:, 2], bag_cache[2](X)[:, 3]], 1)
    assert (ours - theirs).abs().max() < 1e-5 and (ours - by_hand).abs().max() < 1e-5


@pytest.mark.parametrize("source,owner", [(0, 0), (1, 1), (3, 2)])
def test_identity_weights_isolate_each_members_gradient(bag_cache, source, owner):
    model, _ = _bag_model()
    randomize_b(model)  # so every adapter has a path to the output
    model.train()
    model(X)[:, source].abs().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        member = int(name.split(".")[1])
        has_grad = p.grad is not None and p.grad.abs().max() > 0
        if member != owner:
            assert not has_grad, name
    assert any(p.grad is not None and p.grad.abs().max() > 0
               for n, p in model.named_parameters() if n.startswith(f"models.{owner}."))


def test_bag_with_new_sources_and_one_member(bag_cache):
    model, report = _bag_model("sources=[kick,bass,other,vocals]", "source_init={kick:drums}")
    assert model.weights == bag_weights(WEIGHTS, [[0], [1], [2], [3]])
    assert report["train_heads"] == [f"models.{k}.{h}" for k in range(3)
                                     for h in ("decoder.3.conv_tr", "tdecoder.3.conv_tr")]
    single, _ = _bag_model("bag_member=1")
    assert not isinstance(single, TrainableBag)
    with torch.no_grad():
        assert (single.eval()(X) - bag_cache[1](X)).abs().max() < 1e-5


def test_adapter_round_trip_on_a_bag(bag_cache, tmp_path):
    import json
    from demucs_lora.models.guide_methods import load_lora_weights
    from demucs_lora.lora.state import save_adapter
    from demucs_lora.models.load import load_model
    model = randomize_b(_bag_model()[0])
    save_adapter(model, tmp_path / "bag_adapter")
    header = json.loads((tmp_path / "bag_adapter.json").read_text())
    assert header["bag"] == {"members": 3, "weights": WEIGHTS}
    again = load_lora_weights(load_model("htdemucs_ft"), tmp_path / "bag_adapter")
    with torch.no_grad():
        assert (again.eval()(X) - model.eval()(X)).abs().max() < 1e-6
