"""Check a stem folder before training (``demucs-lora-verify``).

    python -m tools.verify_dataset [PATH] [--strict] [dset.samplerate=... variant=five_stem]

The checks are ``demucs_lora.data.verify`` (the same ones ``dora run`` makes before it
trains); this is their command line: the config composed from ``conf/`` and the overrides
(PATH is ``dset.wav``), the report printed. Exit status: 0 usable; 1 not usable (errors, or
warnings with --strict) or a data error; 2 a config or usage error.
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs_lora.config.compose import compose
from demucs_lora.core.errors import run_command
from demucs_lora.config.run_config import data_config
from demucs_lora.data.verify import verify_config


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.verify_dataset",
        description="Check a dataset (root/{train,valid,test}/TRACK/{mixture,SOURCE}."
                    "{wav,flac,...}, part folders, several roots, dset.musdb; docs/data.md)."
                    " Without PATH nor dset.wav, checks the synthetic dataset.")
    parser.add_argument("args", nargs="*", metavar="[PATH] [KEY=VALUE ...]",
                        help="dataset folder (= dset.wav) and Hydra overrides")
    parser.add_argument("--strict", action="store_true", help="warnings fail too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    """Print the report; returns 0 when the dataset is usable, else 1 (user errors raise)."""
    from omegaconf import OmegaConf
    parser = get_parser()
    args = parser.parse_intermixed_args(argv)
    paths = [a for a in args.args if "=" not in a]
    if len(paths) > 1:
        parser.error(f"one PATH at most, got {paths}")
    cfg = compose([a for a in args.args if "=" in a])
    if paths:
        cfg = OmegaConf.merge(cfg, {"dset": {"wav": str(Path(paths[0]).expanduser().resolve())}})
    report = verify_config(data_config(cfg), strict=args.strict, progress=not args.no_progress)
    print(report.format())
    return 0 if report.ok else 1


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora-verify``; a user error exits with one line (exit_code)."""
    run_command(run, argv)


if __name__ == "__main__":
    main()
