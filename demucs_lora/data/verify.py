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

from demucs_lora.data.cache import cache_path, load_cache, save_cache
from demucs_lora.data.layout import (MIXTURE, PREPARE_HINT, LayoutError, audio_in,
                                     check_residual_source, folder_stamp, track_files)
from demucs_lora.data.roots import (SPLITS, Root, check_valid_tracks, config_roots,
                                    list_tracks, split_tracks)
from demucs_lora.data.settings import DataConfig
from demucs_lora.data.stems import BLOCK, disk_sources

CLIP_LEVEL, CLIP_RATIO, SILENCE = 0.999, 1e-3, 1e-5
CHECKS_VERSION = 3                 # bump when a check or its message changes (cache key)


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
    formats: Counter = field(default_factory=Counter)   # files per extension
    summed: int = 0                                      # tracks without a mixture file

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
        if self.formats:
            lines.append("formats: " + ", ".join(f"{ext} {n} files"
                                                 for ext, n in sorted(self.formats.items())))
        if self.summed:
            lines.append(f"mixture = sum of the stems in {self.summed} tracks (no mixture file)")
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
def _open_files(files):
    """Problems for unreadable/empty files; the readable ones' sf.info."""
    problems, infos = [], {}
    for file in files.all_files:
        rel = file.relative_to(files.folder).as_posix()
        if file.stat().st_size == 0:
            problems.append(("error", file, "empty file (0 bytes)", "re-export it"))
            continue
        try:
            info = sf.info(str(file))
        except Exception as err:  # soundfile raises RuntimeError/LibsndfileError/...
            problems.append(("error", file, f"cannot read {rel}: {err}",
                             "re-export it as WAV or FLAC (soundfile cannot decode it)"))
            continue
        if info.frames == 0:
            problems.append(("error", file, f"empty file {rel} (0 frames)", "re-export it"))
            continue
        infos[file] = info
    return problems, infos


def _check_consistency(folder, infos):
    problems = []
    ref = next(iter(infos), None)
    for file, info in infos.items():
        if file == ref:
            continue
        name, theirs_name = (p.relative_to(folder).as_posix() for p in (file, ref))
        for key, unit in (("samplerate", " Hz"), ("channels", " channels"), ("frames", " frames")):
            mine, theirs = getattr(info, key), getattr(infos[ref], key)
            if mine != theirs:
                what = {"samplerate": "sample rate", "frames": "length"}.get(key, key)
                problems.append(("error", file,
                                 f"{what} {mine}{unit} of {name} differs from "
                                 f"{theirs_name} ({theirs}{unit}) in {folder}",
                                 f"re-export {name} and {theirs_name} with the same {what}, "
                                 f"{PREPARE_HINT}"))
    return problems


