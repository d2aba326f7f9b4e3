"""Stem-folder datasets: track metadata (cached), examples, and the config's datasets.

Which folders are tracks and which files make each stem is roots.py's and layout.py's job
(several roots, MUSDB18-HQ, hold-out; any soundfile format, part folders, optional mixture).
An item is a tensor (1 + S, C, T) = [mixture, stems...] like demucs' Wavset for validation.
Normalization keeps the stems summing to the mixture: mixture -> (mix - mean) / std and
each of the S stems -> (stem - mean / S) / std (demucs subtracts `mean` from every stem).
"""
import logging
import math
import typing as tp
from collections import OrderedDict
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch
from torch.nn import functional as F

from demucs_lora.core.errors import ConfigError, DatasetError
from demucs_lora.data.cache import (cache_path, file_stamp, load_cache,  # noqa: F401
                                    save_cache)
from demucs_lora.data.augment import (SegmentShift, augment_batch, build_augment,  # noqa: F401
                                      calibration_batches)
from demucs_lora.data.layout import (MIXTURE, LayoutError, TrackFiles,
                                     check_residual_source, folder_stamp, track_files,
                                     wanted_names)
from demucs_lora.data.repitch import room
from demucs_lora.data.settings import DataConfig
from demucs_lora.data.roots import (SPLITS, Root, TrackRef, check_valid_tracks,  # noqa: F401
                                    config_roots, list_tracks, split_tracks)

logger = logging.getLogger(__name__)
EXT = ".wav"                        # the extension written (synth, prepare_dataset, hints)
BLOCK = 1 << 18                     # frames per read when scanning whole files


def disk_sources(sources, residual_source=None, stem_files=None):
    """The stem names a track must have: mixture + the names of every source but the
    residual one (`stem_files` maps a source to its name(s): {vocal: vocals})."""
    names = wanted_names(sources, residual_source, stem_files)
    return [MIXTURE] + [n for source_names in names.values() for n in source_names]


# ----------------------------------------------------------------------------- metadata
def _infos(files: TrackFiles) -> tp.Dict[Path, tp.Any]:
    infos = {}
    for file in files.all_files:
        try:
            infos[file] = sf.info(str(file))
        except Exception as err:  # soundfile raises several types
            raise DatasetError(f"cannot read {file}: {err}. Fix: re-export it (or convert it "
                               "to WAV/FLAC)") from err
    ref = next(iter(infos), None)
    for file, info in infos.items():
        for key in ("samplerate", "channels", "frames"):
            if getattr(info, key) != getattr(infos[ref], key):
                raise DatasetError(
                    f"{file}: {key} {getattr(info, key)} differs from {ref} "
                    f"({getattr(infos[ref], key)}). Fix: re-export the track's files with the "
                    "same settings, or run `python -m tools.prepare_dataset SRC OUT`.")
    if ref is None:
        raise DatasetError(f"{files.folder}: no audio file for any stem. Fix: run "
                           "`python -m tools.verify_dataset` to list every problem.")
    return infos


def _mono_stats(paths: tp.Sequence[Path]) -> tp.Tuple[float, float]:
    """mean/std of the channel mean of the sum of `paths` (read together, in blocks)."""
    total = total_sq = 0.0
    count = 0
    handles = [sf.SoundFile(str(p)) for p in paths]
    try:
        while True:
            blocks = [h.read(BLOCK, dtype="float64", always_2d=True) for h in handles]
            if not blocks[0].size:
                break
            mono = sum(b.mean(1) for b in blocks)
            total += float(mono.sum())
            total_sq += float(np.dot(mono, mono))
            count += mono.size
    finally:
        for h in handles:
            h.close()
    mean = total / max(count, 1)
    var = (total_sq - count * mean ** 2) / max(count - 1, 1)
    return mean, math.sqrt(max(var, 0.0))


def _scan_track(files: TrackFiles) -> dict:
    """length/samplerate/channels of the track + mean/std of the (channel-mean) mixture,
    and which files make each stem (relative to the track folder)."""
    infos = _infos(files)
    ref = next(iter(infos.values()))
    mix = files.all_files if files.summed else files.stems[MIXTURE]
    mean, std = _mono_stats(mix)
    rel = {s: [p.relative_to(files.folder).as_posix() for p in ps]
           for s, ps in files.stems.items()}
    return {"length": int(ref.frames), "samplerate": int(ref.samplerate),
            "channels": int(ref.channels), "mean": mean, "std": std, "files": rel,
            "summed": files.summed}


def resolve_files(folder, sources, residual_source=None, stem_files=None, mixture="auto"):
    """The TrackFiles of a track; DatasetError naming the first problem's file and fix."""
    files, problems = track_files(folder, sources, residual_source, stem_files, mixture)
    if problems:
        file, message, fix = problems[0]
        raise LayoutError(file, message, fix + " (`python -m tools.verify_dataset` lists "
                          "every problem)")
    return files


