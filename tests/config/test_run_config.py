"""The typed run config (demucs_lora.config.run_config): built once from the composed config,
frozen, field for key with conf/, and each room's piece usable without Hydra."""
import dataclasses

import pytest
from omegaconf import OmegaConf

from demucs_lora.config.compose import compose
from demucs_lora.config.run_config import (OptimConfig, RunConfig, data_config, model_spec,
                                           optim_config, run_config)
from demucs_lora.data.settings import DataConfig
from demucs_lora.lora.config import LoraConfig
from demucs_lora.models.spec import BaseSpec, ModelSpec


def test_every_piece_is_typed_and_frozen():
    run = run_config(compose(["model=htdemucs_tiny", "htdemucs.lora_rank=4",
                              "continue_from=htdemucs", "optim.lr=1e-3",
                              "dset.sources=[drums,bass]", "weights=[1,2]"]))
    assert isinstance(run, RunConfig) and isinstance(run.optim, OptimConfig)
    assert run.lora == LoraConfig(lora_rank=4) and run.lora is run.model.lora
    assert run.base == BaseSpec(continue_from="htdemucs")
    assert run.model.sources == ("drums", "bass") == run.dset.sources
    assert run.optim.lr == 1e-3 and run.optim.betas == (0.9, 0.999)
    assert run.weights == (1.0, 2.0) and run.dset.metadata.is_absolute()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optim.lr = 1.0
    with pytest.raises(TypeError):   # nested mappings are read-only too
        run.dset.augment["flip"] = False


def test_a_conf_key_without_a_field_is_a_loud_error():
    """Defaults live once, in conf/: the YAML and the dataclass cannot drift apart."""
    cfg = compose([])
    OmegaConf.set_struct(cfg, False)
    cfg.optim.momentum = 0.9
    with pytest.raises(TypeError, match="momentum"):
        run_config(cfg)
    del cfg.optim["momentum"]
    del cfg.optim["loss"]
    with pytest.raises(TypeError, match="loss"):
        run_config(cfg)


def test_null_sources_mean_the_bases_and_a_new_model_gets_four():
    spec = model_spec(compose(["continue_from=htdemucs"]))
    assert spec.sources is None
    assert spec.sources_of(type("Base", (), {"sources": ["a", "b"]})()) == ["a", "b"]
    assert spec.sources_of(None) == ["drums", "bass", "other", "vocals"]
    assert data_config(compose([])).sources == ("drums", "bass", "other", "vocals")


def test_rooms_take_their_piece_without_hydra(tmp_path):
    """A DataConfig, an OptimConfig and a ModelSpec written by hand drive their rooms."""
    import torch
    from demucs_lora.data.stems import get_datasets
    from demucs_lora.models.build import build_model
    from demucs_lora.training.optim import build_optimizer
    data = DataConfig.of(sources=["drums", "bass"], samplerate=8000, segment=0.5, shift=0.5,
                         metadata=tmp_path / "meta",
                         synth={"tracks": 2, "valid_tracks": 1, "test_tracks": 1,
                                "seconds": 1, "domain": "A", "seed": 0, "stems": None})
    train, valid, _ = get_datasets(data)
    assert len(valid) == 1 and train[0].shape == (3, 2, 8000)
    spec = ModelSpec(base=BaseSpec(), sources=data.sources, lora=LoraConfig(lora_rank=2),
                     architecture=dict(samplerate=8000, audio_channels=2, segment=0.5,
                                       channels=8, depth=4, t_layers=1, nfft=1024),
                     lora_checkpoint=None)
    torch.manual_seed(0)
    model, report = build_model(spec)
    assert list(model.sources) == ["drums", "bass"] and report["ranks"]
    optimizer = build_optimizer(model, optim_config(lr=1e-2))
    assert optimizer.param_groups[0]["lr"] == 1e-2
