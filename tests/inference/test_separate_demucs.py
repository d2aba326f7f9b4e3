"""demucs-lora separate == ``python -m demucs`` for the same model and flags, file by file.

The stock CLI runs in a subprocess on an exported tiny model (``--repo DIR -n NAME``);
ours runs in-process on the same file. Both are deterministic at ``--shifts 0``, so every
stem file must be byte-identical (wav 16/24/float32, mp3, flac: the encoders are demucs'
own, the samples must be equal), with the same names in the same tree. demucs 4.1's CLI
imports no torchaudio (it reads audio with sphn, writes with its own encoders), so it is
run as it is, with no shim.
"""
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import FOUR, tiny_htdemucs, write_mix

FLAG_SETS = [
    [],                                                          # 16-bit wav, rescale
    ["--int24", "--clip-mode", "none", "--segment", "1", "-j", "2"],
    ["--float32", "--clip-mode", "clamp", "--overlap", "0.5"],
    ["--mp3", "--mp3-bitrate", "128", "--two-stems", "vocals",
     "--filename", "{stem}-{track}.{trackext}.{ext}"],
    ["--flac", "--int24", "--two-stems", "drums", "--other-method", "minus"],
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """release/tinysep.th (a tiny model, loud enough that rescale/clamp matter) + 2 songs."""
    import soundfile as sf
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    root = tmp_path_factory.mktemp("sepdemucs")
    model = tiny_htdemucs(FOUR, seed=5).eval()
    (root / "release").mkdir()
    torch.save(serialize_model(model, OmegaConf.create(), half=False), root / "release" / "tinysep.th")
    for i, (name, seconds) in enumerate((("a.wav", 1.5), ("b b.wav", 0.4))):
        wav = write_mix(root / name, seconds=seconds, seed=i) * 12  # peaks above 1: clipping
        sf.write(str(root / name), wav.T.numpy(), 44100, subtype="FLOAT")
    return root


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # the stock demucs CLI in a subprocess, once per flag set
@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f) or "defaults")
def test_same_files_as_stock_demucs(repo, tmp_path, flags):
    if "--flac" in flags and shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is missing: `make install` installs it (apt) for --flac")
    from demucs_lora.commands.separate import main
    songs = [str(repo / "a.wav"), str(repo / "b b.wav")]
    common = ["--repo", str(repo / "release"), "-n", "tinysep", "--shifts", "0",
              "-d", "cpu", *flags]
    proc = subprocess.run([sys.executable, "-m", "demucs", *songs, "-o", str(tmp_path / "stock"),
                           *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    main([*songs, "-o", str(tmp_path / "ours"), *common])
    stock, ours = tree(tmp_path / "stock"), tree(tmp_path / "ours")
    assert list(ours) == list(stock), (list(ours), list(stock))
    assert len(stock) == 2 * (2 if "--two-stems" in flags else 4)
    for name in stock:
        assert ours[name] == stock[name], f"{name} differs from demucs' file"
