"""The public API: lazy import, name resolution, and the hot-swap example of api.py run
as written (two adapters on one base, no reload)."""
import copy
import re
import subprocess
import sys
import textwrap

import pytest
import soundfile as sf
import torch
from demucs.states import serialize_model

from helpers import adapted_copy, tiny_htdemucs, write_mix



def docstring_example():
    import demucs_lora.api as api
    block = api.__doc__.split("base is loaded once::", 1)[1].split("\n\nSwapping", 1)[0]
    return textwrap.dedent(block).strip("\n")


def test_import_is_light_and_exports_the_api():
    code = ("import sys, demucs_lora as d; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'demucs' not in sys.modules; print(d.__version__, sorted(d.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0.1.0")
    for name in ("get_model", "load_lora_weights", "get_lora_state", "save_adapter",
                 "merge_lora", "unmerge_lora", "remove_lora", "quantize", "apply_model"):
        assert name in out.stdout


def test_public_quantize_is_the_int8_function_and_apply_model_is_demucs():
    import demucs_lora
    from demucs.apply import apply_model
    from demucs_lora.model_files import int8
    assert demucs_lora.quantize is int8.quantize
    assert demucs_lora.apply_model is apply_model
    package = demucs_lora.quantize(tiny_htdemucs().eval(), bits=8)
    assert package["quantized"]["bits"] == 8


