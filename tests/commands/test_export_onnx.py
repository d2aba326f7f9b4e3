"""tools.export --format onnx, run by onnxruntime through ``separate -n FILE.onnx``: the
same chunked overlap-add as PyTorch, stems within 1e-4 on a song of several segments; the
file is about the size of the weights; a bag is one graph per member plus its JSON."""
import pytest
import soundfile as sf
import torch

from helpers import FOUR, make_xp, tiny_htdemucs, write_mix

pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (make install)")


def export(*argv):
    from demucs_lora.commands.export import main
    main([str(a) for a in argv])


def separate(*argv):
    from demucs_lora.commands.separate import main
    main([str(a) for a in argv])


def stems(folder, track="song", sources=FOUR):
    return torch.stack([torch.from_numpy(sf.read(str(folder / track / f"{s}.wav"),
                                                 dtype="float32")[0].T.copy())
                        for s in sources])


@pytest.fixture(scope="module")
def xp(tmp_path_factory):
    xp = make_xp(tmp_path_factory.mktemp("onnx"), sig="onnx0001")
    write_mix(xp.root / "song.wav", seconds=3.3)  # 5 overlapping 1 s chunks
    return xp


def test_onnx_runs_like_pytorch_and_is_the_size_of_the_weights(xp, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(xp.root)
    export("onnx0001", "--format", "onnx", "-o", tmp_path / "rel", "--name", "tiny")
    printed = capsys.readouterr().out
    graph = tmp_path / "rel" / "tiny.onnx"
    assert f"python -m demucs_lora.commands.separate -n {graph} SONG" in printed
    from demucs_lora import get_model
    model = get_model("onnx0001")
    weights = sum(v.numel() * 4 for v in model.state_dict().values())
    assert graph.stat().st_size < 1.3 * weights, (graph.stat().st_size, weights)
    flags = ["--shifts", "0", "--float32", "--clip-mode", "none", "-d", "cpu"]
    separate("song.wav", "-n", graph, "-o", tmp_path / "sep", *flags)
    separate("song.wav", "-n", "onnx0001", "-o", tmp_path / "sep", *flags)
    ours, onnx = stems(tmp_path / "sep" / "onnx0001"), stems(tmp_path / "sep" / "tiny")
    assert ours.abs().max() > 1e-2
    assert (ours - onnx).abs().max() < 1e-4


def test_onnx_refusals(xp, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(xp.root)
    (tmp_path / "fake.onnx").write_bytes(b"not a graph")
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "-n", tmp_path / "fake.onnx", "-o", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: ModelLoadError:")
    assert "fake.onnx is not an ONNX model" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        separate("song.wav", "-n", tmp_path / "fake.onnx", "--adapter", "onnx0001",
                 "-o", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "drop --adapter" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # two graphs exported
def test_onnx_bag_one_graph_per_member(tmp_path, monkeypatch, capsys):
    from demucs.apply import BagOfModels
    from demucs_lora.training.checkpoint import save_best_model
    xp = make_xp(tmp_path, sig="onnxbag1")
    bag = BagOfModels([tiny_htdemucs(FOUR, seed=s).eval() for s in (21, 22)],
                      weights=[[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 0.5, 1.0]])
    save_best_model(bag, None, xp.cfg, xp.folder / "best.th")
    (xp.folder / "best.th").unlink()
    write_mix(tmp_path / "song.wav", seconds=1.4)
    monkeypatch.chdir(tmp_path)
    export("onnxbag1", "--format", "onnx", "-o", tmp_path / "rel")
    names = sorted(p.name for p in (tmp_path / "rel").iterdir())
    assert names == ["onnxbag1.onnx.json", "onnxbag1_m0.onnx", "onnxbag1_m1.onnx"]
    flags = ["--shifts", "0", "--float32", "--clip-mode", "none", "-d", "cpu"]
    separate("song.wav", "-n", tmp_path / "rel" / "onnxbag1.onnx.json", "-o", tmp_path / "s",
             *flags)
    separate("song.wav", "-n", "onnxbag1", "-o", tmp_path / "t", *flags)
    ours, onnx = stems(tmp_path / "t" / "onnxbag1"), stems(tmp_path / "s" / "onnxbag1")
    assert (ours - onnx).abs().max() < 1e-4 and ours.abs().max() > 1e-2
