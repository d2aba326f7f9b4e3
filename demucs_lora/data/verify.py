"""Dataset checks: every problem of a stem folder, by file, with its fix.

    python -m tools.verify_dataset [PATH] [--strict] [dset.samplerate=... variant=five_stem]

Checks each track of each split: the expected files exist and are readable, sample rate,
channels and length agree across a track, no NaN/inf, not silent (warning), little
clipping (warning), and the stems sum to the mixture (relative L1 within
dset.sum_tolerance). Each file is read once, in blocks. Results are cached per track (file
size + mtime) next to the metadata cache, so a second run only rereads changed tracks.
The command line is ``demucs_lora.commands.verify_dataset``.
"""
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from demucs_lora.core.errors import ConfigError
from demucs_lora.data.stems import (BLOCK, EXT, MIXTURE, SPLITS, cache_path, disk_sources, file_stamp,
                    list_tracks, load_cache, save_cache)

CLIP_LEVEL, CLIP_RATIO, SILENCE = 0.999, 1e-3, 1e-5
REQUIRED_SPLITS = ("train", "valid")
CHECKS_VERSION = 2                 # bump when a check or its message changes (cache key)


@dataclass
class Problem:
    level: str        # error | warning | info
    split: str
    track: str
    file: str         # the file (or folder) at fault
    message: str
    fix: str

    def format(self):
        return f"{self.level.upper():7s} {self.file}: {self.message}\n        fix: {self.fix}"


@dataclass
class SplitRow:
    split: str
    tracks: int = 0
    seconds: float = 0.0
    errors: int = 0
    warnings: int = 0

    @property
    def hours(self):
        return self.seconds / 3600


