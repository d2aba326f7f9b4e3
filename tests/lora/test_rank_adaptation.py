"""Dynamic rank adaptation: budget kept, output change bounded by the dropped singular
values, optimizer state kept for untouched tensors, adapters reload with the new ranks,
and the state round-trips (the exact kill -9 resume runs in tests/integration)."""
import copy

import pytest
import torch
from helpers import inject_all, randomize_b, tiny_htdemucs
from omegaconf import OmegaConf
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.inject import iter_lora_layers, lora_config
from demucs_lora.lora.layers import LoRALinear
from demucs_lora.lora.config import LoraConfig
from demucs_lora.lora.rank_adaptation import (RankAdaptation, plan_ranks, resize_layer,
                                              LayerScore)


def lcfg(**kw):
    base = {"lora_adapt_every": 1, "lora_gradient_batches": 1, "min_rank": 1, "max_rank": 32,
            "lora_max_rank": 32, "layer_ranks": None}
    return LoraConfig.from_cfg(OmegaConf.create({**base, **kw}))


def lora_htdemucs(rank=4):
    """A tiny HTDemucs with a trained-looking adapter (B != 0) on every target."""
    return randomize_b(inject_all(tiny_htdemucs(t_layers=2), rank), seed=1)


def batches(n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 2, 22050, generator=gen), torch.randn(2, 4, 2, 22050, generator=gen))
            for _ in range(n)]


def dense_deltas(model):
    out = {}
    for name, layer in iter_lora_layers(model):
        delta = layer.delta_weight()
        out[name] = {k: v.detach().clone() for k, v in delta.items()} \
            if isinstance(delta, dict) else {"w": delta.detach().clone()}
    return out


@pytest.fixture(scope="module")
def adapted():
    """One reallocation of a tiny LoRA HTDemucs after an Adam step."""
    model = lora_htdemucs()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(batches()[0][0]).abs().mean().backward()
    opt.step()
    before = dense_deltas(model)
    ranks_before = {n: l.r for n, l in iter_lora_layers(model)}
    state_before = {id(p): opt.state[p] for g in opt.param_groups for p in g["params"]}
    ra = RankAdaptation(model, lcfg())
    entry = ra.reallocate(iter(batches()), nn.functional.l1_loss, opt, None, epoch=0)
    return dict(model=model, opt=opt, ra=ra, entry=entry, before=before,
                ranks_before=ranks_before, state_before=state_before)


def test_budget_is_kept_within_5_percent_and_ranks_move(adapted):
    ra, entry = adapted["ra"], adapted["entry"]
    assert 0.95 * ra.budget <= entry["params"] <= ra.budget
    assert entry["params"] == ra.spent()
    assert entry["grown"] and entry["shrunk"]
    for name, rank in entry["ranks"].items():
        low, high = ra.bounds[name]
        assert low <= rank <= high, name
    assert lora_config(adapted["model"])["ranks"] == entry["ranks"]  # what headers store


def _as_matrix(layer, change):
    """The delta in the orientation the factors approximate (see resize._Pair)."""
    if isinstance(layer.base, nn.Embedding):
        return change.t()
    return change.reshape(change.shape[0], -1)


def test_weight_change_is_exactly_the_dropped_singular_values(adapted):
    model, before, entry = adapted["model"], adapted["before"], adapted["entry"]
    after = dense_deltas(model)
    for name, layer in iter_lora_layers(model):
        dropped = [torch.tensor(d, dtype=torch.float64)
                   for d in entry["dropped_sigma"].get(name, [])]
        for key in before[name]:
            change = _as_matrix(layer, (after[name][key] - before[name][key]).double())
            if name not in entry["shrunk"]:  # grown or unchanged: the delta is kept exactly
                assert float(change.abs().max()) < 1e-6, name
                continue
            # attention: in_proj_weight stacks the q/v pairs, out_proj.weight is the last
            sig = dropped[-1] if key == "out_proj.weight" else \
                torch.cat(dropped[:-1]) if key == "in_proj_weight" else dropped[0]
            want = float(sig.square().sum().sqrt())
            assert float(change.norm()) == pytest.approx(want, rel=1e-4, abs=1e-6), name
            top = float(sig.max()) if sig.numel() else 0.0
            assert float(torch.linalg.matrix_norm(change, 2)) <= top * (1 + 1e-4) + 1e-6


def test_output_change_of_a_layer_is_bounded_by_the_dropped_sigma():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 16), r=6, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(32, 24)
    y_before = layer(x).detach()
    result = resize_layer(layer, 2)
    sigma = result["dropped"][0]
    assert layer.r == 2 and layer.lora_A.shape == (2, 24) and layer.scaling == 6.0
    change = (layer(x).detach() - y_before).norm(dim=1)
    assert (change <= float(sigma[0]) * x.norm(dim=1) * (1 + 1e-4)).all()
    assert float(change.max()) > 0  # something was dropped
    y_mid = layer(x).detach()
    resize_layer(layer, 5)  # growth: zero B side, output unchanged
    assert layer.lora_B.shape == (16, 5) and layer.scaling == pytest.approx(12 / 5)
    assert torch.allclose(layer(x), y_mid, atol=1e-5)
    assert layer.lora_B[:, 2:].abs().max() == 0 and layer.lora_A[2:].norm(dim=1).min() > 0.5


