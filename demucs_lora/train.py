"""Hydra + Dora entry point: `dora run [overrides]` finds this module's `main`.

`run` takes the steps of demucs_lora.training.run in order (config, base, data, model,
solver: bad input costs no compute). `dora run -d` without a GPU and `-f NAME` for a
model name: demucs_lora.training.dora_cli.
"""
from __future__ import annotations

import logging
import sys
import typing as tp
from pathlib import Path

from dora import distrib, get_xp
from dora.hydra import HydraMain
from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.compose import hydra_errors_as_config_errors
from demucs_lora.config.keys import canonical_checked, check_one_spelling, prepare_argv
from demucs_lora.config.stored_argv import check_trust_from_command_line, trusted_argv_from_xp
from demucs_lora.core.errors import exit_on_user_error
from demucs_lora.core.files import remove_stale_temps
from demucs_lora.training.dora_cli import (argv_from_model, install_cpu_ddp_fallback,
                                           install_excepthook)
from demucs_lora.training.dora_files import check_job_pickle
from demucs_lora.training.xp_guard import StopSignals, XPLock, die_with_launcher

logger = logging.getLogger("demucs_lora")


def run(cfg: DictConfig) -> tp.List[dict]:
    """One training run of the XP Dora made (demucs_lora.training.run has the steps)."""
    from demucs_lora.config.run_config import run_config
    from demucs_lora.training.run import (build_loaders, build_run_model,
                                          write_config_and_verify_data)
    from demucs_lora.training.solver import Solver
    xp = get_xp()
    folder = Path(xp.folder)
    cfg, base, device = prepare_run(cfg, xp)
    run_cfg = run_config(cfg)   # the raw config stops here: each room gets its typed piece
    write_config_and_verify_data(OmegaConf.to_yaml(cfg, resolve=True), run_cfg.dset, folder)
    loaders, augment = build_loaders(run_cfg)
    model = build_run_model(run_cfg, loaders, augment, base, folder)
    if run_cfg.misc.show:
        print(model)
        return []
    if run_cfg.enable_checkpointing:
        from demucs_lora.models.checkpointing import enable_checkpointing
        enable_checkpointing(model)
    solver = Solver(run_cfg, model, loaders, augment, device)
    return solver.run()


def prepare_run(cfg: DictConfig, xp) -> tp.Tuple[DictConfig, tp.Any, tp.Any]:
    """(the config that runs, the base or None, the device): config checked, processes
    joined, the base loaded and checked against the config. No data is touched yet."""
    import torch
    from demucs_lora.config.resolve import (apply_runtime_kwargs, data_banner,
                                            prepare_config, resolve_precision,
                                            resolve_with_base)
    from demucs_lora.config.run_config import base_spec
    from demucs_lora.config.values import check_base_values
    from demucs_lora.models.build import check_audio_format, load_base
    from demucs_lora.training.run import pick_device, start_processes
    cfg = prepare_config(cfg)  # checks the config (the LoRA keys: lora.config.LoraConfig)
    device = pick_device(cfg.device, cfg.mixed_precision)
    cfg, notes = resolve_precision(cfg, device.type)
    start_processes(device, xp)
    torch.manual_seed(cfg.seed)
    # The base first (continue_from, its sample rate, sources, architecture): before any
    # data is made, so a wrong name or key costs nothing.
    b = base_spec(cfg)
    base = load_base(b.continue_from, b.pretrained_repo, b.trust_remote_code, None,
                     b.bag_member)
    if base is not None:
        check_audio_format(base, int(cfg.dset.samplerate), int(cfg.dset.channels))
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


class _LoRAHydraMain(HydraMain):
    """Dora's Hydra main that speaks the guide's dialect: alias keys and JSON-style dicts
    normalized before Dora signs the XP, unknown keys refused, Hydra's errors in one
    screen, `dset=wav` (a `???` default) signed, and `-f NAME` for a model name.
    An XP folder is untrusted input: `dora run -f SIG` replays only plain overrides from
    the XP's .argv.json (demucs_lora.config.stored_argv), trust_remote_code only counts
    from the command line, and an XP's job.pkl is scanned before Dora unpickles it."""

    _stored: tp.List[str] = []   # the argv `-f SIG` injected before the user's own

    def __init__(self, *args, **kwargs):
        with hydra_errors_as_config_errors():  # Dora composes conf/ here: a pasted block
            super().__init__(*args, **kwargs)  # that is not valid YAML is one line

    def get_xp(self, argv: tp.Sequence[str]):
        argv = list(argv)
        stored = self._stored if argv[:len(self._stored)] == self._stored else []
        check_one_spelling(argv[len(stored):])   # the user's may override the stored
        argv = prepare_argv(argv)
        with hydra_errors_as_config_errors():  # composition errors: one screen
            xp = super().get_xp(argv)
        canonical_checked(xp.cfg, argv)
        check_trust_from_command_line(xp.cfg, argv)
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
        self._stored = trusted_argv_from_xp(argv, f"XP {sig}'s .argv.json")
        return self._stored


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


def xp_folder_in(argv: tp.Sequence[str], workdir: tp.Union[str, Path]) -> Path:
    """The XP folder of ``dora run ARGV`` started in `workdir`.

    The signature is a pure function of the overrides, but Dora makes ``dora.dir``
    absolute against the cwd of this module's first import, which need not be `workdir`
    (a test suite, a benchmark driving runs in a scratch folder): the folder is rebuilt
    from the signature and conf's ``dora.dir``."""
    from demucs_lora.core.paths import CONF_DIR
    dora_dir = OmegaConf.load(CONF_DIR / "config.yaml").dora.dir
    return Path(workdir) / dora_dir / "xps" / main.get_xp(list(argv)).sig
