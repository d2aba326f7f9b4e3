"""Turn a folder of DAW (or other) exports into the training layout, file by file.

    python -m tools.prepare_dataset SRC OUT [--force] [dset.samplerate=44100 dset.channels=2]

Each track folder of SRC (SRC/{train,valid,test}/TRACK, or SRC/TRACK: written to train/)
becomes OUT/SPLIT/TRACK/{mixture,STEM}.wav, float WAV at dset.samplerate with
dset.channels: every file resampled with julius, channels mapped (mono <-> stereo, as
`stems.convert_channels`), a part folder (`drums/kick.wav`, ...) summed into its stem, every
stem padded or trimmed to the track's length (the mixture's, else the longest stem's) and
the mixture written as the stems' sum when the track has none. SRC is only read; every file
is written atomically, and a file whose content would not change is left as it is (running
it again changes nothing). The command line is ``demucs_lora.commands.prepare_dataset``.
"""
from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch

from demucs_lora.core.errors import ConfigError, DatasetError
from demucs_lora.core.files import atomic_write
from demucs_lora.data.layout import MIXTURE, LayoutError, audio_in
from demucs_lora.data.roots import SPLITS, list_tracks
from demucs_lora.data.stems import convert_channels


@dataclasses.dataclass
class Change:
    sources: tp.List[str]      # the SRC files (relative to SRC)
    target: str                # the OUT file (relative to OUT)
    what: tp.List[str]         # what was done; [] = the same audio
    written: bool              # False: OUT already held exactly this

    def format(self) -> str:
        src = " + ".join(self.sources) if self.sources else "(none)"
        done = ", ".join(dict.fromkeys(self.what)) or "copied as is"
        return f"{src} -> {self.target}: {done}" + ("" if self.written else " (unchanged)")


def source_tracks(src: Path, names: tp.Collection[str] = ()) -> tp.List[tp.Tuple[str, str]]:
    """(split, track) of SRC: its split folders, or its tracks as train/ when it has none."""
    if any((src / s).is_dir() for s in SPLITS):
        return [(s, t) for s in SPLITS if (src / s).is_dir() for t in list_tracks(src / s, names)]
    return [("train", t) for t in list_tracks(src, names)]


def track_stems(folder: Path) -> tp.Dict[str, tp.List[Path]]:
    """{stem: files}: one audio file per stem, or a part folder (its files, summed)."""
    stems: tp.Dict[str, tp.List[Path]] = {}
    for file in audio_in(folder):
        if file.stem in stems:
            raise LayoutError(file, f"{stems[file.stem][0].name} and {file.name} are two files "
                              f"for the stem {file.stem}", "keep one of them in SRC")
        stems[file.stem] = [file]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parts = audio_in(sub)
        if parts and sub.name in stems:
            raise LayoutError(sub, f"{stems[sub.name][0].name} and the part folder {sub.name}/ "
                              f"both give the stem {sub.name}", "keep one of them in SRC")
        if parts:
            stems[sub.name] = parts
    return stems


def _read(file: Path, samplerate: int, channels: int, what: tp.List[str]) -> torch.Tensor:
    try:
        data, rate = sf.read(str(file), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types
        raise DatasetError(f"cannot read {file}: {err}. Fix: re-export it (WAV or FLAC)"
                           ) from None
    wav = torch.from_numpy(data.T.copy())
    if rate != samplerate:
        wav = julius.resample_frac(wav, rate, samplerate)
        what.append(f"resampled {rate} -> {samplerate} Hz")
    if wav.shape[0] != channels:
        what.append(f"{wav.shape[0]} -> {channels} channels")
        wav = convert_channels(wav, channels).contiguous()
    return wav


def _fit(wav: torch.Tensor, length: int, what: tp.List[str]) -> torch.Tensor:
    if wav.shape[-1] < length:
        what.append(f"padded {length - wav.shape[-1]} frames")
        return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
    if wav.shape[-1] > length:
        what.append(f"trimmed {wav.shape[-1] - length} frames")
    return wav[..., :length]


def _same(path: Path, data: np.ndarray, samplerate: int) -> bool:
    try:
        old, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:  # absent or unreadable: write it
        return False
    return rate == samplerate and old.shape == data.shape and np.array_equal(old, data)


def prepare_track(src: Path, out: Path, split: str, track: str, samplerate: int,
                  channels: int) -> tp.List[Change]:
    """Write one track of OUT; returns what changed per written file."""
    folder, dest = src / split / track, out / split / track
    if not folder.is_dir():                   # SRC has no split folders: its tracks
        folder = src / track
    stems = track_stems(folder)
    notes: tp.Dict[str, tp.List[str]] = {}
    audio: tp.Dict[str, torch.Tensor] = {}
    for name, files in stems.items():
        what = notes.setdefault(name, [])
        wavs = [_read(f, samplerate, channels, what) for f in files]
        longest = max(w.shape[-1] for w in wavs)
        audio[name] = sum(torch.nn.functional.pad(w, (0, longest - w.shape[-1])) for w in wavs)
        if len(files) > 1:
            what.insert(0, f"{len(files)} parts summed")
    if not audio:
        raise DatasetError(f"{folder}: no audio file. Fix: remove the folder from SRC or add "
                           "its stems")
    length = (audio[MIXTURE].shape[-1] if MIXTURE in audio
              else max(a.shape[-1] for a in audio.values()))
    for name in list(audio):
        audio[name] = _fit(audio[name], length, notes[name])
    if MIXTURE not in audio:
        audio[MIXTURE] = sum(audio.values())
        notes[MIXTURE], stems[MIXTURE] = ["written as the sum of the stems"], []
    return [_write(dest / f"{name}.wav", audio[name], samplerate, notes[name],
                   [f.relative_to(src).as_posix() for f in stems[name]], out)
            for name in sorted(audio)]


def _write(path: Path, wav: torch.Tensor, samplerate: int, what: tp.List[str],
           sources: tp.List[str], out: Path) -> Change:
    data = np.ascontiguousarray(wav.numpy().T, dtype=np.float32)
    if not any(s.lower().endswith(".wav") for s in sources) and sources:
        what.append(f"{Path(sources[0]).suffix.lstrip('.')} -> float WAV")
    written = not _same(path, data, samplerate)
    if written:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: sf.write(tmp, data, samplerate, subtype="FLOAT",
                                                format="WAV"))
    return Change(sources, path.relative_to(out).as_posix(), what, written)


def check_folders(src: Path, out: Path, force: bool) -> None:
    """SRC exists and is not OUT (nor inside it, nor around it); OUT is empty or --force."""
    src, out = src.resolve(), out.resolve()
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder. Fix: give the folder of your exports")
    if src == out or src in out.parents or out in src.parents:
        raise ConfigError(f"OUT={out} and SRC={src} overlap: SRC is never modified. Fix: "
                          "give an OUT folder outside SRC")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"OUT={out} is not empty. Fix: pass --force to update it (files "
                          "that would not change are left as they are), or another OUT")


def prepare_dataset(src: Path, out: Path, samplerate: int, channels: int, force: bool = False,
                    names: tp.Collection[str] = ()) -> tp.List[Change]:
    """Every track of SRC into OUT (see the module docstring); the per-file changes."""
    src, out = Path(src), Path(out)
    check_folders(src, out, force)
    changes: tp.List[Change] = []
    tracks = source_tracks(src, names)
    if not tracks:
        raise DatasetError(f"{src}: no track folder (folders of audio files). Fix: give the "
                           "folder that holds one folder per track")
    for split, track in tracks:
        changes += prepare_track(src, out, split, track, samplerate, channels)
    return changes
