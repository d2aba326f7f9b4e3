"""Hydra + Dora entry point: `dora run [overrides]` finds this module's `main`.

Order matters: check the config (canonical keys only, demucs_lora.config.keys), load the
base (its sources and architecture decide the rest: demucs_lora.training.run_config), verify the
data (one report of every problem), and only then build the model and hand over to the
solver, so bad input costs no compute. `dora run -d` without a GPU and `-f NAME` for a
model name: demucs_lora.training.dora_cli.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import typing as tp
from pathlib import Path

import torch
from dora import distrib, get_xp
from dora.hydra import HydraMain
from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.keys import canonical_checked, hydra_error, is_hydra_error, prepare_argv
from demucs_lora.training.dora_cli import (DDP_NOTE, argv_from_model, install_cpu_ddp_fallback,
                       install_excepthook)
from demucs_lora.training.dora_files import check_job_pickle
from demucs_lora.core.errors import DatasetError, DemucsLoRAError, exit_on_user_error
from demucs_lora.lora.rank_adaptation import check_config as check_rank_adaptation
from demucs_lora.core.files import atomic_write_text, remove_stale_temps
from demucs_lora.training.xp_guard import StopSignals, XPLock, die_with_launcher

logger = logging.getLogger("demucs_lora")


def pick_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DemucsLoRAError("device=cuda but no CUDA device is visible; use device=cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and not cuda:
        raise DemucsLoRAError("mixed_precision=fp16 needs a CUDA device; use "
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
        raise DemucsLoRAError(f"batch_size={cfg.batch_size} must be divisible by the number "
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
    if len(train) == 0:
        raise DatasetError(f"the train split gives no batch of {cfg.batch_size} segments of "
                           f"{cfg.dset.segment}s: add tracks or lower batch_size/dset.segment")
    loaders = {"train": train, "valid": DataLoader(valid_set, batch_size=1),
               "test": DataLoader(test_set, batch_size=1)}
    augment = build_augment(cfg.dset.augment, cfg.dset.samplerate, cfg.dset.segment)
    return loaders, augment


def _calibration(loaders: dict, augment) -> tp.Callable[[], tp.Iterable]:
    from demucs_lora.data.stems import augment_batch
    def batches():
        for batch in loaders["train"]:
            batch = augment_batch(augment, batch)
            yield batch[:, 0], batch[:, 1:]
    return batches


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing per encoder/decoder/transformer layer (memory for time)."""
    from torch.utils.checkpoint import checkpoint
    layers = []
    for member in getattr(model, "models", [model]):  # every member of a bag
        layers += [*member.encoder, *member.decoder, *getattr(member, "tencoder", []),
                   *getattr(member, "tdecoder", [])]
        if getattr(member, "crosstransformer", None) is not None:
            layers += [*member.crosstransformer.layers, *member.crosstransformer.layers_t]
    for layer in layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = wrapped


def _start_logging(folder: Path) -> None:
    if not distrib.is_master():  # one train.log, written by rank 0 (Hydra's job logging)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)


def run(cfg: DictConfig) -> tp.List[dict]:
    from demucs_lora.config.values import check_base_values
    from demucs_lora.lora.inject import format_report
    from demucs_lora.models.build import build_model, check_audio_format, load_base
    from demucs_lora.training.run_config import (apply_runtime_kwargs, data_banner, prepare_config,
                             resolve_precision, resolve_with_base, what_is_trained)
    from demucs_lora.training.solver import Solver
    xp = get_xp()
    folder = Path(xp.folder)
    cfg = prepare_config(cfg)
    check_rank_adaptation(cfg)
    device = pick_device(cfg)
    cfg, notes = resolve_precision(cfg, device.type)
    distrib.init(backend="nccl" if device.type == "cuda" else "gloo")
    _start_logging(folder)
    logger.info("XP %s in %s", xp.sig, folder)
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
    rng = torch.get_rng_state()  # the data checks below must not shift the init draws
    if distrib.is_master():  # the config that runs: canonical keys, the base's architecture
        atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        verify_or_raise(cfg)  # generates synthetic data and the caches once
    if distrib.world_size() > 1:
        torch.distributed.barrier()
    torch.set_rng_state(rng)
    loaders, augment = build_loaders(cfg)
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
    if cfg.misc.show:
        print(model)
        return []
    if cfg.enable_checkpointing:
        enable_checkpointing(model)
    solver = Solver(cfg, model, loaders, augment, device)
    return solver.run()


