"""Typed user-facing errors: each names the key, file or layer at fault and how to fix it."""
import contextlib
import logging
import sys
import typing as tp


class DemucsLoRAError(Exception):
    """Base class of every error a user can cause (bad config, data, adapter)."""


class ConfigError(DemucsLoRAError, ValueError):
    """A config key has a bad value (names the key and the allowed values)."""


class DatasetError(DemucsLoRAError):
    """The dataset cannot be used for training (lists every problem by file)."""


class AdapterMismatch(DemucsLoRAError):
    """An adapter file does not fit the model it is loaded on (keys, shapes or base)."""


class ModelLoadError(DemucsLoRAError):
    """A base model or exported package could not be found or loaded."""


class CheckpointError(ModelLoadError):
    """An XP's checkpoint.th cannot be resumed from (corrupt, hostile, another config or
    another base); names the file and how to start over."""


class TrainingDiverged(DemucsLoRAError):
    """The loss, a gradient or the weights became NaN/inf (names the step and what to try)."""


class DiskWriteError(DemucsLoRAError, OSError):
    """A file could not be written (disk full, read-only folder); names the file."""


class AudioError(DemucsLoRAError):
    """An input audio file cannot be read or converted (names the file)."""


class XPBusy(DemucsLoRAError):
    """Another process is training the same XP (names its pid)."""


CONFIG_EXIT = 2
"""Exit status of a config or usage error (a bad key, value, override or argument: fix the
command line); argparse exits with it too."""
DATA_EXIT = 1
"""Exit status of every other user error: data, model, adapter, checkpoint, disk, a run
that diverged or a busy XP (fix the files, or what the message names)."""


def exit_code(exc: DemucsLoRAError) -> int:
    """The exit status of a user error: CONFIG_EXIT for a ConfigError, else DATA_EXIT."""
    return CONFIG_EXIT if isinstance(exc, ConfigError) else DATA_EXIT


def exit_with(exc: DemucsLoRAError, logger: tp.Optional[logging.Logger] = None) -> tp.NoReturn:
    """Print ``error: KIND: message`` on stderr (and log it) and exit with exit_code."""
    if logger is not None:
        logger.error("%s: %s", type(exc).__name__, exc)
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exit_code(exc))


@contextlib.contextmanager
def exit_on_user_error(logger: tp.Optional[logging.Logger] = None):
    """The CLI boundary (every command, the demo, Dora's entry point): a user error
    prints one line, no traceback, and exits with its exit_code; anything else is a bug
    and keeps its traceback."""
    try:
        yield
    except DemucsLoRAError as exc:
        exit_with(exc, logger)


def run_command(run: tp.Callable[[tp.Optional[tp.Sequence[str]]], int],
                argv: tp.Optional[tp.Sequence[str]] = None) -> tp.NoReturn:
    """A console script's body: exit with ``run(argv)``'s status, a user error as one
    line (`exit_on_user_error`)."""
    with exit_on_user_error():
        code = run(argv)
    sys.exit(code)
