"""Turn exports into the training layout (``demucs-lora-prepare``).

    python -m tools.prepare_dataset SRC OUT [--force] [dset.samplerate=44100 dset.channels=2]

The work is ``demucs_lora.data.prepare``; this is its command line: the config composed
from ``conf/`` and the overrides (dset.samplerate, dset.channels, dset.sources: the stem
names that mark a track folder made of part folders only), one line per written file.
Exit status: 0 done; 1 a data error (an unreadable file); 2 a usage error (OUT not empty
without --force, OUT inside SRC, a bad override).
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs_lora.config.compose import compose
from demucs_lora.core.errors import run_command
from demucs_lora.core.sources import DEFAULT_SOURCES
from demucs_lora.data.prepare import prepare_dataset


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.prepare_dataset",
        description="Write SRC's tracks to OUT in the training layout: float WAV at "
                    "dset.samplerate and dset.channels, part folders summed, stems padded or "
                    "trimmed to the track, the mixture as the stems' sum when missing. SRC "
                    "is only read.")
    parser.add_argument("src", metavar="SRC", help="folder of exports (SRC/{train,valid,"
                        "test}/TRACK/ or SRC/TRACK/)")
    parser.add_argument("out", metavar="OUT", help="the dataset to write (dset.wav=OUT)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dset.samplerate, dset.channels, dset.sources")
    parser.add_argument("--force", action="store_true",
                        help="update a non-empty OUT (unchanged files are not rewritten)")
    return parser


def run(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_intermixed_args(argv)
    bad = [a for a in args.overrides if "=" not in a]
    if bad:
        parser.error(f"expected KEY=VALUE overrides after SRC OUT, got {bad}")
    cfg = compose(args.overrides)
    rate, channels = int(cfg.dset.samplerate), int(cfg.dset.channels)
    names = list(cfg.dset.get("sources") or DEFAULT_SOURCES)
    changes = prepare_dataset(Path(args.src).expanduser(), Path(args.out).expanduser(),
                              rate, channels, force=args.force, names=names)
    for change in changes:
        print(change.format())
    written = sum(c.written for c in changes)
    print(f"{written} files written, {len(changes) - written} unchanged, at {rate} Hz, "
          f"{channels} channels. Check it: python -m tools.verify_dataset {args.out}")
    return 0


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora-prepare``; a user error exits with one line."""
    run_command(run, argv)


if __name__ == "__main__":
    main()