def test_only_resized_tensors_lose_their_optimizer_state(adapted):
    model, opt, entry = adapted["model"], adapted["opt"], adapted["entry"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in in_opt] == [id(p) for p in trainable]
    resized = set(entry["grown"]) | set(entry["shrunk"])
    for name, layer in iter_lora_layers(model):
        for _, param in layer.lora_named_parameters():
            if name in resized:
                assert param not in opt.state, name
            else:
                assert opt.state[param] is adapted["state_before"][id(param)], name
    opt.zero_grad()
    model(batches()[0][0]).abs().mean().backward()
    opt.step()  # Adam starts the new tensors' moments afresh


def test_history_is_written_and_plotted(adapted, tmp_path):
    import json
    pytest.importorskip("matplotlib")
    adapted["ra"].write_history(tmp_path)
    history = json.loads((tmp_path / "rank_history.json").read_text())
    assert [e["epoch"] for e in history] == [0, 1] and history[1]["shrunk"]
    assert (tmp_path / "rank_history.png").stat().st_size > 1000


def test_adapter_reloads_with_the_new_ranks(adapted, tmp_path):
    from demucs_lora.lora.inject import remove_lora
    from demucs_lora.models.guide_methods import load_lora_weights
    from demucs_lora.lora.adapter_file import read_adapter
    from demucs_lora.lora.state import save_adapter
    model = adapted["model"]
    save_adapter(model, tmp_path / "lora")
    header, _ = read_adapter(tmp_path / "lora")
    assert header["ranks"] == adapted["entry"]["ranks"]
    base = copy.deepcopy(model)
    for _, layer in iter_lora_layers(base):
        for _, p in layer.lora_named_parameters():
            p.data.zero_()
    base = remove_lora(base)
    loaded = load_lora_weights(base, tmp_path / "lora")
    want, got = remove_lora(copy.deepcopy(model)).state_dict(), remove_lora(loaded).state_dict()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_state_round_trip_rebuilds_the_layers_before_loading(adapted):
    """What Solver.restore does after kill -9: fresh model at the starting ranks, resize to
    the checkpoint's ranks, then load trainable tensors and optimizer state."""
    from demucs_lora.models.trainable import load_trainable_state, trainable_state
    model, opt, ra = adapted["model"], adapted["opt"], adapted["ra"]
    fresh = lora_htdemucs()
    fresh_opt = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    fresh_ra = RankAdaptation(fresh, lcfg())
    fresh_ra.load_state_dict(ra.state_dict(), fresh_opt)
    load_trainable_state(fresh, trainable_state(model))
    fresh_opt.load_state_dict(opt.state_dict())
    assert fresh_ra.ranks() == ra.ranks() and fresh_ra.budget == ra.budget
    assert fresh_ra.history == ra.history
    fresh.segment = model.segment  # HTDemucs records the train segment in train mode
    x = batches()[0][0]
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model.eval()(x), atol=1e-6)


def test_plan_keeps_bounds_and_pinned_layers():
    scores = {"a": LayerScore(torch.tensor([9., 1.]), torch.tensor([5., 4., 0.]), 10.0),
              "b": LayerScore(torch.tensor([1., 0.]), torch.tensor([0., 0., 0.]), 10.0)}
    plan = plan_ranks(scores, {"a": 2, "b": 2, "p": 3}, {"a": 10, "b": 10, "p": 7},
                      {"a": (1, 4), "b": (1, 5)}, budget=61, pinned={"p"})
    assert plan["p"] == 3 and plan["b"] >= 1 and plan["a"] <= 4
    assert sum(plan[n] * c for n, c in {"a": 10, "b": 10, "p": 7}.items()) <= 61
    assert plan == {"a": 3, "b": 1, "p": 3}  # a: its gradient wants rank, b: nothing


def test_config_keys_are_checked():
    base = OmegaConf.create({"htdemucs": {"lora_rank": 4, "lora_rank_adaptation": True,
                                          "lora_adapt_every": 2}})
    LoraConfig.from_cfg(base.htdemucs)
    for key, value, match in (("lora_adapt_every", 0, "lora_adapt_every"),
                              ("lora_rank_adaptation", "yes", "true or false"),
                              ("lora_rank", 0, "lora_rank > 0")):
        bad = copy.deepcopy(base)
        bad.htdemucs[key] = value
        with pytest.raises(ConfigError, match=match):
            LoraConfig.from_cfg(bad.htdemucs)
