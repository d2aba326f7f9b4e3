"""Which files make each stem of one track folder: formats, part folders, the mixture.

A stem `NAME` of a track folder is, in this order:

- one audio file `NAME.EXT` in any format soundfile reads (`AUDIO_EXTS`; two files for one
  stem, `bass.wav` and `bass.flac`, are an error naming both);
- a *part folder* `NAME/` of audio files, summed (`drums/{kick,snare,hihat}.wav`);
- a *part* of one part folder, `*/NAME.EXT` (a source `kick` read from `drums/kick.wav`).

`dset.stem_files` maps a source to another name (`{vocal: vocals}`), a path inside the track
(`{kick: drums/kick}`) or a list of them, summed (`{drums: [kick, snare, toms]}`).
The mixture follows `dset.mixture`: `file` (mixture.EXT must exist), `sum` (the sum of the
stems, any mixture file ignored) or `auto` (the file when there is one, else the sum).
Everything here names files; reading and checking them is stems.py's and verify.py's job.
"""
from __future__ import annotations

import os
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import ConfigError, DatasetError

MIXTURE = "mixture"
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
MIXTURE_MODES = ("auto", "file", "sum")
PREPARE_HINT = "or run `python -m tools.prepare_dataset SRC OUT` to rewrite the track"


class LayoutError(DatasetError):
    """A track folder whose files cannot be assigned to stems (names the files)."""

    def __init__(self, file: tp.Union[str, Path], message: str, fix: str):
        super().__init__(f"{file}: {message}. Fix: {fix}")
        self.file, self.message, self.fix = str(file), message, fix


