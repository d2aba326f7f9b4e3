"""Adapter and model files cannot exhaust the machine: a malformed adapter header is a
typed error naming the file and key before any tensor exists, and a model package that
describes a model far larger than its own state (or a Fraction bomb) is refused before
anything is built. Peak RSS is checked, not just the exception."""
import fractions
import io
import json
import resource
import subprocess
import sys
import time

import pytest
import torch
from demucs.states import serialize_model
from omegaconf import OmegaConf

from demucs_lora.core.errors import AdapterMismatch, ModelLoadError
from demucs_lora.models.guide_methods import load_lora_weights
from demucs_lora.lora.state import save_adapter

from solver_helpers import lora, tiny_base

MB = 1024  # ru_maxrss is in KiB on Linux


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(scope="module")
def adapter_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(lora(tiny_base()), folder / "ad", xp="x")
    return folder / "ad"


HEADER_CASES = {
    "not_json": (lambda h: "{ranks: oops", "not readable JSON"),
    "a_list": (lambda h: json.dumps([h]), "not a JSON object"),
    "no_ranks": (lambda h: json.dumps({k: v for k, v in h.items() if k != "ranks"}),
                 "'ranks' is missing"),
    "no_fingerprint": (lambda h: json.dumps({k: v for k, v in h.items()
                                             if k != "base_fingerprint"}),
                       "'base_fingerprint' is missing"),
    "string_rank": (lambda h: json.dumps(dict(h, ranks=dict(h["ranks"], **{
        next(iter(h["ranks"])): "4"}))), "ranks.encoder"),
    "negative_rank": (lambda h: json.dumps(dict(h, ranks=dict(h["ranks"], **{
        next(iter(h["ranks"])): -2}))), "ranks.encoder"),
    "rank_1e5": (lambda h: json.dumps(dict(h, ranks={k: 100000 for k in h["ranks"]})),
                 "ranks.encoder"),
    "rank_1e9": (lambda h: json.dumps(dict(h, ranks={k: 10 ** 9 for k in h["ranks"]})),
                 "ranks.encoder"),
    "rank_above_layer": (lambda h: json.dumps(dict(h, ranks={k: 60000 for k in h["ranks"]})),
                         "far above the layer's smallest dimension"),
    "unknown_layer": (lambda h: json.dumps(dict(h, ranks={"encoder.99.conv": 2})),
                      "ranks.encoder.99.conv' names no layer"),
    "bad_bias": (lambda h: json.dumps(dict(h, bias="everything")), "'bias'"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_fuzzing_is_typed_and_allocates_nothing(adapter_pair, tmp_path, case):
    edit, expected = HEADER_CASES[case]
    for ext in (".safetensors", ".json"):
        (tmp_path / f"ad{ext}").write_bytes(adapter_pair.with_suffix(ext).read_bytes())
    header_path = tmp_path / "ad.json"
    header_path.write_text(edit(json.loads(header_path.read_text())))
    model = tiny_base()
    before = peak_rss_kib()
    with pytest.raises(AdapterMismatch) as info:
        load_lora_weights(model, tmp_path / "ad")
    assert str(header_path) in str(info.value) and expected in str(info.value)
    assert peak_rss_kib() - before < 200 * MB


@pytest.mark.parametrize("kind", ["empty", "truncated"])
@pytest.mark.parametrize("checksum", [True, False])
def test_truncated_or_empty_tensors_name_the_file(adapter_pair, tmp_path, kind, checksum):
    data = adapter_pair.with_suffix(".safetensors").read_bytes()
    tensors = tmp_path / "ad.safetensors"
    tensors.write_bytes(b"" if kind == "empty" else data[: len(data) // 2])
    header = json.loads(adapter_pair.with_suffix(".json").read_text())
    if not checksum:
        header.pop("tensors_sha256")
    (tmp_path / "ad.json").write_text(json.dumps(header))
    with pytest.raises(AdapterMismatch, match="torn" if checksum else "not a readable") as info:
        load_lora_weights(tiny_base(), tmp_path / "ad")
    assert str(tensors) in str(info.value)


# ----------------------------------------------------------------------------- packages
def _package(path, **kwargs):
    package = serialize_model(tiny_base(), OmegaConf.create({}), half=False)
    package["kwargs"] = {**package["kwargs"], **kwargs}
    torch.save(package, path)
    return path


@pytest.mark.parametrize("kwargs, expected", [
    ({"channels": 4096}, "describe a HTDemucs of"),
    ({"depth": 10 ** 6}, "depth is 1000000"),
    ({"t_layers": 10 ** 7}, "t_layers is 10000000"),
    ({"segment": fractions.Fraction(2 ** 200, 3)}, "Fraction of (201-bit|huge)"),
    ({"nfft": 2 ** 40}, "integer of 41 bits"),
    ({"t_cape_glob_loc_scale": list(range(1000))}, "list of 1000 items"),
])
def test_package_bombs_are_refused_before_building(tmp_path, kwargs, expected):
    from demucs_lora.model_files.packages import load_model_file
    path = _package(tmp_path / "bomb.th", **kwargs)
    before, start = peak_rss_kib(), time.time()
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model_file(path)
    assert str(path) in str(info.value)
    assert peak_rss_kib() - before < 300 * MB and time.time() - start < 60


def test_a_plain_package_still_loads(tmp_path):
    from demucs_lora.model_files.packages import load_model_file
    model = load_model_file(_package(tmp_path / "ok.th"))
    assert sum(p.numel() for p in model.parameters()) > 0


class _FractionBomb:
    def __reduce__(self):
        return (fractions.Fraction, ("1e2000000000",))


def test_bounded_fraction_refuses_the_exponent_bomb_while_unpickling():
    from demucs_lora.model_files.package_bounds import SAFE_FRACTION, bounded_fraction
    assert bounded_fraction("1/3") == fractions.Fraction(1, 3)
    assert bounded_fraction("7.8") == fractions.Fraction(39, 5)
    assert bounded_fraction(39, 5) == fractions.Fraction(39, 5)
    buf = io.BytesIO()
    torch.save({"segment": _FractionBomb()}, buf)
    start = time.time()
    with torch.serialization.safe_globals([SAFE_FRACTION]):
        with pytest.raises(Exception, match="short decimal"):
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert time.time() - start < 5
    with torch.serialization.safe_globals([SAFE_FRACTION]):  # real ones still load
        buf = io.BytesIO()
        torch.save({"segment": fractions.Fraction(39, 5)}, buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True)["segment"] == fractions.Fraction(39, 5)


def test_model_file_with_fraction_bomb_is_refused(tmp_path):
    """Through safe_load once its allowlist uses package_bounds.SAFE_FRACTION (in a child
    process with a timeout: unbounded, this computes a two-billion-digit integer)."""
    from demucs_lora.model_files import safe_load
    from demucs_lora.model_files.package_bounds import SAFE_FRACTION
    if SAFE_FRACTION not in safe_load.SAFE_GLOBALS:
        pytest.skip("safe_load.SAFE_GLOBALS still allowlists fractions.Fraction itself")
    package = serialize_model(tiny_base(), OmegaConf.create({}), half=False)
    package["kwargs"]["segment"] = _FractionBomb()
    torch.save(package, tmp_path / "bomb.th")
    code = ("import sys; from demucs_lora.model_files.packages import load_model_file\n"
            "try:\n    load_model_file(sys.argv[1])\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.th")],
                          capture_output=True, text=True, timeout=60)
    assert "ModelLoadError" in proc.stdout, proc.stdout + proc.stderr
