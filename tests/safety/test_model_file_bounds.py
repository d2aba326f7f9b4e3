"""Model files and bags are bounded input: tensor dtypes the architecture defines, a
bounded member count, member names that stay in the bag's folder or cache snapshot, and
bag weights validated (shape, type, finiteness) when the bag is read."""
import pytest
import torch
import yaml
from helpers import FOUR, tiny_htdemucs
from model_layouts import isolate_caches, write_hf_cache, write_repo_th
from omegaconf import OmegaConf

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.model_files.caches import MAX_BAG_MEMBERS
from demucs_lora.model_files.packages import load_model_file
from demucs_lora.model_files.resolve import find_model, load_found


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8])
def test_float_tensor_stored_as_another_dtype_is_refused(tmp_path, dtype):
    from demucs.states import serialize_model
    package = serialize_model(tiny_htdemucs(FOUR), OmegaConf.create({}), half=False)
    key = "encoder.0.conv.weight"
    package["state"][key] = package["state"][key].to(dtype)
    torch.save(package, tmp_path / "model.th")
    with pytest.raises(ModelLoadError) as info:
        load_model_file(tmp_path / "model.th")
    assert f"tensor {key} is stored as {dtype}" in str(info.value)
    assert str(tmp_path / "model.th") in str(info.value)
    for ok in (torch.float16, torch.bfloat16):          # what serialize_model may store
        package["state"][key] = package["state"][key].to(ok)
        torch.save(package, tmp_path / "model.th")
        load_model_file(tmp_path / "model.th")


def _bag(tmp_path, models, **extra):
    folder = tmp_path / "repo"
    folder.mkdir(exist_ok=True)
    write_repo_th(tiny_htdemucs(FOUR), folder, "aaaa1111")
    (folder / "bag.yaml").write_text(yaml.safe_dump({"models": models, **extra}))
    return folder / "bag.yaml"


@pytest.mark.parametrize("bag,message", [
    ({"models": ["aaaa1111"] * (MAX_BAG_MEMBERS + 1)}, f"a bag holds at most {MAX_BAG_MEMBERS}"),
    ({"models": ["../outside/aaaa1111"]}, "member '../outside/aaaa1111' is not a model name"),
    ({"models": ["/etc/passwd"]}, "is not a model name"),
    ({"models": ["aaaa1111"], "weights": [[1, 1]]}, "one weight per source"),
    ({"models": ["aaaa1111"], "weights": [[1, 1, 1, 1], [1, 1, 1, 1]]}, "one list of finite"),
    ({"models": ["aaaa1111"], "weights": [["a", "b", "c", "d"]]}, "one list of finite"),
    ({"models": ["aaaa1111"], "weights": [[1, 1, float("nan"), 1]]}, "one list of finite"),
    ({"models": ["aaaa1111"], "weights": [[1, 0, 1, 1]]}, "no source weighted 0"),
    ({"models": ["aaaa1111"], "segment": -1}, "segment=-1"),
])
def test_bad_bag_is_one_model_load_error_naming_it(tmp_path, bag, message):
    path = _bag(tmp_path, **bag)
    with pytest.raises(ModelLoadError) as info:
        load_found(find_model(str(path)))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "bag" in str(info.value)


def test_hf_member_may_not_leave_the_snapshot(tmp_path, monkeypatch):
    isolate_caches(tmp_path, monkeypatch)
    snap = write_hf_cache([tiny_htdemucs(FOUR)], tmp_path / "hf", "htdemucs", ["aaaa1111"])
    (snap / "htdemucs.yaml").write_text("models: ['../../../../../x/aaaa1111']\n")
    with pytest.raises(ModelLoadError, match="is not a model name"):
        find_model("htdemucs")


def test_good_bag_loads_with_its_weights(tmp_path):
    path = _bag(tmp_path, ["aaaa1111"], weights=[[1, 0.5, 1, 2]], segment=7.8)
    loaded = load_found(find_model(str(path)))
    assert loaded.weights == [[1.0, 0.5, 1.0, 2.0]] and loaded.segment == 7.8