def is_audio(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTS


def audio_in(folder: Path) -> tp.List[Path]:
    """The audio files directly in `folder` (sorted; none when it is not a folder)."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_audio(p.name))
    except OSError:
        return []


def _named(folder: Path, name: str) -> tp.List[Path]:
    return [p for p in audio_in(folder) if p.stem == name]


def _one_file(folder: Path, name: str) -> tp.Optional[Path]:
    files = _named(folder, name)
    if len(files) > 1:
        raise LayoutError(files[1], f"{' and '.join(p.name for p in files)} are two files "
                          f"for the stem {name} in {folder}", "keep one of them")
    return files[0] if files else None


def _part_of(folder: Path, name: str) -> tp.Optional[Path]:
    """`*/NAME.EXT`: a part of one part folder used as a source."""
    found = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()
                      and not p.name.startswith(".")):
        found += _named(sub, name)
    if len(found) > 1:
        raise LayoutError(found[1], f"{found[0]} and {found[1]} both give {name}",
                          f"set dset.stem_files={{{name}: "
                          f"{found[0].parent.name}/{name}}} to pick one")
    return found[0] if found else None


def locate(folder: Path, name: str) -> tp.List[Path]:
    """The files whose sum is stem `name` of a track folder ([] when it has none)."""
    folder = Path(folder)
    if "/" in name:                                   # a path inside the track: drums/kick
        sub, _, leaf = name.rpartition("/")
        one = _one_file(folder / sub, leaf) if leaf else None
        return [one] if one else audio_in(folder / name)
    file = _one_file(folder, name)
    parts = audio_in(folder / name)
    if file is not None and parts:
        raise LayoutError(file, f"{file.name} and the part folder {name}/ both give the "
                          f"stem {name}", f"move one of them out of {folder}")
    if file is not None:
        return [file]
    if parts:
        return parts
    part = _part_of(folder, name) if folder.is_dir() else None
    return [part] if part else []


def check_residual_source(residual: tp.Optional[str],
                          sources: tp.Optional[tp.Sequence[str]]) -> None:
    """``residual_source`` (the stem no file gives: mixture minus the others) must be one
    of the sources; ConfigError otherwise (None: no residual, or sources not known yet)."""
    if residual is not None and sources is not None and residual not in list(sources):
        raise ConfigError(f"residual_source={residual!r} must be one of "
                          f"dset.sources={list(sources)}")


def wanted_names(sources: tp.Sequence[str], residual: tp.Optional[str] = None,
                 stem_files: tp.Optional[tp.Mapping] = None) -> tp.Dict[str, tp.List[str]]:
    """{source: [names inside the track]} of every source but the residual one."""
    files = dict(stem_files or {})
    out = {}
    for source in sources:
        if source == residual:
            continue
        given = files.get(source, source)
        out[source] = ([str(n) for n in given] if isinstance(given, (list, tuple))
                       else [str(given)])
    return out


class TrackFiles(tp.NamedTuple):
    folder: Path
    stems: tp.Dict[str, tp.List[Path]]   # source -> files summed (mixture first, when a file)
    summed: bool                          # the mixture is the sum of the stems

    @property
    def all_files(self) -> tp.List[Path]:
        return [p for files in self.stems.values() for p in files]


def track_files(folder: Path, sources: tp.Sequence[str], residual: tp.Optional[str] = None,
                stem_files: tp.Optional[tp.Mapping] = None, mixture: str = "auto",
                ) -> tp.Tuple[TrackFiles, tp.List[tp.Tuple[str, str, str]]]:
    """(the files of each stem, problems as (file, message, fix)); a stem with a problem
    gets no files."""
    folder = Path(folder)
    problems: tp.List[tp.Tuple[str, str, str]] = []
    stems: tp.Dict[str, tp.List[Path]] = {}
    summed = False
    if mixture not in MIXTURE_MODES:
        raise LayoutError(folder, f"dset.mixture={mixture!r}", f"use one of {MIXTURE_MODES}")
    for source, names in [(MIXTURE, [MIXTURE])] + list(wanted_names(
            sources, residual, stem_files).items()):
        if source == MIXTURE and mixture == "sum":
            summed = True
            continue
        files: tp.List[Path] = []
        for name in names:
            try:
                found = locate(folder, name)
            except LayoutError as err:
                problems.append((err.file, err.message, err.fix))
                found = []
            if not found and source == MIXTURE and mixture == "auto" and residual is None:
                summed = True
            elif not found:
                problems.append(_missing(folder, source, name, residual, mixture))
            files += found
        if files:
            stems[source] = files
    if summed and residual is not None:
        problems.append((str(folder / MIXTURE), "residual_source needs a mixture file",
                         f"add {MIXTURE}.wav, or unset residual_source"))
    return TrackFiles(folder, stems, summed), problems


def stem_names(folder: Path) -> tp.List[str]:
    """Stem names a track folder offers: its files, part folders and their parts."""
    folder = Path(folder)
    names = {p.stem for p in audio_in(folder)}
    if folder.is_dir():
        for sub in folder.iterdir():
            parts = audio_in(sub) if sub.is_dir() else []
            if parts:
                names.add(sub.name)
                names.update(p.stem for p in parts)
    return sorted(names - {MIXTURE})


def _missing(folder: Path, source: str, name: str, residual: tp.Optional[str],
             mixture: str) -> tp.Tuple[str, str, str]:
    file = folder / f"{name}.wav"
    if source == MIXTURE:
        how = ("set dset.mixture=auto (the sum of the stems)" if mixture == "file"
               else "add mixture.wav (residual_source needs it)")
        return (str(file), f"missing file {MIXTURE}.* in {folder}", how)
    have = stem_names(folder)
    other = "" if residual else f", or set residual_source={source}: mixture - other stems"
    if have:
        fix = (f"your files have {', '.join(have)}; set dset.sources=[{', '.join(have)}] "
               f"(or add {name}.wav, or map it with dset.stem_files{other})")
    else:
        fix = f"add {name}.wav (or a folder {name}/ of parts), or remove '{source}' from " \
              f"dset.sources{other}"
    return (str(file), f"missing file {name}.wav (nor .flac/.ogg/.aiff, nor a folder "
            f"{name}/ of parts)", fix)


def folder_stamp(folder: Path) -> tp.Dict[str, tp.Any]:
    """(size, mtime) of every audio file of a track folder and its part folders: a cache
    entry is reused only when none changed, appeared or vanished."""
    folder = Path(folder)
    out: tp.Dict[str, tp.Any] = {}
    for file in audio_in(folder) + [p for sub in sorted(folder.glob("*/")) if sub.is_dir()
                                    for p in audio_in(sub)]:
        st = file.stat()
        out[file.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def is_track(folder: Path, subdirs: tp.Sequence[str], files: tp.Sequence[str],
             names: tp.Collection[str] = ()) -> bool:
    """A track folder: it holds audio files, or is a leaf, or one of its sub-folders is a
    wanted stem's part folder (or holds a wanted part and no mixture)."""
    if not subdirs or any(is_audio(f) for f in files):
        return True
    tops = {n.split("/")[0] for n in names}
    for sub in subdirs:
        if sub in tops and audio_in(Path(folder) / sub):
            return True
        inside = {p.stem for p in audio_in(Path(folder) / sub)}
        if inside & set(names) and MIXTURE not in inside:
            return True
    return False
