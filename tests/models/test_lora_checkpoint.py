"""`lora_checkpoint=PATH` starts training from an adapter (strictly checked), and
`--lora_checkpoint` is a spelling of `--adapter` in the test and separate CLIs."""
import pytest
import torch
from demucs.states import serialize_model
from safetensors.torch import load_file

from helpers import synth_stems, tiny_htdemucs, xp_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpt")
    data = synth_stems(root / "data")
    cfg = xp_config(root, root / "base.th", data)
    torch.save(serialize_model(tiny_htdemucs().eval(), cfg, half=False), root / "base.th")
    torch.save(serialize_model(tiny_htdemucs(seed=9).eval(), cfg, half=False), root / "base9.th")
    trained(cfg, root / "adapter")
    trained(cfg, root / "other_base", continue_from=str(root / "base9.th"))
    return root, cfg


def trained(cfg, path, **overrides):
    """An adapter as a run of this config writes it (B moved away from zero)."""
    from demucs_lora import save_adapter
    model, _ = build(cfg, **overrides)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(model, path)


def build(cfg, **overrides):
    from omegaconf import OmegaConf
    from demucs_lora.models.build import build_model
    from demucs_lora.config.run_config import model_spec
    cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return build_model(model_spec(cfg))


def test_training_starts_from_the_adapter(setup):
    root, cfg = setup
    model, report = build(cfg, lora_checkpoint=str(root / "adapter"))
    assert report["lora_checkpoint"] == str(root / "adapter")
    want = load_file(root / "adapter.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in want.items())
    assert all(params[k].requires_grad for k in want)


def test_the_adapter_is_checked_strictly(setup):
    from demucs_lora.core.errors import AdapterMismatch, ConfigError
    root, cfg = setup
    with pytest.raises(AdapterMismatch, match="lora_checkpoint=.*different base model"):
        build(cfg, lora_checkpoint=str(root / "other_base"))
    with pytest.raises(AdapterMismatch, match=r"ranks of \d+ layer\(s\) .*model 3, adapter 2"):
        build(cfg, lora_checkpoint=str(root / "adapter"), htdemucs={"lora_rank": 3})
    with pytest.raises(AdapterMismatch, match="not an adapter"):
        build(cfg, lora_checkpoint=str(root / "lora.pth"))
    with pytest.raises(ConfigError, match="lora_rank=0"):
        build(cfg, lora_checkpoint=str(root / "adapter"), htdemucs={"lora_rank": 0})


def test_lora_checkpoint_is_a_spelling_of_adapter():
    from demucs_lora.commands.score_model import get_parser as test_parser
    from demucs_lora.commands.separate import get_parser as separate_parser
    args = test_parser().parse_args(["-n", "base", "--lora_checkpoint", "a/lora_best"])
    assert args.adapter == "a/lora_best"
    args = separate_parser().parse_args(["song.wav", "--base", "b", "--lora_checkpoint", "x",
                                         "--adapter", "y"])
    assert args.adapter == ["x", "y"]