def _untrusted_override(arg: str) -> bool:
    """Overrides an XP folder may not set for the user: trust_remote_code (full unpickling)
    and Hydra's own settings (hydra.callbacks & co. instantiate arbitrary classes)."""
    key = str(arg).split("=", 1)[0].strip().lstrip("+~")
    return (key == "trust_remote_code" or key.startswith(("hydra.", "hydra/"))
            or key == "hydra" or "_target_" in key)


def trusted_argv_from_xp(argv: tp.Sequence[str], source: str) -> tp.List[str]:
    """A stored argv (an XP's .argv.json, read by `dora run -f SIG`) without what only the
    user's own command line may set; says what it dropped."""
    kept = [a for a in argv if not _untrusted_override(a)]
    dropped = [a for a in argv if _untrusted_override(a)]
    if dropped:
        print(f"demucs-lora: ignoring {dropped} from {source}: an XP folder cannot set these;"
              " pass them on your own command line if you mean them", file=sys.stderr)
    return kept


class _LoRAHydraMain(HydraMain):
    """Dora's Hydra main that speaks the guide's dialect: alias keys and JSON-style dicts
    normalized before Dora signs the XP, unknown keys refused, Hydra's errors in one
    screen, `dset=wav` (a `???` default) signed, and `-f NAME` for a model name.
    An XP folder is untrusted input: `dora run -f SIG` never inherits trust_remote_code
    (or hydra.*) from the XP's .argv.json, and an XP's job.pkl naming anything but the
    submitit job classes is refused before Dora unpickles it."""

    def get_xp(self, argv: tp.Sequence[str]):
        argv = prepare_argv(argv)
        try:
            xp = super().get_xp(argv)
        except Exception as exc:  # hydra/omegaconf composition errors: one screen
            if not is_hydra_error(exc):
                raise
            raise hydra_error(exc) from None
        canonical_checked(xp.cfg, argv)
        check_job_pickle(xp.folder, self.dora.shep.job_file)  # before Dora unpickles it
        return xp

    def _get_argv(self) -> tp.List[str]:
        sys.argv[1:] = prepare_argv(sys.argv[1:])
        return sys.argv[1:]

    def _get_delta(self, init: DictConfig, other: DictConfig):
        # A required `???` value (dset.wav of dset=wav) cannot be read for the comparison.
        return super()._get_delta(_filled(init), _filled(other))

    def get_argv_from_sig(self, sig: str) -> tp.Sequence[str]:
        try:
            argv = super().get_argv_from_sig(sig)
        except RuntimeError:  # no XP of that signature: maybe a model name
            return argv_from_model(sig, sys.argv, self.dora.dir / "xps")
        except ValueError:  # json.JSONDecodeError
            argv = None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise SystemExit(f"error: the .argv.json of XP {sig} is not a list of overrides "
                             "(edited or corrupt): start from your own command line instead")
        return trusted_argv_from_xp(argv, f"XP {sig}'s .argv.json")


def _filled(cfg: DictConfig) -> DictConfig:
    """A copy where required (`???`) values read as the string '???'."""
    if not OmegaConf.missing_keys(cfg):
        return cfg
    data = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    out = OmegaConf.create(_replace_missing(data))
    return out


def _replace_missing(node):
    if isinstance(node, dict):
        return {k: _replace_missing(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_missing(v) for v in node]
    return "<required: ???>" if node == "???" else node


def main(cfg: DictConfig):
    die_with_launcher()  # a DDP worker never outlives `dora run -d`
    logging.raiseExceptions = False  # a full disk must not turn train.log into tracebacks
    stop = StopSignals().install()  # SIGTERM/SIGUSR1 from here on: stop at a step boundary
    try:
        with exit_on_user_error(logger):
            if distrib.get_distrib_spec().rank != 0:  # (before init is_master() is true)
                return run(cfg)
            folder = Path(get_xp().folder)
            with XPLock(folder):  # one writer per XP; the second run says who holds it
                stale = remove_stale_temps(folder)
                if stale:
                    logger.info("Removed %d temporary file(s) a killed write left: %s",
                                len(stale), ", ".join(p.name for p in stale[:5]))
                return run(cfg)
    finally:
        stop.restore()


install_cpu_ddp_fallback()
install_excepthook()
# Same name as the function: Dora pickles the main as "module.function_name".
main = _LoRAHydraMain(main, config_name="config", config_path="../conf", version_base="1.3")
