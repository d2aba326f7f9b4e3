"""`hf://NAMESPACE/NAME` and `NAMESPACE/NAME` (README "Your pretrained model") are names
looked up in the HF cache by our own resolver, even though they contain a slash."""
import pytest
from helpers import FOUR, tiny_htdemucs
from model_layouts import isolate_caches, write_hf_cache

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.model_files.caches import hf_repo_id
from demucs_lora.model_files.resolve import find_model, load_found


@pytest.mark.parametrize("name", ["hf://someone/mymodel", "someone/mymodel"])
def test_namespace_names_resolve_through_the_hf_cache(tmp_path, monkeypatch, name):
    isolate_caches(tmp_path, monkeypatch)
    repo_id, bare = hf_repo_id(name)
    assert (repo_id, bare) == ("someone/Demucs-mymodel", "mymodel")
    snap = write_hf_cache([tiny_htdemucs(FOUR)], tmp_path / "hf", bare, ["aaaa1111"],
                          repo=repo_id)
    found = find_model(name)
    assert found.files == [snap / "aaaa1111.safetensors"]
    assert "HF cache someone/Demucs-mymodel" in found.where
    assert list(load_found(found).members[0].sources) == FOUR
    with pytest.raises(ModelLoadError, match="not found"):     # another namespace: a name
        find_model(name.replace("someone", "nobody"))


def test_a_path_with_a_suffix_stays_a_path(tmp_path, monkeypatch):
    isolate_caches(tmp_path, monkeypatch)
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_model("someone/model.th")
