"""Loading a model (demucs_lora.models.load) and source remapping (models.heads)."""
import logging

import pytest
import torch
from demucs.states import serialize_model
from omegaconf import OmegaConf
from helpers import tiny_htdemucs

from demucs_lora.core.errors import ConfigError, ModelLoadError
from demucs_lora.models.load import load_model
from demucs_lora.models.heads import _head_blocks, remap_sources

SOURCES = ["drums", "bass", "other", "vocals"]



def test_permuted_sources_give_permuted_outputs(mix):
    base = tiny_htdemucs(SOURCES).eval()
    new_order = ["vocals", "drums", "bass", "other"]
    remapped = remap_sources(base, new_order).eval()
    with torch.no_grad():
        ref, out = base(mix), remapped(mix)
    perm = [SOURCES.index(s) for s in new_order]
    assert remapped.sources == new_order
    assert (out - ref[:, perm]).abs().max() / ref.abs().max() < 1e-5


def test_five_stem_copy_init_matches_drums(mix):
    base = tiny_htdemucs(SOURCES).eval()
    five = ["other", "kick", "vocals", "bass", "hihat"]
    new = remap_sources(base, five, {"kick": "drums", "hihat": "drums"}).eval()
    with torch.no_grad():
        ref, out = base(mix), new(mix)
    scale = ref.abs().max()
    drums = ref[:, 0]
    assert (out[:, 1] - drums).abs().max() / scale < 1e-5
    assert (out[:, 4] - drums).abs().max() / scale < 1e-5
    for name in ("other", "vocals", "bass"):
        assert (out[:, five.index(name)] - ref[:, SOURCES.index(name)]).abs().max() / scale < 1e-5


def test_sum_init_is_close_to_sum_of_heads(mix):
    base = tiny_htdemucs(SOURCES).eval()
    new = remap_sources(base, ["vocals", "accompaniment"],
                        {"accompaniment": ["drums", "bass", "other"]}).eval()
    with torch.no_grad():
        ref, out = base(mix), new(mix)
    assert (out[:, 0] - ref[:, 3]).abs().max() / ref.abs().max() < 1e-5
    summed = ref[:, :3].sum(dim=1)
    # Exact up to the input mean HTDemucs adds back once per source (DESIGN.md).
    assert (out[:, 1] - summed).abs().max() / summed.abs().max() < 0.05


def test_new_sources_follow_the_taxonomy_and_bad_names_fail(caplog):
    caplog.set_level(logging.INFO)
    base = tiny_htdemucs(SOURCES).eval()
    new = remap_sources(base, ["drums", "piano", "vocal", "theremin"])
    w_base = _head_blocks(base.decoder[-1].conv_tr, 4)[0]
    w_new = _head_blocks(new.decoder[-1].conv_tr, 4)[0]
    src = base.sources
    assert torch.equal(w_new[:, 1], w_base[:, src.index("other")])   # piano <- other
    assert torch.equal(w_new[:, 2], w_base[:, src.index("vocals")])  # a spelling of vocals
    assert not w_new[:, 3].any()                                       # unknown: zero head
    assert "source theremin: new stem that the taxonomy does not know" in caplog.text
    with pytest.raises(ConfigError, match="source_init"):
        remap_sources(base, ["drums", "kick"], {"kick": "cowbell"})


def test_load_model_from_path_repo_and_errors(tmp_path):
    model = tiny_htdemucs(SOURCES).eval()
    package = serialize_model(model, OmegaConf.create({}), half=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    torch.save(package, repo / "abcd1234.th")
    (repo / "mybag.yaml").write_text("models: ['abcd1234']\n")
    (repo / "bigbag.yaml").write_text("models: ['abcd1234', 'ffff0000']\n")
    x = torch.randn(1, 2, 44100)
    with torch.no_grad():
        ref = model(x)
        for loaded in (load_model(str(repo / "abcd1234.th")),
                       load_model("abcd1234", repo=str(repo)),
                       load_model("mybag", repo=str(repo))):
            assert (loaded.eval()(x) - ref).abs().max() < 1e-5
    with pytest.raises(ModelLoadError, match=r"bigbag.*\['ffff0000'\].*not there"):
        load_model("bigbag", repo=str(repo))
    with pytest.raises(ModelLoadError, match="available"):
        load_model("htdemucs", repo=str(repo))
    with pytest.raises(ModelLoadError, match="pretrained_repo"):
        load_model("htdemucs", root=tmp_path)


def test_load_model_refuses_nan_and_says_where_an_adapter_was_going(tmp_path):
    """The one entry: eval mode, NaN weights refused for every caller (training's base
    too), an adapter's mismatch names the base it was loaded onto."""
    from demucs_lora.core.errors import AdapterMismatch
    from demucs_lora.lora.state import save_adapter
    from demucs_lora.models.load import put_adapter
    from helpers import adapted_copy
    base, other = tiny_htdemucs(SOURCES, seed=0), tiny_htdemucs(SOURCES, seed=5)
    torch.save(serialize_model(base, OmegaConf.create({}), half=False), tmp_path / "base.th")
    save_adapter(adapted_copy(other, seed=3), tmp_path / "other_adapter")
    assert not load_model(tmp_path / "base.th").training
    with pytest.raises(AdapterMismatch, match=r"different base(.|\n)*\[base: .*base\.th\]$"):
        load_model(tmp_path / "base.th", adapter=tmp_path / "other_adapter")
    with pytest.raises(AdapterMismatch, match=r"^lora_checkpoint=X: .*different base.* Fix!$"):
        put_adapter(tiny_htdemucs(SOURCES), tmp_path / "other_adapter",
                    prefix="lora_checkpoint=X: ", suffix=" Fix!")
    with torch.no_grad():
        base.decoder[0].conv_tr.weight[0, 0, 0] = float("nan")
    torch.save(serialize_model(base, OmegaConf.create({}), half=False), tmp_path / "nan.th")
    with pytest.raises(ModelLoadError, match=r"nan\.th holds NaN/inf weights"):
        load_model(tmp_path / "nan.th")
