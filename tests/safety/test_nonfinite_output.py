"""Nothing non-finite is served with exit 0: an adapter with huge but finite values makes
the forward overflow; separate and test_pretrained refuse the NaN stems, naming the model
and the adapter, and write nothing."""
import pytest
import torch
from helpers import make_xp, tiny_htdemucs, write_mix

from demucs_lora.core.errors import ModelLoadError


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """An XP and an adapter on its base whose B factors are 1e30 (finite)."""
    from demucs_lora import save_adapter
    from helpers import adapted_copy
    xp = make_xp(tmp_path_factory.mktemp("huge"))
    model = adapted_copy(tiny_htdemucs().eval(), 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_b" in name.lower():
                p.fill_(1e30)
    save_adapter(model, xp.root / "adapters" / "huge")
    write_mix(xp.root / "song.wav")
    return xp


def test_separate_refuses_nan_stems_and_writes_nothing(huge, tmp_path, monkeypatch):
    from demucs_lora.commands.separate import main
    monkeypatch.chdir(huge.root)
    out = tmp_path / "sep"
    with pytest.raises(SystemExit) as info:
        main(["song.wav", "--base", str(huge.base_path), "--adapter", "adapters/huge",
              "-o", str(out), "--shifts", "0"])
    assert info.value.code == 1
    assert not list(out.rglob("*.wav"))


def test_the_error_names_model_adapter_and_stems(huge, tmp_path, monkeypatch):
    from demucs_lora.commands.separate import get_parser, run
    monkeypatch.chdir(huge.root)
    args = get_parser().parse_args(["song.wav", "--base", str(huge.base_path), "--adapter",
                                    "adapters/huge", "-o", str(tmp_path), "--shifts", "0"])
    with pytest.raises(ModelLoadError) as info:
        run(args)
    message = str(info.value)
    assert f"model {huge.base_path} with adapter " in message and "huge" in message
    assert "outputs NaN/inf in stem(s) drums" in message and "song.wav" in message


def test_test_pretrained_refuses_nan_output(huge, monkeypatch):
    from demucs_lora.commands import score_model as test_pretrained
    monkeypatch.chdir(huge.root)
    args = test_pretrained.get_parser().parse_intermixed_args(
        ["-n", "base.th", "--adapter", "adapters/huge", "--split", "valid", "--no-progress",
         f"dset.wav={huge.data}", "dset.segment=0.5"])
    with pytest.raises(ModelLoadError, match=r"model base.th with adapter adapters/huge "
                                             "on .* outputs NaN/inf"):
        test_pretrained.run(args)