@dataclass
class Report:
    root: str
    sources: list
    problems: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    reused: int = 0
    scanned: int = 0
    strict: bool = False

    @property
    def errors(self):
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self):
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self):
        return not self.errors and not (self.strict and self.warnings)

    def format(self):
        lines = [f"dataset {self.root}  (sources: {', '.join(self.sources)})",
                 f"{'split':8s}{'tracks':>8s}{'hours':>10s}{'errors':>8s}{'warnings':>10s}"]
        for r in self.rows:
            lines.append(f"{r.split:8s}{r.tracks:8d}{r.hours:10.4f}{r.errors:8d}{r.warnings:10d}")
        lines += [p.format() for p in self.problems]
        lines.append(f"{self.reused} tracks reused from cache ({self.scanned} checked)")
        n_err, n_warn = len(self.errors), len(self.warnings)
        if self.ok:
            lines.append(f"OK: usable ({n_warn} warnings)")
        else:
            why = "errors" if n_err else "warnings and --strict"
            lines.append(f"NOT USABLE: {n_err} errors, {n_warn} warnings ({why})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- one track
def _open_files(folder, names, residual):
    """Problems for missing/unreadable/empty files; the readable ones' sf.info."""
    problems, infos = [], {}
    for name in names:
        file = folder / f"{name}{EXT}"
        if not file.is_file():
            have = sorted(p.stem for p in folder.glob(f"*{EXT}") if p.stem != MIXTURE)
            if name == MIXTURE:
                fix = "write mixture.wav: the sum of the track's stems"
            elif have:
                fix = (f"your files have {', '.join(have)}; set dset.sources=[{', '.join(have)}]"
                       f" (or add {name}.wav"
                       + (")" if residual else f", or set residual_source={name}: computed "
                          "as mixture - other stems)"))
            else:
                fix = (f"add {name}.wav, or remove '{name}' from dset.sources"
                       + ("" if residual else f", or set residual_source={name} "
                          "(computed as mixture - other stems)"))
            problems.append(("error", file, f"missing file {file.name}", fix))
            continue
        if file.stat().st_size == 0:
            problems.append(("error", file, "empty file (0 bytes)", "re-export it"))
            continue
        try:
            info = sf.info(str(file))
        except Exception as err:  # soundfile raises RuntimeError/LibsndfileError/...
            problems.append(("error", file, f"cannot read {file.name}: {err}",
                             "re-export it as WAV (soundfile cannot decode it)"))
            continue
        if info.frames == 0:
            problems.append(("error", file, f"empty file {file.name} (0 frames)", "re-export it"))
            continue
        infos[name] = info
    return problems, infos


def _check_consistency(folder, infos):
    problems = []
    ref = MIXTURE if MIXTURE in infos else next(iter(infos), None)
    for name, info in infos.items():
        if name == ref:
            continue
        for key, unit in (("samplerate", " Hz"), ("channels", " channels"), ("frames", " frames")):
            mine, theirs = getattr(info, key), getattr(infos[ref], key)
            if mine != theirs:
                what = {"samplerate": "sample rate", "frames": "length"}.get(key, key)
                problems.append(("error", folder / f"{name}{EXT}",
                                 f"{what} {mine}{unit} of {name}{EXT} differs from "
                                 f"{ref}{EXT} ({theirs}{unit}) in {folder}",
                                 f"re-export {name}{EXT} and {ref}{EXT} with the same {what}"))
    return problems


def _scan(folder, infos, do_sum):
    """Read each file once (blocks): non-finite, clipped, peak; and the sum residual."""
    stats = {n: Counter() for n in infos}
    diff = ref = 0.0
    files = {n: sf.SoundFile(str(folder / f"{n}{EXT}")) for n in infos}
    try:
        while True:
            blocks = {n: f.read(BLOCK, dtype="float64", always_2d=True) for n, f in files.items()}
            if not any(b.size for b in blocks.values()):
                break
            for n, b in blocks.items():
                finite = np.isfinite(b)
                s = stats[n]
                s["nonfinite"] += int(b.size - finite.sum())
                b = np.where(finite, b, 0.0)
                s["clipped"] += int((np.abs(b) >= CLIP_LEVEL).sum())
                s["samples"] += b.size
                s["peak"] = max(s["peak"], float(np.abs(b).max(initial=0.0)))
            if do_sum:
                mix = blocks[MIXTURE]
                rest = sum(b for n, b in blocks.items() if n != MIXTURE)
                diff += float(np.abs(mix - rest).sum())
                ref += float(np.abs(mix).sum())
    finally:
        for f in files.values():
            f.close()
    return stats, (diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf")))


def check_track(folder, names, residual=None, sum_tolerance=1e-3):
    """Problems of one track folder as (level, file, message, fix) + its info."""
    folder = Path(folder)
    problems, infos = _open_files(folder, names, residual)
    problems += _check_consistency(folder, infos)
    consistent = not problems and len(infos) == len(names)
    do_sum = consistent and residual is None and len(names) > 1
    stats, rel = _scan(folder, infos, do_sum) if infos else ({}, 0.0)
    for name, s in stats.items():
        file = folder / f"{name}{EXT}"
        if s["nonfinite"]:
            problems.append(("error", file, f"{s['nonfinite']} NaN/inf samples in {file.name}",
                             "re-export it (the file holds NaN or inf values)"))
        if s["peak"] < SILENCE:
            problems.append(("warning", file, f"{file.name} is silent (peak {s['peak']:.2g})",
                             "fine for a stem absent from this track; else re-export it"))
        ratio = s["clipped"] / max(s["samples"], 1)
        if ratio > CLIP_RATIO:
            problems.append(("warning", file, f"{file.name} clips: {ratio:.2%} of samples at "
                             f"|x| >= {CLIP_LEVEL}", "export at a lower gain or as float WAV"))
    if do_sum and not any(s["nonfinite"] for s in stats.values()) and rel > sum_tolerance:
        extra = sorted(p.name for p in folder.glob(f"*{EXT}")
                       if p.stem not in names)
        hint = f"; files not in `sources`: {', '.join(extra)}" if extra else ""
        problems.append((
            "error", folder / f"{MIXTURE}{EXT}",
            f"stems {', '.join(n + EXT for n in names if n != MIXTURE)} do not sum to "
            f"{MIXTURE}{EXT}: relative L1 error {rel:.3g} > tolerance {sum_tolerance:g}",
            "the stems must add up to the mixture: add the missing stems to `sources`, set "
            f"residual_source, or rewrite {MIXTURE}{EXT} as their sum{hint}"))
    ref = infos.get(MIXTURE) or next(iter(infos.values()), None)
    info = {"seconds": ref.frames / ref.samplerate if ref else 0.0,
            "samplerate": ref.samplerate if ref else None,
            "channels": ref.channels if ref else None}
    return [list(map(str, p)) for p in problems], info


# ----------------------------------------------------------------------------- dataset
def _params_key(names, residual, samplerate, channels, tol):
    blob = json.dumps([names, residual, samplerate, channels, tol, CLIP_LEVEL, CLIP_RATIO,
                       SILENCE, CHECKS_VERSION])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _track_stamp(folder, names):
    stamp = {n: file_stamp(folder / f"{n}{EXT}") for n in names}
    stamp["*"] = sorted(p.name for p in folder.glob(f"*{EXT}") if p.stem not in names)
    return stamp


def _split_problems(root, report):
    root = Path(root)
    if not root.is_dir():
        report.problems.append(Problem("error", "", "", str(root), "dataset folder not found",
                                       "give the folder that holds train/ and valid/"))
        return []
    splits = []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            level = "error" if split in REQUIRED_SPLITS else "info"
            report.problems.append(Problem(level, split, "", str(folder),
                                           f"missing split folder {split}/",
                                           f"create {folder}/TRACK/{{mixture,SOURCE}}.wav"))
        elif not list_tracks(folder):
            level = "error" if split in REQUIRED_SPLITS else "warning"
            report.problems.append(Problem(level, split, "", str(folder), f"{split}/ has no "
                                           "track folders", f"add {folder}/TRACK/*.wav"))
        else:
            splits.append(split)
    return splits


def _layout_problems(root, layouts, channels):
    """Info lines for tracks whose channel count differs from dset.channels (an error
    when they cannot be converted); `layouts` counts tracks per (split, channels)."""
    problems = []
    for (split, have), count in sorted(layouts.items(), key=str):
        if have and have != channels:
            level, what = "info", (
                "they are averaged to mono" if channels == 1 else
                f"their channel is repeated {channels} times" if have == 1 else
                f"their first {channels} channels are used, the others ignored"
                if have > channels else "they cannot be converted")
            if have not in (1, channels) and channels != 1 and have < channels:
                level = "error"
            problems.append(Problem(
                level, split, "", str(root / split), f"{count} tracks have {have} channels "
                f"but dset.channels={channels}: {what}",
                "downmix them offline if the other channels matter, or set dset.channels"))
    return problems


def verify_dataset(root, sources, samplerate, channels, cache_dir, sum_tolerance=1e-3,
                   residual_source=None, strict=False, progress=True, stem_files=None):
    """Check every track of every split of `root`; returns a Report (see `Report.ok`)."""
    root = Path(root)
    files = dict(stem_files or {})
    names = disk_sources(list(sources), residual_source, files)
    report = Report(str(root), list(sources), strict=strict)
    splits = _split_problems(root, report)
    todo = [(s, t) for s in splits for t in list_tracks(root / s)]
    key = _params_key(names, residual_source, samplerate, channels, sum_tolerance)
    path = cache_path(cache_dir, root, "verify")
    cache = load_cache(path)
    new_cache, rates, layouts = {}, Counter(), Counter()
    rows = {s: SplitRow(s) for s in SPLITS}
    for split, track in tqdm(todo, desc="verify", unit="track", disable=not progress):
        folder = root / split / track
        stamp = _track_stamp(folder, names)
        entry = cache.get(f"{split}/{track}")
        if entry and entry.get("stamp") == stamp and entry.get("params") == key:
            report.reused += 1
        else:
            problems, info = check_track(folder, names, residual_source, sum_tolerance)
            entry = {"stamp": stamp, "params": key, "problems": problems, "info": info}
            report.scanned += 1
        new_cache[f"{split}/{track}"] = entry
        row = rows[split]
        row.tracks += 1
        row.seconds += entry["info"]["seconds"]
        rates[(split, entry["info"]["samplerate"])] += 1
        layouts[(split, entry["info"].get("channels"))] += 1
        for level, file, message, fix in entry["problems"]:
            report.problems.append(Problem(level, split, track, file, message, fix))
    for (split, rate), count in sorted(rates.items(), key=str):
        if rate and rate != samplerate:
            report.problems.append(Problem(
                "info", split, "", str(root / split), f"{count} tracks at {rate} Hz are "
                f"resampled to {samplerate} Hz on the fly", "resample them offline to save time"))
    report.problems += _layout_problems(root, layouts, channels)
    for p in report.problems:
        if p.split in rows and p.level in ("error", "warning"):
            setattr(rows[p.split], p.level + "s", getattr(rows[p.split], p.level + "s") + 1)
    report.rows = [rows[s] for s in SPLITS]
    if new_cache != cache:
        try:
            save_cache(path, root, new_cache)
        except OSError as err:                  # a read-only place: check without a cache
            print(f"warning: cannot write the cache {path}: {err}", file=sys.stderr)
    return report


def verify_config(cfg, strict=False, progress=True):
    """verify_dataset for a composed config (cfg.dset, sources, residual_source)."""
    from demucs_lora.core.sources import DEFAULT_SOURCES
    from demucs_lora.data.stems import _abspath, dataset_root, stem_files
    sources = list(cfg.dset.get("sources") or DEFAULT_SOURCES)
    residual = cfg.get("residual_source")
    if residual is not None and residual not in sources:
        raise ConfigError(f"residual_source={residual!r} must be one of sources {sources}")
    root = dataset_root(cfg, sources, progress=progress, check=False)
    return verify_dataset(root, sources, int(cfg.dset.samplerate), int(cfg.dset.channels),
                          _abspath(cfg.dset.metadata),
                          float(cfg.dset.get("sum_tolerance", 1e-3)), residual,
                          strict=strict, progress=progress, stem_files=stem_files(cfg))