class Metadata(dict):
    """{split: {track: {length, samplerate, channels, mean, std, files, summed, folder}}} +
    `reused`/`scanned` counts and the tracks whose mixture is the sum of their stems."""
    reused = 0
    scanned = 0


def _root_cache(cache_dir, root: Root):
    path = cache_path(cache_dir, root.path, "stems")
    return path, load_cache(path)


def build_metadata(root, sources, cache_dir, residual_source=None, stem_files=None,
                   mixture="auto", valid_tracks=None):
    """Metadata of every track of every split, each root cached in
    cache_dir/stems_<hash of the root>.json (one entry per track).

    `root` is a folder or a list of `roots.Root`. A track is rescanned only when one of its
    audio files changed (size, mtime, added, removed) or what it is read for changed.
    """
    roots = list(root) if isinstance(root, (list, tuple)) else config_roots(root, None,
                                                                             check=False)
    params = [list(sources), residual_source, stem_files or {}, mixture]
    names = disk_sources(sources, residual_source, stem_files)
    refs = split_tracks(roots, valid_tracks, names)
    caches = {r: _root_cache(cache_dir, r) for r in roots}
    new = {r: {} for r in roots}
    meta = Metadata({s: OrderedDict() for s in SPLITS})
    for split in SPLITS:
        for ref in refs[split]:
            entry = caches[ref.root][1].get(_cache_key(ref))
            stamp = folder_stamp(ref.folder)
            if entry is not None and entry.get("stamp") == stamp and \
                    entry.get("params") == params:
                meta.reused += 1
            else:
                files = resolve_files(ref.folder, sources, residual_source, stem_files,
                                      mixture)
                entry = {"stamp": stamp, "params": params, "meta": _scan_track(files)}
                meta.scanned += 1
            new[ref.root][_cache_key(ref)] = entry
            meta[split][ref.key] = dict(entry["meta"], folder=str(ref.folder))
    for r in roots:
        if new[r] != caches[r][1]:
            try:
                save_cache(caches[r][0], r.path, new[r])
            except OSError as err:  # a read-only or full place: go on without a cache
                logger.warning("cannot write the metadata cache %s (%s): continuing "
                               "without it", caches[r][0], err)
    logger.info("metadata of %s: %d tracks scanned, %d reused from cache",
                ", ".join(str(r.path) for r in roots), meta.scanned, meta.reused)
    return meta


def _cache_key(ref: TrackRef) -> str:
    return f"{ref.origin}/{ref.folder.relative_to(ref.root.path / ref.origin).as_posix()}"


# ----------------------------------------------------------------------------- dataset
def convert_channels(wav, channels):
    """(C, T) -> (channels, T): average to mono, repeat mono, or keep the first channels."""
    have = wav.shape[0]
    if have == channels:
        return wav
    if channels == 1:
        return wav.mean(0, keepdim=True)
    if have == 1:
        return wav.expand(channels, -1)
    if have > channels:
        return wav[:channels]
    raise DatasetError(f"cannot make {channels} channels from {have}")


class StemDataset:
    """Examples (1 + S, C, T) = [mixture, *sources] of one split.

    segment/shift in seconds (segment None: whole tracks, one example per track). Files at
    another rate are resampled (julius.resample_frac); channels converted. `residual_source`
    is not read: it is mixture - sum(the other sources).
    """

    def __init__(self, root, split, sources, metadata, segment=None, shift=None,
                 samplerate=44100, channels=2, normalize=True, residual_source=None,
                 stem_files=None):  # root, stem_files: unused (the metadata says)
        check_residual_source(residual_source, sources)
        self.split = split
        self.sources = list(sources)
        self.metadata = OrderedDict(metadata.get(split, {}))
        self.segment = segment
        self.shift = shift or segment
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        self.normalize = normalize
        self.residual_source = residual_source
        self.num_examples = []
        for meta in self.metadata.values():
            duration = meta["length"] / meta["samplerate"]
            if segment is None or duration < segment:
                self.num_examples.append(1)
            else:
                self.num_examples.append(int(math.ceil((duration - segment) / self.shift) + 1))

    def __len__(self):
        return sum(self.num_examples)

    def _read(self, folder, files, offset, frames):
        """The sum of a stem's files (its parts), channels converted."""
        out = None
        for rel in files:
            data, _ = sf.read(str(folder / rel), start=offset, frames=frames,
                              dtype="float32", always_2d=True)
            wav = convert_channels(torch.from_numpy(data.T.copy()), self.channels)
            out = wav if out is None else out + wav[..., :out.shape[-1]]
        return out

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        for name, examples in zip(self.metadata, self.num_examples):
            if index >= examples:
                index -= examples
                continue
            return self._example(name, index)
        raise IndexError(index)

    def _example(self, name, index):
        meta = self.metadata[name]
        sr = meta["samplerate"]
        offset, frames = 0, -1
        if self.segment is not None:
            offset = int(sr * self.shift * index)
            frames = int(math.ceil(sr * self.segment))
        folder = Path(meta["folder"])
        files = meta["files"]
        stems = {s: self._read(folder, files[s], offset, frames)
                 for s in self.sources if s != self.residual_source}
        if meta.get("summed"):
            mix = sum(stems.values())
        else:
            mix = self._read(folder, files[MIXTURE], offset, frames)
        if self.residual_source is not None:
            stems[self.residual_source] = mix - sum(stems.values(), torch.zeros_like(mix))
        length = mix.shape[-1]
        for s, wav in stems.items():
            if wav.shape[-1] != length:
                raise DatasetError(f"{folder / files[s][0]} has {wav.shape[-1]} frames at "
                                   f"offset {offset}, the mixture has {length}. Fix: run "
                                   "`python -m tools.verify_dataset`")
        example = torch.stack([mix] + [stems[s] for s in self.sources])
        if sr != self.samplerate:
            example = julius.resample_frac(example, sr, self.samplerate)
        if self.normalize:
            std = meta["std"] if meta["std"] > 1e-8 else 1.0
            example[0] = (example[0] - meta["mean"]) / std
            example[1:] = (example[1:] - meta["mean"] / len(self.sources)) / std
        if self.segment is not None:
            target = int(self.segment * self.samplerate)
            example = example[..., :target]
            example = F.pad(example, (0, target - example.shape[-1]))
        return example