def test_hot_swap_example_runs_as_written(xp, tmp_path, monkeypatch):
    from demucs_lora import get_model, save_adapter
    from demucs_lora.inference.separation import separate_tensor
    code = docstring_example()
    monkeypatch.chdir(tmp_path)
    base = tiny_htdemucs().eval()
    (tmp_path / "release_models").mkdir()
    torch.save(serialize_model(base, xp.cfg, half=False), "release_models/base.th")
    for seed, name in ((11, "piano"), (12, "guitar")):
        save_adapter(adapted_copy(base, seed), tmp_path / "adapters" / name)
    wav = write_mix(tmp_path / "song.wav")
    loads = []
    import demucs_lora.models.load
    original = demucs_lora.models.load.load_model
    monkeypatch.setattr(demucs_lora.models.load, "load_model",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    exec(compile(code, "api_example", "exec"), {})
    assert len(loads) == 1  # the base was loaded once
    names = ("piano", "guitar")
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == sorted(
        ["song.wav", *(f"{n}_{s}.wav" for n in names for s in base.sources)])
    outputs = {name: torch.stack([torch.from_numpy(sf.read(f"{name}_{s}.wav", dtype="float32")[0]
                                                   .T.copy()) for s in base.sources])
               for name in names}
    assert all(out.shape == (len(base.sources), *wav.shape) for out in outputs.values())
    assert (outputs["piano"] - outputs["guitar"]).abs().max() > 1e-3
    # the second adapter was swapped in place: its stems are those of a fresh load
    fresh = get_model("base", repo="release_models", adapter="adapters/guitar")
    want = separate_tensor(fresh, wav, shifts=0)
    assert (outputs["guitar"] - want).abs().max() < 2 / 2 ** 15  # sf.write: 16-bit PCM


def merged_state(model):
    """The plain weights a LoRA model computes with (adapter folded in, scaling included),
    compared instead of running forwards: same weights, same outputs."""
    from demucs_lora import remove_lora
    return remove_lora(copy.deepcopy(model)).state_dict()


def same_weights(a, b, tol=1e-6):
    sa, sb = merged_state(a), merged_state(b)
    assert sa.keys() == sb.keys()
    return all((sa[k] - sb[k]).abs().max() <= tol for k in sa if sa[k].is_floating_point())


def test_swap_in_place_matches_fresh_load_and_back(xp):
    from demucs_lora import get_model, load_lora_weights, save_adapter
    from demucs_lora.api import can_swap, with_adapter
    folder = xp.folder
    model = load_lora_weights(get_model(xp.base_path), folder / "lora_best")
    fresh_best = get_model(xp.base_path, adapter=folder / "lora_best")
    fresh_last = get_model(xp.base_path, adapter=folder / "lora_last")
    assert can_swap(model, folder / "lora_last")
    assert load_lora_weights(model, folder / "lora_last") is model  # swapped in place
    assert same_weights(model, fresh_last) and not same_weights(model, fresh_best)
    load_lora_weights(model, folder / "lora_best")
    assert same_weights(model, fresh_best)
    # another alpha: not swappable in place (the layers' scaling would be wrong), so
    # with_adapter starts again from a copy of the base
    other = xp.root / "alpha32"
    save_adapter(adapted_copy(tiny_htdemucs().eval(), 21, alpha=32.0), other)
    assert not can_swap(model, other)
    result = with_adapter(get_model(xp.base_path), other, current=model)
    assert result is not model and not result.training
    assert same_weights(result, get_model(xp.base_path, adapter=other))
    assert same_weights(model, fresh_best)  # the current model was left alone


def test_get_model_resolves_file_repo_sig_and_quantized(xp, tmp_path, monkeypatch):
    from demucs_lora import get_model
    from demucs_lora.lora.inject import has_lora, iter_lora_layers
    from demucs_lora.core.files import atomic_torch_save
    from demucs_lora.model_files.int8 import quantize
    monkeypatch.chdir(xp.root)
    by_sig = get_model(xp.sig)
    by_path = get_model(xp.folder / "best.th")
    assert not by_sig.training and not has_lora(by_sig)
    for (k, a), b in zip(by_sig.state_dict().items(), by_path.state_dict().values()):
        assert torch.equal(a, b), k
    repo = tmp_path / "repo"
    atomic_torch_save(quantize(by_sig), repo / "small.th")
    small = get_model("small", repo=repo)
    assert next(small.parameters()).dtype == torch.float32
    with_adapter = get_model(xp.base_path, adapter=xp.sig)  # an XP sig means its lora_best
    assert has_lora(with_adapter) and not with_adapter.training
    assert all(not layer.merged for _, layer in iter_lora_layers(with_adapter))


def test_unknown_name_lists_recent_xps(xp, monkeypatch):
    from demucs_lora import get_model
    from demucs_lora.core.errors import AdapterMismatch, ModelLoadError
    monkeypatch.chdir(xp.root)
    with pytest.raises(ModelLoadError, match=re.escape(xp.sig)) as exc:
        get_model("nope")
    assert "recent XPs" in str(exc.value) and "repo" in str(exc.value)
    with pytest.raises(ModelLoadError, match="adapter"):
        get_model(xp.base_path, adapter="missing/adapter")
    with pytest.raises(AdapterMismatch, match="different base(.|\n)*continue_from"):
        get_model(xp.sig, adapter=xp.folder / "lora_best")  # best.th is already merged


@pytest.mark.slow  # a subprocess that trains 4 steps (~1 min on 2 cores)
def test_own_training_loop_example_runs_as_written(tmp_path):
    """docs/api.md's plain PyTorch loop: inject, train, save, reload onto a fresh base."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    doc = (repo / "docs" / "api.md").read_text()
    block = doc.split("## Your own training loop", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    (tmp_path / "demucs_lora").mkdir()
    (tmp_path / "demucs_lora" / "assets").symlink_to(repo / "demucs_lora" / "assets")
    # -P: the cwd's demucs_lora/ (the assets link) must not shadow the installed package
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    trained, gap = re.search(r"trained (\d+) parameters; reloaded adapter max abs diff (\S+)",
                             out.stdout).groups()
    assert int(trained) > 0 and float(gap) < 1e-5, out.stdout
    assert (tmp_path / "my_adapter.safetensors").exists()
    assert (tmp_path / "my_adapter.json").exists()


def test_inject_lora_takes_a_lora_config_and_returns_the_model():
    from demucs_lora import LoraConfig, inject_lora
    from demucs_lora.core.errors import ConfigError
    from demucs_lora.lora.inject import lora_config
    model = tiny_htdemucs()
    total = sum(p.numel() for p in model.parameters())
    assert inject_lora(model, LoraConfig(lora_rank=4)) is model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert set(lora_config(model).ranks.values()) <= {1, 2, 3, 4} and total < sum(
        p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="lora_rank=0"):
        inject_lora(tiny_htdemucs(), LoraConfig(lora_rank=0))
    with pytest.raises(ConfigError, match="htdemucs.lora_rank_mode"):
        LoraConfig(lora_rank=4, lora_rank_mode="magic")


def test_inject_lora_gradient_modes_take_batches_and_start_at_the_base():
    """Gradient ranks + LoRA-GA through the public entry: batches are required, and the
    offset base makes the model's output at step 0 the base's."""
    from demucs_lora import LoraConfig, inject_lora
    from demucs_lora.core.errors import ConfigError
    config = LoraConfig(lora_rank=4, lora_rank_mode="gradient", lora_init="gradient",
                        lora_gradient_batches=1)
    with pytest.raises(ConfigError, match="pass batches="):
        inject_lora(tiny_htdemucs(), config)
    with pytest.raises(ConfigError, match="lora_rank_adaptation"):
        inject_lora(tiny_htdemucs(), LoraConfig(lora_rank=4, lora_rank_adaptation=True))
    base = tiny_htdemucs().eval()
    sources = torch.randn(1, len(base.sources), 2, int(base.segment * base.samplerate),
                          generator=torch.Generator().manual_seed(0))
    mix = sources.sum(1)
    with torch.no_grad():
        before = base(mix)
    model = inject_lora(copy.deepcopy(base), config, batches=[(mix, sources)]).eval()
    with torch.no_grad():
        after = model(mix)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
