"""The steps of one training run, in the order `demucs_lora.train.run` takes them.

Order matters: check the config (canonical keys only, demucs_lora.config.keys), load the
base (its sources and architecture decide the rest: demucs_lora.config.resolve),
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

from demucs_lora.config.run_config import RunConfig
from demucs_lora.core.errors import ConfigError, DatasetError
from demucs_lora.data.settings import DataConfig
from demucs_lora.core.files import atomic_write_text
from demucs_lora.training.dora_cli import DDP_NOTE

logger = logging.getLogger(__name__)


def pick_device(device: str, mixed_precision: tp.Union[bool, str]) -> torch.device:
    """The torch device of `device=auto|cpu|cuda` (ConfigError when it cannot run)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if mixed_precision == "fp16" and not cuda:
        raise ConfigError("mixed_precision=fp16 needs a CUDA device; use "
                          "mixed_precision=bf16 on CPU")
    return torch.device("cuda" if cuda else "cpu")


def verify_or_raise(data: DataConfig) -> None:
    """Run the dataset checks shared with tools.verify_dataset; raise with the report."""
    from demucs_lora.data.verify import verify_config
    report = verify_config(data, progress=distrib.is_master())
    if not report.ok:
        raise DatasetError(f"the dataset cannot be used for training (nothing was trained):"
                           f"\n{report.format()}")
    logger.info("Dataset OK:\n%s", report.format())


def build_loaders(cfg: RunConfig) -> tp.Tuple[dict, torch.nn.Module]:
    """(train/valid/test DataLoaders, the train augmentation) of the run's data."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from demucs_lora.data.stems import build_augment, get_datasets
    train_set, valid_set, test_set = get_datasets(cfg.dset)
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
        optimizer_steps(len(train), cfg.max_batches, cfg.optim.accumulate)
    if len(train) == 0:
        raise DatasetError(f"the train split gives no batch of {cfg.batch_size} segments of "
                           f"{cfg.dset.segment}s: add tracks or lower batch_size/dset.segment")
    loaders = {"train": train, "valid": DataLoader(valid_set, batch_size=1),
               "test": DataLoader(test_set, batch_size=1)}
    augment = build_augment(dict(cfg.dset.augment), cfg.dset.samplerate, cfg.dset.segment)
    return loaders, augment


def _calibration(loaders: dict, augment) -> tp.Callable[[], tp.Iterable]:
    """Gradient rank mode's calibration data: the train batches, augmented (on the CPU,
    where the model is built; `allocate_ranks` moves them to the model's device)."""
    from demucs_lora.data.stems import calibration_batches
    return lambda: calibration_batches(loaders["train"], augment, torch.device("cpu"))


def start_processes(device: torch.device, xp) -> None:
    """Join the DDP processes (gloo on CPU) and keep one train.log, written by rank 0."""
    distrib.init(backend="nccl" if device.type == "cuda" else "gloo")
    if not distrib.is_master():  # (Hydra's job logging opened it in every process)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
    logger.info("XP %s in %s", xp.sig, xp.folder)
    if os.environ.get(DDP_NOTE):
        logger.info(os.environ[DDP_NOTE])


def write_config_and_verify_data(config_yaml: str, data: DataConfig, folder: Path) -> None:
    """Rank 0 writes config.yaml (canonical keys, the base's architecture) and checks the
    data (generating synthetic data and the caches once); the others wait for it."""
    rng = torch.get_rng_state()  # the data checks below must not shift the init draws
    if distrib.is_master():
        atomic_write_text(folder / "config.yaml", config_yaml)
        verify_or_raise(data)
    if distrib.world_size() > 1:
        torch.distributed.barrier()
    torch.set_rng_state(rng)


def build_run_model(cfg: RunConfig, loaders: dict, augment, base,
                    folder: Path) -> torch.nn.Module:
    """The model to train (LoRA injected, ranks allocated), said in train.log; ranks.json
    when the ranks were allocated."""
    from demucs_lora.lora.inject import format_report
    from demucs_lora.models.build import build_model
    model, report = build_model(cfg.model, calibration=_calibration(loaders, augment),
                                base=base)
    if report.get("rank_table") is not None:
        logger.info("LoRA ranks (%s mode):\n%s", cfg.lora.lora_rank_mode,
                    format_report(report["layers"]))
        if distrib.is_master():
            atomic_write_text(folder / "ranks.json", json.dumps(
                {"mode": cfg.lora.lora_rank_mode, "ranks": report["ranks"],
                 "layers": report["layers"]}, indent=2))
    t = report["trainable"]
    logger.info("Trainable parameters: %d / %d (%.2f%%)%s", t["trainable"], t["total"],
                t["percent"], f", heads trained fully: {report['train_heads']}"
                if report["train_heads"] else "")
    logger.info(what_is_trained(cfg, report))
    return model


def what_is_trained(cfg: RunConfig, report: dict) -> str:
    """The train.log line that says what this run trains, of which base."""
    t, lora, base_name = report["trainable"], cfg.lora, cfg.base.continue_from
    base = (f"the base {base_name}" if base_name is not None
            else "a RANDOMLY INITIALISED model (no continue_from)")
    if lora.lora_rank > 0:
        extra = "".join(f", {k}={getattr(lora, k)}" for k, default in
                        (("lora_init", "default"), ("lora_scaling", "per_layer"))
                        if getattr(lora, k) != default)
        ratio = cfg.optim.lora_plus_ratio
        extra += f", LoRA+ ratio {ratio}" if ratio != 1.0 else ""
        what = (f"LoRA adapters (rank {lora.lora_rank}, {lora.lora_rank_mode} mode{extra}) "
                f"on {base}, frozen")
    else:
        what = f"every weight of {base} (full fine-tune)" if base_name is not None \
            else "a new model from scratch (every weight)"
    heads = f"; output heads trained fully: {report['train_heads']}" \
        if report.get("train_heads") else ""
    return (f"Training {what}: {t['trainable']} of {t['total']} parameters "
            f"({t['percent']:.2f}%){heads}")
