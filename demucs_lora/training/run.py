"""The steps of one training run, in the order `demucs_lora.train.run` takes them.

Order matters: check the config (canonical keys only, demucs_lora.config.keys), load the
base (its sources and architecture decide the rest: demucs_lora.training.run_config),
verify the data (one report of every problem), and only then build the model and hand
over to the solver, so bad input costs no compute.
"""
from __future__ import annotations

import json
import logging
import os
import typing as tp
from pathlib import Path

import torch
from dora import distrib
from omegaconf import DictConfig, OmegaConf

from demucs_lora.core.errors import ConfigError, DatasetError
from demucs_lora.core.files import atomic_write_text
from demucs_lora.training.dora_cli import DDP_NOTE

logger = logging.getLogger(__name__)


def pick_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and not cuda:
        raise ConfigError("mixed_precision=fp16 needs a CUDA device; use "
                          "mixed_precision=bf16 on CPU")
    return torch.device("cuda" if cuda else "cpu")


def verify_or_raise(cfg: DictConfig) -> None:
    """Run the dataset checks shared with tools.verify_dataset; raise with the report."""
    from demucs_lora.data.verify import verify_config
    report = verify_config(cfg, progress=distrib.is_master())
    if not report.ok:
        raise DatasetError(f"the dataset cannot be used for training (nothing was trained):"
                           f"\n{report.format()}")
    logger.info("Dataset OK:\n%s", report.format())


def build_loaders(cfg: DictConfig) -> tp.Tuple[dict, torch.nn.Module]:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from demucs_lora.data.stems import build_augment, get_datasets
    train_set, valid_set, test_set = get_datasets(cfg, list(cfg.dset.sources))
    world = distrib.world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number "
                              f"of processes ({world})")
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if world > 1 else None
    workers = cfg.misc.num_workers
    train = DataLoader(train_set, batch_size=cfg.batch_size // world, shuffle=sampler is None,
                       sampler=sampler, drop_last=True, num_workers=workers,
                       pin_memory=cfg.misc.pin_memory,
                       prefetch_factor=cfg.misc.prefetch_factor if workers else None,
                       persistent_workers=False)
    if distrib.is_master():
        from demucs_lora.config.values import segment_warnings
        durations = {name: meta["length"] / meta["samplerate"]
                     for name, meta in train_set.metadata.items()}
        for line in segment_warnings(durations, float(cfg.dset.segment)):
            logger.warning(line)
    if len(train):  # optim.accumulate batches per optimizer step: refused before any model
        from demucs_lora.training.epoch import optimizer_steps
        optimizer_steps(len(train), cfg.max_batches, int(cfg.optim.get("accumulate") or 1))
    if len(train) == 0:
        raise DatasetError(f"the train split gives no batch of {cfg.batch_size} segments of "
                           f"{cfg.dset.segment}s: add tracks or lower batch_size/dset.segment")
    loaders = {"train": train, "valid": DataLoader(valid_set, batch_size=1),
               "test": DataLoader(test_set, batch_size=1)}
    augment = build_augment(cfg.dset.augment, cfg.dset.samplerate, cfg.dset.segment)
    return loaders, augment


def _calibration(loaders: dict, augment) -> tp.Callable[[], tp.Iterable]:
    """Gradient rank mode's calibration data: the train batches, augmented (on the CPU,
    where the model is built; `allocate_ranks` moves them to the model's device)."""
    from demucs_lora.data.stems import calibration_batches
    return lambda: calibration_batches(loaders["train"], augment, torch.device("cpu"))


def _start_logging() -> None:
    if not distrib.is_master():  # one train.log, written by rank 0 (Hydra's job logging)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)


def prepare_run(cfg: DictConfig, xp) -> tp.Tuple[DictConfig, tp.Optional[torch.nn.Module],
                                                  torch.device]:
    """(the config that runs, the base or None, the device): config checked, processes
    joined, the base loaded and checked against the config. No data is touched yet."""
    from demucs_lora.config.values import check_base_values
    from demucs_lora.models.build import check_audio_format, load_base
    from demucs_lora.training.run_config import (apply_runtime_kwargs, data_banner,
                                                 prepare_config, resolve_precision,
                                                 resolve_with_base)
    cfg = prepare_config(cfg)  # checks the config (the LoRA keys: lora.config.LoraConfig)
    device = pick_device(cfg)
    cfg, notes = resolve_precision(cfg, device.type)
    distrib.init(backend="nccl" if device.type == "cuda" else "gloo")
    _start_logging()
    logger.info("XP %s in %s", xp.sig, xp.folder)
    if os.environ.get(DDP_NOTE):
        logger.info(os.environ[DDP_NOTE])
    torch.manual_seed(cfg.seed)
    # The base first (continue_from, its sample rate, sources, architecture): before any
    # data is made, so a wrong name or key costs nothing.
    base = load_base(cfg.continue_from, cfg.pretrained_repo, cfg.trust_remote_code, None,
                     cfg.get("bag_member"))
    if base is not None:
        check_audio_format(cfg, base)
    cfg, lines = resolve_with_base(cfg, base)
    if base is not None:
        apply_runtime_kwargs(base, cfg)
    check_base_values(cfg, base)  # source_init, layer_ranks globs against the base
    for line in notes + lines:
        logger.info(line)
    banner = data_banner(cfg)
    if banner:
        logger.warning(banner)
    return cfg, base, device


def write_config_and_verify_data(cfg: DictConfig, folder: Path) -> None:
    """Rank 0 writes config.yaml (canonical keys, the base's architecture) and checks the
    data (generating synthetic data and the caches once); the others wait for it."""
    rng = torch.get_rng_state()  # the data checks below must not shift the init draws
    if distrib.is_master():
        atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        verify_or_raise(cfg)
    if distrib.world_size() > 1:
        torch.distributed.barrier()
    torch.set_rng_state(rng)


def build_run_model(cfg: DictConfig, loaders: dict, augment, base,
                    folder: Path) -> torch.nn.Module:
    """The model to train (LoRA injected, ranks allocated), said in train.log; ranks.json
    when the ranks were allocated."""
    from demucs_lora.lora.inject import format_report
    from demucs_lora.models.build import build_model
    from demucs_lora.training.run_config import what_is_trained
    model, report = build_model(cfg, calibration=_calibration(loaders, augment), base=base)
    if report.get("rank_table") is not None:
        logger.info("LoRA ranks (%s mode):\n%s", cfg.htdemucs.lora_rank_mode,
                    format_report(report["layers"]))
        if distrib.is_master():
            atomic_write_text(folder / "ranks.json", json.dumps(
                {"mode": cfg.htdemucs.lora_rank_mode, "ranks": report["ranks"],
                 "layers": report["layers"]}, indent=2))
    t = report["trainable"]
    logger.info("Trainable parameters: %d / %d (%.2f%%)%s", t["trainable"], t["total"],
                t["percent"], f", heads trained fully: {report['train_heads']}"
                if report["train_heads"] else "")
    logger.info(what_is_trained(cfg, report))
    return model