def _scan(files, infos, do_sum):
    """Read each file once (blocks): non-finite, clipped, peak; and the sum residual."""
    stats = {p: Counter() for p in infos}
    mix_files = set(files.stems.get(MIXTURE, []))
    diff = ref = 0.0
    handles = {p: sf.SoundFile(str(p)) for p in infos}
    try:
        while True:
            blocks = {p: f.read(BLOCK, dtype="float64", always_2d=True)
                      for p, f in handles.items()}
            if not any(b.size for b in blocks.values()):
                break
            for p, b in blocks.items():
                finite = np.isfinite(b)
                s = stats[p]
                s["nonfinite"] += int(b.size - finite.sum())
                b = np.where(finite, b, 0.0)
                s["clipped"] += int((np.abs(b) >= CLIP_LEVEL).sum())
                s["samples"] += b.size
                s["peak"] = max(s["peak"], float(np.abs(b).max(initial=0.0)))
            if do_sum:
                mix = sum(b for p, b in blocks.items() if p in mix_files)
                rest = sum(b for p, b in blocks.items() if p not in mix_files)
                diff += float(np.abs(mix - rest).sum())
                ref += float(np.abs(mix).sum())
    finally:
        for f in handles.values():
            f.close()
    return stats, (diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf")))


def _signal_problems(folder, stats):
    problems = []
    for file, s in stats.items():
        rel = file.relative_to(folder).as_posix()
        if s["nonfinite"]:
            problems.append(("error", file, f"{s['nonfinite']} NaN/inf samples in {rel}",
                             "re-export it (the file holds NaN or inf values)"))
        if s["peak"] < SILENCE:
            problems.append(("warning", file, f"{rel} is silent (peak {s['peak']:.2g})",
                             "fine for a stem absent from this track; else re-export it"))
        ratio = s["clipped"] / max(s["samples"], 1)
        if ratio > CLIP_RATIO:
            problems.append(("warning", file, f"{rel} clips: {ratio:.2%} of samples at "
                             f"|x| >= {CLIP_LEVEL}", "export at a lower gain or as float WAV"))
    return problems


def check_track(folder, sources, residual=None, sum_tolerance=1e-3, stem_files=None,
                mixture="auto"):
    """Problems of one track folder as (level, file, message, fix) + its info (seconds,
    rate, channels, formats, whether the mixture is the stems' sum)."""
    folder = Path(folder)
    try:
        files, layout = track_files(folder, sources, residual, stem_files, mixture)
    except LayoutError as err:
        return [["error", err.file, err.message, err.fix]], {"seconds": 0.0}
    problems = [("error",) + tuple(p) for p in layout]
    opened, infos = _open_files(files)
    problems += opened + _check_consistency(folder, infos)
    consistent = not problems and len(infos) == len(files.all_files)
    do_sum = consistent and not files.summed and residual is None and len(files.stems) > 1
    stats, rel = _scan(files, infos, do_sum) if infos else ({}, 0.0)
    problems += _signal_problems(folder, stats)
    if do_sum and not any(s["nonfinite"] for s in stats.values()) and rel > sum_tolerance:
        used = {p.name for p in files.all_files}
        extra = sorted(p.name for p in audio_in(folder) if p.name not in used)
        hint = f"; files not in `sources`: {', '.join(extra)}" if extra else ""
        mix = files.stems[MIXTURE][0]
        names = ", ".join(p.relative_to(folder).as_posix() for p in files.all_files
                          if p != mix)
        problems.append((
            "error", mix,
            f"stems {names} do not sum to {mix.name}: relative L1 error {rel:.3g} > tolerance "
            f"{sum_tolerance:g}",
            "the stems must add up to the mixture: add the missing stems to `sources`, set "
            f"residual_source, set dset.mixture=sum, or rewrite {mix.name} as their sum{hint}"))
    ref = next(iter(infos.values()), None)
    info = {"seconds": ref.frames / ref.samplerate if ref else 0.0,
            "samplerate": ref.samplerate if ref else None,
            "channels": ref.channels if ref else None, "summed": files.summed,
            "formats": dict(Counter(p.suffix.lower().lstrip(".") for p in files.all_files))}
    return [list(map(str, p)) for p in problems], info


# ----------------------------------------------------------------------------- dataset
def _params_key(names, residual, samplerate, channels, tol):
    blob = json.dumps([names, residual, samplerate, channels, tol, CLIP_LEVEL, CLIP_RATIO,
                       SILENCE, CHECKS_VERSION])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _root_problems(root: Root, report, hold_out: bool) -> None:
    """Problems of a root's split folders (a missing valid/ is fine with a hold-out, with
    MUSDB, or with several roots as long as one has valid tracks)."""
    if not root.path.is_dir():
        report.problems.append(Problem("error", "", "", str(root.path),
                                       "dataset folder not found",
                                       "give the folder that holds train/ and valid/"))
        return
    for split in SPLITS:
        folder = root.path / split
        required = split == "train" or (split == "valid" and not hold_out)
        if root.kind == "musdb" and split == "valid":
            continue
        if not folder.is_dir():
            fix = f"create {folder}/TRACK/{{mixture,SOURCE}}.wav"
            if split == "valid":
                fix += " or set dset.valid_tracks=N (hold out N train tracks)"
            report.problems.append(Problem("error" if required else "info", split, "",
                                           str(folder), f"missing split folder {split}/", fix))
        elif not list_tracks(folder):
            report.problems.append(Problem("error" if required else "warning", split, "",
                                           str(folder), f"{split}/ has no track folders",
                                           f"add {folder}/TRACK/*.wav"))


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


def _entry(ref, cache, key, args, report):
    """The cached check of one track, or a fresh one (counted in the report)."""
    stamp = folder_stamp(ref.folder)
    cache_key = f"{ref.origin}/{ref.folder.relative_to(ref.root.path / ref.origin).as_posix()}"
    entry = cache.get(cache_key)
    if entry and entry.get("stamp") == stamp and entry.get("params") == key:
        report.reused += 1
    else:
        problems, info = check_track(ref.folder, *args)
        entry = {"stamp": stamp, "params": key, "problems": problems, "info": info}
        report.scanned += 1
    return cache_key, entry


def verify_dataset(root, sources, samplerate, channels, cache_dir, sum_tolerance=1e-3,
                   residual_source=None, strict=False, progress=True, stem_files=None,
                   mixture="auto", valid_tracks=None):
    """Check every track of every split of `root` (a folder or a list of `roots.Root`);
    returns a Report (see `Report.ok`)."""
    roots = list(root) if isinstance(root, (list, tuple)) else config_roots(root, None,
                                                                             check=False)
    files = dict(stem_files or {})
    names = disk_sources(list(sources), residual_source, files)
    report = Report(", ".join(str(r.path) for r in roots), list(sources), strict=strict)
    hold_out = valid_tracks is not None or len(roots) > 1
    for r in roots:
        _root_problems(r, report, hold_out)
    refs = split_tracks([r for r in roots if r.path.is_dir()], valid_tracks, names)
    if hold_out and not refs["valid"] and refs["train"]:
        report.problems.append(Problem("error", "valid", "", report.root, "no valid track",
                                       "set dset.valid_tracks=N to hold out N train tracks"))
    key = _params_key([names, files, mixture], residual_source, samplerate, channels,
                      sum_tolerance)
    args = (list(sources), residual_source, sum_tolerance, files, mixture)
    caches = {r: load_cache(cache_path(cache_dir, r.path, "verify")) for r in roots}
    new = {r: {} for r in roots}
    rates, layouts = Counter(), Counter()
    rows = {s: SplitRow(s) for s in SPLITS}
    todo = [(s, ref) for s in SPLITS for ref in refs[s]]
    for split, ref in tqdm(todo, desc="verify", unit="track", disable=not progress):
        cache_key, entry = _entry(ref, caches[ref.root], key, args, report)
        new[ref.root][cache_key] = entry
        info = entry["info"]
        rows[split].tracks += 1
        rows[split].seconds += info["seconds"]
        rates[(split, info.get("samplerate"))] += 1
        layouts[(split, info.get("channels"))] += 1
        report.formats.update(info.get("formats", {}))
        report.summed += bool(info.get("summed"))
        for level, file, message, fix in entry["problems"]:
            report.problems.append(Problem(level, split, ref.key, file, message, fix))
    _rate_and_layout_problems(report, Path(report.root.split(", ")[0]), rates, layouts,
                              samplerate, channels)
    for p in report.problems:
        if p.split in rows and p.level in ("error", "warning"):
            setattr(rows[p.split], p.level + "s", getattr(rows[p.split], p.level + "s") + 1)
    report.rows = [rows[s] for s in SPLITS]
    for r in roots:
        if new[r] != caches[r]:
            try:
                save_cache(cache_path(cache_dir, r.path, "verify"), r.path, new[r])
            except OSError as err:              # a read-only place: check without a cache
                print(f"warning: cannot write the cache of {r.path}: {err}", file=sys.stderr)
    return report


def _rate_and_layout_problems(report, root, rates, layouts, samplerate, channels):
    for (split, rate), count in sorted(rates.items(), key=str):
        if rate and rate != samplerate:
            report.problems.append(Problem(
                "info", split, "", str(root / split), f"{count} tracks at {rate} Hz are "
                f"resampled to {samplerate} Hz on the fly", "resample them offline to save time"))
    report.problems += _layout_problems(root, layouts, channels)


def verify_config(data: DataConfig, strict=False, progress=True):
    """verify_dataset for a run's data (its roots, sources, residual_source, format)."""
    from demucs_lora.data.stems import dataset_roots
    sources = list(data.sources)
    residual = data.residual_source
    check_residual_source(residual, sources)
    check_valid_tracks(data.valid_tracks)
    roots = dataset_roots(data, progress=progress, check=False)
    return verify_dataset(roots, sources, data.samplerate, data.channels, data.metadata,
                          data.sum_tolerance, residual, strict=strict, progress=progress,
                          stem_files=dict(data.stem_files), mixture=data.mixture,
                          valid_tracks=data.valid_tracks)
