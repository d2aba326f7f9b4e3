"""What `dora run` does with the guide's flags: `-d` without a GPU, `-f NAME`, user errors.

- `-d` on a machine without CUDA: Dora refuses ("DDP is only available on GPU"). Here it
  runs one process on the CPU, or `--ddp_workers N` gloo processes, and says so (console
  and train.log, through DEMUCS_LORA_DDP_NOTE).
- `-f NAME` where NAME is not an XP signature but a model `continue_from` can load (a
  pretrained name in `pretrained_repo`, a .th file): the run starts from that model
  (`continue_from=NAME`). Otherwise the error says what `-f` takes.
- A user error raised while Dora prepares the XP (bad key, unknown `-f`) prints one line,
  not a traceback, and exits with its status (sys.excepthook, for DemucsLoRAError only).
"""
from __future__ import annotations

import logging
import os
import sys
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import ConfigError, DemucsLoRAError, ModelLoadError, exit_with
from demucs_lora.core.files import disk_error_of

logger = logging.getLogger(__name__)
DDP_NOTE = "DEMUCS_LORA_DDP_NOTE"


def _log(message: str) -> None:
    from dora.log import simple_log
    simple_log("demucs_lora:", message)


def cpu_ddp_note(num_workers: tp.Optional[int], gpus: int) -> tp.Optional[str]:
    """The line `dora run -d` logs on this machine (None: Dora's own DDP on GPUs)."""
    if gpus:
        return None
    if num_workers:
        return (f"dora run -d: no GPU visible, running {num_workers} DDP processes on the "
                "CPU (gloo backend)")
    return ("dora run -d: no GPU visible, running one process on the CPU (DDP needs GPUs; "
            "add --ddp_workers=N for N gloo processes on the CPU)")


def install_cpu_ddp_fallback() -> None:
    """Wrap dora.run.start_ddp_workers: without CUDA, one CPU process (or gloo workers)."""
    import dora.run as dora_run
    original = dora_run.start_ddp_workers
    if getattr(original, "_demucs_lora", False):
        return

    def start_ddp_workers(main, argv, num_workers=None):
        import torch
        note = cpu_ddp_note(num_workers, torch.cuda.device_count())
        if note is None:
            return original(main, argv, num_workers)
        _log(note)
        os.environ[DDP_NOTE] = note
        if num_workers:
            return original(main, argv, num_workers)
        from dora.log import disable_logging
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        sys.argv[1:] = list(argv)
        disable_logging()
        main()

    start_ddp_workers._demucs_lora = True  # type: ignore[attr-defined]
    dora_run.start_ddp_workers = start_ddp_workers


def no_slurm_error(exc: BaseException) -> tp.Optional[ConfigError]:
    """The one line for submitit's "no Slurm here" (`dora grid` / `dora launch` on a
    machine without `srun`), instead of its traceback; None for any other exception."""
    if not (isinstance(exc, RuntimeError) and 'Could not detect "srun"' in str(exc)):
        return None
    return ConfigError(
        "dora grid / dora launch submit jobs through Slurm, and this machine has none (no "
        "`srun`): start the local one-node cluster with `sudo tools/slurm_local.sh start` "
        "then `source /tmp/demucs-lora-slurm/env.sh`, or add --dry_run (with --init to "
        "create the XP folders) to see the grid without launching it")


def install_excepthook() -> None:
    """A DemucsLoRAError that reaches the top of a `dora` command (raised while Dora
    prepares the XP, outside our main) goes through the CLI boundary: one line, its exit
    status (core.errors.exit_code). So do submitit's "no Slurm" and Dora's own OSError on
    a full or read-only outputs/ (a DiskWriteError naming the file)."""
    previous = sys.excepthook
    if getattr(previous, "_demucs_lora", False):
        return

    def hook(kind, exc, tb):
        if isinstance(exc, DemucsLoRAError):
            exit_with(exc)
        if no_slurm_error(exc) is not None:
            exit_with(no_slurm_error(exc))
        if disk_error_of(exc) is not None:   # Dora's own mkdir/writes in outputs/
            exit_with(disk_error_of(exc))
        previous(kind, exc, tb)

    hook._demucs_lora = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def argv_value(argv: tp.Sequence[str], key: str) -> tp.Optional[str]:
    """The last `key=value` of argv (quotes stripped), or None."""
    value = None
    for arg in argv:
        name, sep, rest = arg.lstrip("+").partition("=")
        if sep and name == key:
            value = rest.strip().strip("'\"")
    return None if value in (None, "", "null") else value


def resolve_model_name(name: str, argv: tp.Sequence[str]) -> tp.List[str]:
    """argv that starts a run from the model NAME (`dora run -f NAME`), found as
    `continue_from` finds it (model_files.resolve; pretrained_repo read from the user's argv).
    Raises ModelLoadError with every place looked when NAME is not a model."""
    from demucs_lora.model_files.resolve import find_model
    find_model(name, argv_value(argv, "pretrained_repo"), Path.cwd())
    return [f"continue_from={name}"]


def argv_from_model(name: str, argv: tp.Sequence[str], xp_root: Path) -> tp.List[str]:
    """`-f NAME` when no XP has that signature: a model, or an error saying what -f takes."""
    from demucs_lora.core.errors import ConfigError
    try:
        found = resolve_model_name(name, argv)
    except ModelLoadError as exc:
        raise ConfigError(
            f"-f {name}: no XP with that signature in {xp_root} and no model of that name "
            f"({exc}). -f takes an XP signature (dora run -f SIG) or a model that "
            "continue_from finds: a path, a name in pretrained_repo=FOLDER or in demucs' "
            "caches (docs/models.md)") from None
    _log(f"-f {name}: not an XP signature; starting from the model {name} "
         f"({' '.join(found)})")
    return found
