"""tools.export: the stock demucs CLI loads what we write, and it separates like the
unmerged adapter; half / int8 sizes; refusals (overwrite, bad name, unknown XP).

The XP is built by hand (helpers.make_xp: nothing trained, LoRA with random B on a tiny
base), the way the solver lays it out.
"""
import os
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
import torch
from helpers import REPO, make_xp, our_stems, write_mix
from model_layouts import run_offline


def export(*argv):
    from demucs_lora.commands.export import main
    main([str(a) for a in argv])



@pytest.fixture
def in_root(xp, monkeypatch):
    monkeypatch.chdir(xp.root)
    return xp.root


@pytest.mark.slow  # the stock demucs CLI in a subprocess
def test_stock_cli_matches_unmerged_adapter_and_lora_files_reload(xp, in_root, tmp_path,
                                                                  capsys):
    from demucs_lora import get_model, load_lora_weights
    out = tmp_path / "release"
    export(xp.sig, "--name", "tinyf32", "-o", out, "--include-lora")
    printed = capsys.readouterr().out
    assert (out / "tinyf32.th").is_file()
    assert "tinyf32.lora.safetensors" in printed and "% of tinyf32.th" in printed
    mix = tmp_path / "mix.wav"
    write_mix(mix)
    sep = tmp_path / "sep"
    proc = subprocess.run([sys.executable, "-m", "demucs", "--repo", str(out), "-n", "tinyf32",
                           str(mix), "-o", str(sep), "--shifts", "0", "--float32",
                           "--clip-mode", "none", "-d", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    unmerged = get_model(xp.base_path, adapter=xp.folder / "lora_best")
    ours = our_stems(unmerged, mix)
    assert ours.abs().max() < 0.9  # float wav clamps to [-1, 1]: stay clear of it
    base, best = get_model(xp.base_path).state_dict(), get_model(xp.sig).state_dict()
    assert max((base[k] - best[k]).abs().max() for k in base) > 1e-3  # adapter merged in
    for i, source in enumerate(unmerged.sources):
        data, sr = sf.read(str(sep / "tinyf32" / "mix" / f"{source}.wav"), dtype="float32")
        stock = torch.from_numpy(data.T.copy())
        assert sr == 44100 and stock.shape == ours[i].shape
        assert (stock - ours[i]).abs().max() < 1e-4, source
    reloaded = load_lora_weights(get_model(xp.base_path), out / "tinyf32.lora")
    assert (our_stems(reloaded, mix) - ours).abs().max() < 1e-6


def test_half_and_int8_sizes_and_loading(xp, in_root, tmp_path, capsys):
    from demucs_lora import get_model
    out = tmp_path / "rel"
    export(xp.sig, "--name", "f32", "-o", out)
    export(xp.sig, "--name", "f16", "-o", out, "--half")
    capsys.readouterr()
    export(xp.sig, "--name", "q8", "-o", out, "--quantize", "8")
    printed = capsys.readouterr().out
    size = {n: (out / f"{n}.th").stat().st_size for n in ("f32", "f16", "q8")}
    assert 0.4 < size["f16"] / size["f32"] < 0.6
    assert size["q8"] / size["f32"] < 0.35
    assert "nSDR on 1 valid track(s)" in printed and "change" in printed
    assert "cannot read it" in printed
    ref = get_model("f32", repo=out).state_dict()
    for name, tol in (("f16", 1e-3), ("q8", 1e-2)):  # relative to each tensor's peak
        state = get_model(name, repo=out).state_dict()
        assert all(state[k].dtype == ref[k].dtype for k in ref)  # loaded back as float32
        err = max(((state[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-8)).item()
                  for k in ref if ref[k].is_floating_point())
        assert 0 < err < tol, (name, err)


def test_adapter_last_is_base_plus_lora_last_merged(xp, in_root, tmp_path):
    """Same weights, same outputs: compared on the weights (no forward needed)."""
    from demucs_lora import get_model, remove_lora
    out = tmp_path / "rel"
    export(xp.sig, "--name", "last", "-o", out, "--adapter", "last")
    got = get_model("last", repo=out).state_dict()
    want = remove_lora(get_model(xp.base_path, adapter=xp.folder / "lora_last")).state_dict()
    best = get_model(xp.sig).state_dict()
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max() for k in got) < 1e-6
    assert max((got[k] - best[k]).abs().max() for k in got) > 1e-3


@pytest.mark.slow  # tools.export in a subprocess
def test_overwrite_refused_without_force_and_nothing_written(xp, in_root, tmp_path):
    out = tmp_path / "rel"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    export(xp.sig, "--name", "once", "-o", out)
    info = (out / "once.th").stat()
    stamp = (info.st_ino, info.st_mtime_ns)
    cmd = [sys.executable, "-m", "tools.export", xp.sig, "--name", "once", "-o", str(out),
           "--include-lora"]
    again = subprocess.run(cmd, capture_output=True, text=True,
                           cwd=in_root, env=env, timeout=300)
    assert again.returncode != 0
    assert str(out / "once.th") in again.stderr and "--force" in again.stderr
    info = (out / "once.th").stat()
    assert (info.st_ino, info.st_mtime_ns) == stamp
    assert not (out / "once.lora.safetensors").exists()  # all outputs checked first
    export(xp.sig, "--name", "once", "-o", out, "--force")
    assert (out / "once.th").stat().st_ino != stamp[0]  # replaced (atomically)


def test_several_sigs_checked_before_any_write(xp, in_root, tmp_path, capsys):
    other = make_xp(xp.root, seed=7)
    out = tmp_path / "rel"
    out.mkdir()
    (out / f"{other.sig}.th").write_bytes(b"keep")
    with pytest.raises(SystemExit) as exc:
        export(xp.sig, other.sig, "-o", out)
    assert exc.value.code == 1
    assert f"{other.sig}.th" in capsys.readouterr().err
    assert not (out / f"{xp.sig}.th").exists()
    export(xp.sig, other.sig, "-o", out, "--force")
    assert (out / f"{xp.sig}.th").stat().st_size > 1000
    assert (out / f"{other.sig}.th").stat().st_size > 1000


def test_unknown_sig_lists_recent_xps(xp, in_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export("deadbeef", "-o", tmp_path / "rel")
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error: ModelLoadError:")
    assert err.strip().count("\n") == 0
    assert "unknown XP signature 'deadbeef'" in err and xp.sig in err
    listed = err.split("most recent XPs: ")[1].strip().split(", ")
    assert 1 <= len(listed) <= 5


@pytest.mark.parametrize("name", ["my-model", "a/b"])
def test_bad_names_refused(xp, in_root, tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exc:
        export(xp.sig, "--name", name, "-o", tmp_path / "rel")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ConfigError:")  # a config error
    assert err.strip().count("\n") == 0
    assert repr(name) in err
    if "-" in name:
        assert "NAME-CHECKSUM" in err and "my_model" in err
    assert not (tmp_path / "rel").exists()


@pytest.mark.slow  # demucs' hub loader in a subprocess
def test_hf_format_export_loads_in_demucs_and_matches_th_export(xp, in_root, tmp_path,
                                                               monkeypatch, capsys):
    """--format hf writes NAME.yaml + SIG.safetensors as demucs 4.1's hub layout; demucs'
    own loader and `demucs.pretrained.get_model("hf://...")` offline read it, outputs equal
    the .th export within float16 tolerance (--half)."""
    from demucs.hf import load_safetensors_model
    from demucs_lora import get_model
    out = tmp_path / "hf"
    export(xp.sig, "--name", "tinyhf", "-o", out, "--format", "hf", "--half")
    assert "hf://NAMESPACE/tinyhf" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"{xp.sig}.safetensors", "tinyhf.yaml"]
    export(xp.sig, "--name", "tinyth", "-o", tmp_path / "th")
    x = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = get_model("tinyth", repo=tmp_path / "th")(x)
        theirs = load_safetensors_model(out / f"{xp.sig}.safetensors").eval()(x)
        ours = get_model("tinyhf", repo=out)(x)
    scale = ref.abs().max()
    assert (theirs - ref).abs().max() / scale < 1e-2 and torch.equal(theirs, ours)
    # Published on a hub repo, demucs finds it by name (HF cache laid out by hand, offline).
    snap = tmp_path / "cache" / "hub" / "models--me--Demucs-tinyhf"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("r1")
    (snap / "snapshots").mkdir()
    shutil.copytree(out, snap / "snapshots" / "r1")
    torch.save(x, tmp_path / "x.pt")
    torch.save(ours, tmp_path / "ours.pt")
    code = ("import torch; from demucs.pretrained import get_model; "
            "m = get_model('hf://me/tinyhf').models[0]; "
            f"x, ref = torch.load('{tmp_path / 'x.pt'}'), torch.load('{tmp_path / 'ours.pt'}'); "
            "assert (m(x).detach() - ref).abs().max() < 1e-5")
    run_offline(code, tmp_path / "cache")
    with pytest.raises(SystemExit):
        export(xp.sig, "-o", tmp_path / "q", "--format", "hf", "--quantize", "8")
    assert "drop --quantize" in capsys.readouterr().err
