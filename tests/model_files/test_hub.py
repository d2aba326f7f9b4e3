"""The model resolver and both file layouts: every place a user's demucs model can be."""
import json

import pytest
import torch
from helpers import SIX, tiny_htdemucs
from model_layouts import (run_offline, write_hf_cache, write_repo_th,
                           write_torch_hub)
from safetensors.torch import save_file

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.core.files import atomic_write
from demucs_lora.model_files.packages import load_model_file, safetensors_writer
from demucs_lora.model_files.resolve import find_model
from demucs_lora.models.load import load_model

X = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(1))


def _out(model):
    with torch.no_grad():
        return model.eval()(X)


def test_three_layouts_load_the_same_model(caches):
    model = tiny_htdemucs()
    write_repo_th(model, caches / "repo", "htdemucs")
    write_torch_hub(model, caches / "torch", "955717e8")
    write_hf_cache([model], caches / "hf", "htdemucs", ["955717e8"])
    ref = _out(model)
    from_repo = load_model("htdemucs", repo=str(caches / "repo"))
    from_hf = load_model("htdemucs")  # the HF cache comes before torch hub
    assert "HF cache" in find_model("htdemucs").where
    assert torch.equal(_out(from_repo), ref) and torch.equal(_out(from_hf), ref)
    from demucs_lora import get_model
    assert torch.equal(_out(get_model("htdemucs")), ref)  # serving resolves the same way
    assert torch.equal(_out(get_model("htdemucs", repo=caches / "repo")), ref)
    for path in (caches / "hf").rglob("*"):
        if path.is_file() and path.suffix != ".th":
            path.unlink()
    assert "torch hub" in find_model("htdemucs").where  # remote/htdemucs.yaml -> 955717e8
    assert torch.equal(_out(load_model("htdemucs")), ref)
    assert torch.equal(_out(load_model("955717e8")), ref)  # a bare signature too


@pytest.mark.slow  # three forwards padded to a 7.8 s segment
def test_safetensors_export_reads_in_demucs_and_keeps_fractions(tmp_path):
    from fractions import Fraction
    from demucs.hf import load_safetensors_model
    model = tiny_htdemucs(segment=Fraction(39, 5))
    path = atomic_write(tmp_path / "955717e8.safetensors", safetensors_writer(model))
    theirs, ours = load_safetensors_model(path), load_model_file(path)
    assert theirs.segment == ours.segment == Fraction(39, 5)
    assert torch.equal(_out(theirs), _out(model)) and torch.equal(_out(ours), _out(model))


def test_hostile_safetensors_class_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={
        "klass": "os.system", "args": json.dumps([f"touch {marker}"]), "kwargs": "{}"})
    with pytest.raises(ModelLoadError, match=r"evil.safetensors.*'os.system'.*allowlist"):
        load_model_file(path)
    with pytest.raises(ModelLoadError, match="os.system"):
        load_model(str(path))
    assert not marker.exists()
    packed = tmp_path / "packed.safetensors"
    save_file({"x": torch.zeros(1)}, str(packed), metadata={
        "klass": "demucs.htdemucs.HTDemucs", "args": "[]", "kwargs": "{}",
        "structure": json.dumps({"_class": "os.system"})})
    with pytest.raises(ModelLoadError, match="packed"):
        load_model_file(packed)


@pytest.mark.parametrize("metadata,match", [
    ({"args": "[]", "kwargs": "{}"}, "outside the allowlist"),
    ({"klass": "demucs.htdemucs.HTDemucs", "kwargs": "{}"}, "no 'args'"),
    ({"klass": "demucs.htdemucs.HTDemucs", "args": "[", "kwargs": "{}"}, "not valid JSON"),
    ({"klass": "demucs.htdemucs.HTDemucs", "args": "[]",
      "kwargs": '{"segment": {"_type": "fraction", "numerator": 1, "denominator": 0}}'},
     "malformed fraction"),
    ({"klass": "demucs.htdemucs.HTDemucs", "args": "[]",
      "kwargs": '{"segment": ' + "9" * 5000 + "}"}, "not valid JSON"),
])
def test_malformed_safetensors_metadata(tmp_path, metadata, match):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(ModelLoadError, match=match):
        load_model_file(path)


def test_truncated_safetensors_and_wrong_checksum(tmp_path):
    model = tiny_htdemucs()
    good = atomic_write(tmp_path / "a.safetensors", safetensors_writer(model))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cut.safetensors.*not a readable safetensors"):
        load_model_file(cut)
    th = write_repo_th(model, tmp_path / "repo", "955717e8-deadbeef")
    with pytest.raises(ModelLoadError, match=r"955717e8-deadbeef.th: checksum mismatch.*Delete"):
        load_model("955717e8", repo=str(th.parent))