# ----------------------------------------------------------------------------- from config
def dataset_roots(data: DataConfig, progress=True, check=True) -> tp.List[Root]:
    """The roots of dset.wav (a folder or a list) and dset.musdb; the synthetic dataset
    (generated once) when both are null."""
    if data.wav_required and data.musdb is None:
        raise ConfigError("dset.wav is required with dset=wav. Fix: dset.wav=/path/to/"
                          "stems (root/{train,valid}/TRACK/{mixture,SOURCE}.wav), "
                          "dset.musdb=/path/to/musdb18hq, or dset=synth.")
    if data.synthetic:
        from demucs_lora.data.synth import ensure_synth
        path = ensure_synth(data.synth_dset(), data.sources, data.residual_source,
                            progress=progress, stem_files=data.stem_files)
        return [Root(Path(path), "wav", "")]
    return config_roots(list(data.wav), data.musdb, check=check)


def dataset_root(data: DataConfig, progress=True, check=True):
    """The first root's folder (the synthetic dataset's, or dset.wav's)."""
    return dataset_roots(data, progress, check)[0].path


def train_segment(data: DataConfig) -> float:
    """Seconds read per training example: segment + shift (room for the random shift),
    times 1 + max_tempo / 100 with dset.augment.repitch on (room for a faster tempo)."""
    return (data.segment + data.shift) * room(data.augment.get("repitch"))


def config_metadata(data: DataConfig, progress=True) -> Metadata:
    """build_metadata for a run's data (its roots, stem files, mixture, hold-out)."""
    check_valid_tracks(data.valid_tracks)
    roots = dataset_roots(data, progress=progress)
    return build_metadata(roots, list(data.sources), data.metadata, data.residual_source,
                          dict(data.stem_files), data.mixture, data.valid_tracks)


def log_splits(meta: Metadata, data: DataConfig) -> None:
    """Which tracks were held out or taken as MUSDB's validation, and which are summed."""
    valid = list(meta["valid"])
    if data.valid_tracks is not None or data.musdb is not None:
        logger.info("valid tracks (%d): %s", len(valid), ", ".join(valid))
    summed = [f"{split}/{name}" for split in SPLITS for name, m in meta[split].items()
              if m.get("summed")]
    if summed:
        logger.info("mixture = sum of the stems (no mixture file, dset.mixture=%s) in %d "
                    "tracks: %s", data.mixture, len(summed), ", ".join(summed))


def get_datasets(data: DataConfig):
    """(train, valid, test) StemDatasets of `data.sources`; valid/test are whole tracks.

    Train examples are `train_segment` long; `build_augment` crops them to dset.segment.
    """
    meta = config_metadata(data)
    log_splits(meta, data)
    common = dict(sources=list(data.sources), metadata=meta, samplerate=data.samplerate,
                  channels=data.channels, residual_source=data.residual_source)
    train = StemDataset(None, "train", segment=train_segment(data), shift=data.shift,
                        **common)
    valid = StemDataset(None, "valid", **common)
    test = StemDataset(None, "test", **common)
    if len(train) == 0 or len(valid) == 0:
        split = "train" if len(train) == 0 else "valid"
        fix = ("set dset.valid_tracks=N to hold out N train tracks"
               if split == "valid" else "add tracks")
        raise DatasetError(f"no tracks in {split}/ of {dataset_root(data)}. Fix: "
                           f"{fix}, or run `python -m tools.verify_dataset` on it.")
    return train, valid, test
