"""Stem-folder dataset (demucs wav layout), metadata cache and augmentation.

Layout: root/{train,valid,test}/TRACK/{mixture,SOURCE}.wav, read with soundfile.
An item is a tensor (1 + S, C, T) = [mixture, stems...] like demucs' Wavset for validation.
Normalization keeps the stems summing to the mixture: mixture -> (mix - mean) / std and
each of the S stems -> (stem - mean / S) / std (demucs subtracts `mean` from every stem).
"""
import hashlib
import json
import logging
import math
import os
import typing as tp
from collections import OrderedDict
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch
from demucs import augment as daug
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from demucs_lora.core.files import atomic_write_text
from demucs_lora.core.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)
MIXTURE = "mixture"
EXT = ".wav"
SPLITS = ("train", "valid", "test")
BLOCK = 1 << 18                     # frames per read when scanning whole files
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- cache helpers
def file_stamp(path):
    """(size, mtime_ns) of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_path(cache_dir, root, kind):
    """cache_dir/KIND_<hash of the resolved root>.json (one file per dataset and kind)."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{kind}_{digest}.json"


def load_cache(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("tracks", {}) if data.get("version") == CACHE_VERSION else {}


def save_cache(path, root, tracks):
    """Atomic write (temporary file, then rename)."""
    atomic_write_text(path, json.dumps({"version": CACHE_VERSION,
                                        "root": str(Path(root).resolve()), "tracks": tracks}))


def list_tracks(split_dir):
    """Track folders of a split, names relative to the split: folders holding .wav files
    (their own sub-folders, say a `stems_old/` backup, are not looked into and do not
    make the track vanish), and leaf folders (reported as tracks with missing files)."""
    split_dir = Path(split_dir)
    tracks = []
    for folder, subdirs, files in os.walk(split_dir, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if Path(folder) == split_dir:
            continue
        if not subdirs or any(f.endswith(EXT) and not f.startswith(".") for f in files):
            tracks.append(Path(folder).relative_to(split_dir).as_posix())
            subdirs[:] = []
    return sorted(tracks)


def disk_sources(sources, residual_source=None, stem_files=None):
    """The files a track must have: mixture + every source but the residual one
    (`stem_files` maps a source to its file name when they differ: {vocal: vocals})."""
    files = dict(stem_files or {})
    return [MIXTURE] + [files.get(s, s) for s in sources if s != residual_source]


# ----------------------------------------------------------------------------- metadata
def _scan_track(folder, names):
    """length/samplerate/channels of the track + mean/std of the (channel-mean) mixture."""
    infos = {}
    for name in names:
        file = folder / f"{name}{EXT}"
        if not file.is_file():
            raise DatasetError(f"missing file {file}. Fix: add it, or run "
                               "`python -m tools.verify_dataset` to list every problem.")
        try:
            infos[name] = sf.info(str(file))
        except Exception as err:  # soundfile raises several types
            raise DatasetError(f"cannot read {file}: {err}") from err
    ref = infos[MIXTURE]
    for name, info in infos.items():
        for key in ("frames", "samplerate", "channels"):
            if getattr(info, key) != getattr(ref, key):
                raise DatasetError(
                    f"{folder / (name + EXT)}: {key} {getattr(info, key)} differs from "
                    f"{folder / (MIXTURE + EXT)} ({getattr(ref, key)}). Fix: re-export the "
                    "track's files with the same settings.")
    total = total_sq = 0.0
    count = 0
    with sf.SoundFile(str(folder / f"{MIXTURE}{EXT}")) as f:
        for block in f.blocks(blocksize=BLOCK, dtype="float64", always_2d=True):
            mono = block.mean(1)
            total += float(mono.sum())
            total_sq += float(np.dot(mono, mono))
            count += mono.size
    mean = total / max(count, 1)
    var = (total_sq - count * mean ** 2) / max(count - 1, 1)
    return {"length": int(ref.frames), "samplerate": int(ref.samplerate),
            "channels": int(ref.channels), "mean": mean, "std": math.sqrt(max(var, 0.0))}


class Metadata(dict):
    """{split: {track: {length, samplerate, channels, mean, std}}} + `reused`/`scanned`."""
    reused = 0
    scanned = 0


def build_metadata(root, sources, cache_dir, residual_source=None, stem_files=None):
    """Metadata of every track of every split, cached in cache_dir/stems_<hash>.json.

    A track is rescanned only when one of its files changed (size or mtime) or the set of
    files it needs changed. Missing split folders give empty splits.
    """
    root = Path(root)
    names = disk_sources(sources, residual_source, stem_files)
    path = cache_path(cache_dir, root, "stems")
    cache = load_cache(path)
    new_cache, meta = {}, Metadata()
    for split in SPLITS:
        meta[split] = OrderedDict()
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for track in list_tracks(split_dir):
            folder = split_dir / track
            key = f"{split}/{track}"
            stamp = {n: file_stamp(folder / f"{n}{EXT}") for n in names}
            entry = cache.get(key)
            if entry is not None and entry.get("stamp") == stamp:
                meta.reused += 1
            else:
                entry = {"stamp": stamp, "meta": _scan_track(folder, names)}
                meta.scanned += 1
            new_cache[key] = entry
            meta[split][track] = entry["meta"]
    if new_cache != cache:
        try:
            save_cache(path, root, new_cache)
        except OSError as err:  # a read-only or full place: go on without a cache
            logger.warning("cannot write the metadata cache %s (%s): continuing without it",
                           path, err)
    logger.info("metadata of %s: %d tracks scanned, %d reused from cache",
                root, meta.scanned, meta.reused)
    return meta


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
                 stem_files=None):
        if residual_source is not None and residual_source not in sources:
            raise ConfigError(f"residual_source={residual_source!r} is not in sources "
                              f"{list(sources)}")
        self.root = Path(root) / split
        self.split = split
        self.sources = list(sources)
        self.metadata = OrderedDict(metadata.get(split, {}))
        self.segment = segment
        self.shift = shift or segment
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        self.normalize = normalize
        self.residual_source = residual_source
        self.files = {s: dict(stem_files or {}).get(s, s) for s in self.sources}
        self.num_examples = []
        for meta in self.metadata.values():
            duration = meta["length"] / meta["samplerate"]
            if segment is None or duration < segment:
                self.num_examples.append(1)
            else:
                self.num_examples.append(int(math.ceil((duration - segment) / self.shift) + 1))

    def __len__(self):
        return sum(self.num_examples)

    def _read(self, file, offset, frames):
        data, _ = sf.read(str(file), start=offset, frames=frames, dtype="float32",
                          always_2d=True)
        return convert_channels(torch.from_numpy(data.T.copy()), self.channels)

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
        folder = self.root / name
        mix = self._read(folder / f"{MIXTURE}{EXT}", offset, frames)
        stems = {s: self._read(folder / f"{self.files[s]}{EXT}", offset, frames)
                 for s in self.sources if s != self.residual_source}
        if self.residual_source is not None:
            stems[self.residual_source] = mix - sum(stems.values(), torch.zeros_like(mix))
        length = mix.shape[-1]
        for s, wav in stems.items():
            if wav.shape[-1] != length:
                raise DatasetError(f"{folder / (self.files[s] + EXT)} has {wav.shape[-1]} "
                                   f"frames at offset {offset}, "
                                   f"{folder / (MIXTURE + EXT)} has {length}")
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


# ----------------------------------------------------------------------------- augmentation
class SegmentShift(daug.Shift):
    """demucs' Shift that crops the batch to `length` samples: random per-source offsets in
    training (all the same with `same`), the first `length` samples in eval."""

    def __init__(self, length, same=False, random=True):
        super().__init__(shift=0, same=same)
        self.length = int(length)
        self.random = random

    def forward(self, wav):
        if not self.random:
            return wav[..., :self.length]
        self.shift = max(0, wav.shape[-1] - self.length)
        return super().forward(wav)


def _flag(value, default):
    """A config entry that may be a bool, null or a dict of kwargs."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(default)
    return {**default, **dict(value)}


def build_augment(cfg_augment, samplerate, segment):
    """nn.Sequential of demucs.augment modules for a batch of stems (B, S, C, T).

    First crops to `segment` seconds with a random time shift per source (demucs' Shift;
    give it examples longer than `segment`, see `train_segment`; `time_shift: false` crops
    the first `segment` seconds instead), then FlipChannels +
    FlipSign (`flip`), Scale (`scale: [min, max]`), Remix (`remix`: shuffle stems across
    the batch). Recompute the mixture as the sum of the stems: `augment_batch` does it.
    """
    cfg = dict(cfg_augment or {})
    mods = [SegmentShift(int(segment * samplerate), same=bool(cfg.get("shift_same", False)),
                         random=bool(cfg.get("time_shift", True)))]
    if cfg.get("flip", False):
        mods += [daug.FlipChannels(), daug.FlipSign()]
    scale = cfg.get("scale")
    if scale is not None and scale is not False:
        if isinstance(scale, (int, float)) or len(scale) != 2:
            raise ConfigError(f"dset.augment.scale={scale!r}: expected [min, max] or null")
        mods.append(daug.Scale(proba=1.0, min=float(scale[0]), max=float(scale[1])))
    remix = _flag(cfg.get("remix"), {"proba": 1.0, "group_size": None})
    if remix is not None:
        mods.append(daug.Remix(**remix))
    return nn.Sequential(*mods)


def augment_batch(augment, batch):
    """(B, 1 + S, C, T) [mixture, stems] -> augmented stems, mixture = their sum."""
    stems = augment(batch[:, 1:].clone())      # demucs' Scale works in place
    return torch.cat([stems.sum(1, keepdim=True), stems], 1)


def calibration_batches(loader, augment, device: torch.device) -> tp.Iterator:
    """(mix, stems) batches of the train loader, augmented as in training (the data
    that gradient rank allocation and rank adaptation score layers on)."""
    for batch in loader:
        batch = augment_batch(augment, batch.to(device))
        yield batch[:, 0], batch[:, 1:]


# ----------------------------------------------------------------------------- from config
def _abspath(path):
    try:
        from hydra.utils import to_absolute_path
        return Path(to_absolute_path(str(path)))
    except Exception:  # no hydra run: relative to the cwd
        return Path(path).expanduser().resolve()


def dataset_root(cfg, sources, progress=True, check=True):
    """cfg.dset.wav (absolute), or the synthetic dataset (generated once) when it is null."""
    dset = cfg.dset
    if OmegaConf.is_config(dset) and OmegaConf.is_missing(dset, "wav"):
        raise ConfigError("dset.wav is required with dset=wav. Fix: dset.wav=/path/to/stems "
                          "(root/{train,valid}/TRACK/{mixture,SOURCE}.wav), or dset=synth.")
    if dset.get("wav") is None:
        from demucs_lora.data.synth import ensure_synth
        cfg_dset = dict(dset)
        cfg_dset["metadata"] = str(_abspath(dset.metadata))
        return ensure_synth(cfg_dset, sources, cfg.get("residual_source"), progress=progress,
                            stem_files=stem_files(cfg))
    root = _abspath(Path(str(dset.wav)).expanduser())
    if check and not root.is_dir():
        raise DatasetError(f"dset.wav={dset.wav}: {root} is not a folder. Fix: point it to "
                           "a folder with train/ and valid/ (TRACK/mixture.wav + stems).")
    return root


def stem_files(cfg):
    """dset.stem_files as a dict (source -> file name), {} when unset."""
    files = cfg.dset.get("stem_files") if "dset" in cfg else None
    return dict(OmegaConf.to_container(files) if OmegaConf.is_config(files) else files or {})


def train_segment(cfg_dset):
    """Seconds read per training example: segment + shift (room for the random shift)."""
    return float(cfg_dset.segment) + float(cfg_dset.shift or 0)


def get_datasets(cfg, sources):
    """(train, valid, test) StemDatasets from cfg.dset; valid/test are whole tracks.

    Train examples are `train_segment` long; `build_augment` crops them to dset.segment.
    """
    dset = cfg.dset
    residual = cfg.get("residual_source")
    root = dataset_root(cfg, sources)
    files = stem_files(cfg)
    meta = build_metadata(root, sources, _abspath(dset.metadata), residual, files)
    common = dict(sources=sources, metadata=meta, samplerate=dset.samplerate,
                  channels=dset.channels, residual_source=residual, stem_files=files)
    train = StemDataset(root, "train", segment=train_segment(dset), shift=dset.shift, **common)
    valid = StemDataset(root, "valid", **common)
    test = StemDataset(root, "test", **common)
    if len(train) == 0 or len(valid) == 0:
        raise DatasetError(f"{root}: no tracks in {'train' if len(train) == 0 else 'valid'}/. "
                           "Fix: run `python -m tools.verify_dataset` on it.")
    return train, valid, test