def test_bag_missing_member_and_hdemucs_are_errors(caches):
    from demucs.hdemucs import HDemucs
    write_hf_cache([tiny_htdemucs()], caches / "hf", "htdemucs_ft", ["aaaa0001", "aaaa0002"],
                   repo="adefossez/HTDemucs-ft")
    (caches / "hf/hub/models--adefossez--HTDemucs-ft/snapshots").glob("*")
    with pytest.raises(ModelLoadError, match=r"htdemucs_ft.*\['aaaa0002.safetensors'\].*not"):
        load_model("htdemucs_ft")
    hdemucs = HDemucs(sources=["drums", "bass", "other", "vocals"], channels=4)
    path = write_repo_th(hdemucs, caches / "repo", "hdemucs_mmi")
    with pytest.raises(ModelLoadError, match=r"hdemucs_mmi.th holds a demucs.hdemucs.HDemucs.*"
                                             "only"):
        load_model("hdemucs_mmi", repo=str(path.parent))


def test_bag_of_models_and_bag_member(caches):
    from demucs.apply import BagOfModels
    members = [tiny_htdemucs(seed=s) for s in range(3)]
    weights = [[1.0 if i == s or (s, i) == (2, 3) else 0.0 for i in range(4)]
               for s in range(3)]          # every source weighted somewhere (else 0 / 0)
    write_hf_cache(members, caches / "hf", "htdemucs_ft", ["f1", "f2", "f3"],
                   repo="adefossez/HTDemucs-ft", weights=weights)
    bag = load_model("htdemucs_ft")
    assert isinstance(bag, BagOfModels) and len(bag.models) == 3 and bag.weights == weights
    second = load_model("htdemucs_ft", bag_member=1)
    assert torch.equal(_out(second), _out(members[1]))


def test_not_found_lists_every_place_and_ambiguity(caches):
    with pytest.raises(ModelLoadError) as info:
        load_model("htdemucs")
    text = str(info.value)
    for place in ("no XP", "no pretrained_repo", "HF hub cache", "models--", "torch hub",
                  "demucs -n htdemucs", "pretrained_repo=FOLDER"):
        assert place.replace("models--", "adefossez/HTDemucs") in text, place
    write_hf_cache([tiny_htdemucs()], caches / "hf", "htdemucs", ["955717e8"])
    xp = caches / "outputs" / "xps" / "htdemucs"
    xp.mkdir(parents=True)
    write_repo_th(tiny_htdemucs(), xp, "best")
    with pytest.raises(ModelLoadError, match=r"ambiguous.*best.th.*955717e8.safetensors.*"
                       r"-n PATH for separate"):
        load_model("htdemucs")
    assert find_model(str(xp)).files == [xp / "best.th"]  # a path picks the XP
    with pytest.raises(ModelLoadError, match=r"does not exist \(XP htdemucs is .*best.th"):
        find_model("outputs/htdemucs/checkpoints/best.th")  # the guide's layout


def test_folder_paths(caches):
    one = caches / "one"
    write_repo_th(tiny_htdemucs(), one, "m")
    assert find_model("one").files == [one / "m.th"]
    write_repo_th(tiny_htdemucs(), one, "n")
    with pytest.raises(ModelLoadError, match="2 model file"):
        find_model("one")
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_model("nothing/here.th")


@pytest.mark.slow  # demucs' hub loader in a subprocess
def test_hf_export_loads_through_stock_get_model_offline(tmp_path):
    """demucs.pretrained.get_model('hf://NS/NAME') with HF_HUB_OFFLINE=1 reads our layout."""
    model = tiny_htdemucs(SIX)
    write_hf_cache([model], tmp_path / "hf", "htdemucs_6s", ["5c90dfd2"],
                   repo="someone/HTDemucs-6s")
    torch.save(X, tmp_path / "x.pt")
    torch.save(_out(model), tmp_path / "ref.pt")
    code = ("import torch; from demucs.pretrained import get_model; "
            "bag = get_model('hf://someone/htdemucs_6s'); m = bag.models[0].eval(); "
            f"x = torch.load('{tmp_path / 'x.pt'}'); ref = torch.load('{tmp_path / 'ref.pt'}');"
            "out = m(x).detach(); print(list(m.sources)); assert (out - ref).abs().max() < 1e-5")
    assert "guitar" in run_offline(code, tmp_path / "hf").stdout
