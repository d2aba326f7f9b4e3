"""Which track folders make each split: one or several roots, MUSDB18-HQ, hold-out.

    dset.wav=/data/stems                 root/{train,valid,test}/TRACK/...
    dset.wav=[/data/mine, /data/other]   the tracks of every root, split by split
    dset.musdb=/data/musdb18hq           train/ and test/ as downloaded: valid is the 14
                                         official tracks of the `musdb` package's list
    dset.valid_tracks=2 (or 0.1)         a root without valid/ tracks holds out 2 (10%) of
                                         its train tracks, chosen by a hash of their names

A track is keyed `NAME` (one root) or `ROOT:NAME` (several roots: duplicate names across
roots are fine). Every split assignment is logged by the callers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import typing as tp
from pathlib import Path

from demucs_lora.core.checks import is_number, value_error
from demucs_lora.core.errors import DatasetError
from demucs_lora.data.layout import is_track

SPLITS = ("train", "valid", "test")
MUSDB_INSTALL = "pip install musdb"


class Root(tp.NamedTuple):
    path: Path
    kind: str                      # "wav" | "musdb"
    label: str                     # key prefix ("" with a single root)


class TrackRef(tp.NamedTuple):
    key: str                       # the name in metadata and logs
    folder: Path                   # the track folder
    root: Root
    origin: str                    # the split folder it lives in (train/valid/test)


def list_tracks(split_dir: Path, names: tp.Collection[str] = ()) -> tp.List[str]:
    """Track folders of a split, relative names (`layout.is_track`: audio files, a leaf,
    or a part folder of a wanted stem; the sub-folders of a track are not looked into)."""
    split_dir = Path(split_dir)
    tracks = []
    for folder, subdirs, files in os.walk(split_dir, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if Path(folder) == split_dir:
            continue
        if is_track(Path(folder), subdirs, files, names):
            tracks.append(Path(folder).relative_to(split_dir).as_posix())
            subdirs[:] = []
    return sorted(tracks)


def musdb_validation_tracks() -> tp.List[str]:
    """The official MUSDB18 validation track names, read from the `musdb` package's
    configs/mus.yaml without importing it (its import pulls stempeg and ffmpeg)."""
    spec = importlib.util.find_spec("musdb")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dset.musdb needs the validation track list of the `musdb` "
                           f"package, which is not installed. Fix: {MUSDB_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "configs" / "mus.yaml"
    import yaml
    try:
        names = yaml.safe_load(path.read_text())["validation_tracks"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise DatasetError(f"{path}: no validation_tracks list ({err}). Fix: reinstall "
                           f"the musdb package ({MUSDB_INSTALL})") from None
    return [str(n) for n in names]


def config_roots(paths: tp.Any, musdb: tp.Optional[str], check: bool = True
                 ) -> tp.List[Root]:
    """Roots from dset.wav (a path or a list) and dset.musdb (checked to be folders; a
    MUSDB root without train/ is always an error)."""
    given = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
    roots = [(Path(str(p)), "wav") for p in given]
    if musdb is not None:
        roots.append((Path(str(musdb)), "musdb"))
    labels = [p.name or str(p) for p, _ in roots]
    out = []
    for i, (path, kind) in enumerate(roots):
        label = "" if len(roots) == 1 else (labels[i] if labels.count(labels[i]) == 1
                                             else f"{labels[i]}{i}")
        out.append(Root(path, kind, label))
    for root in out:
        key = "dset.musdb" if root.kind == "musdb" else "dset.wav"
        if check and not root.path.is_dir():
            raise DatasetError(f"{key}={root.path}: not a folder. Fix: point it to a folder "
                               "with train/ and valid/ (TRACK/mixture.wav + stems)"
                               + (" (MUSDB18-HQ as downloaded: train/ and test/)"
                                  if root.kind == "musdb" else ""))
        stems_mp4 = sorted((root.path / "train").glob("*.stem.mp4"))[:1]
        if root.kind == "musdb" and stems_mp4:
            raise DatasetError(f"dset.musdb={root.path}: {stems_mp4[0].name} is the compressed "
                               "MUSDB18 (.stem.mp4), which is not read. Fix: download "
                               "MUSDB18-HQ, or convert it to folders of WAV files with the "
                               "musdb package's `musdbconvert` (pip install musdb; needs "
                               "ffmpeg)")
        if root.kind == "musdb" and not (root.path / "train").is_dir():
            raise DatasetError(f"dset.musdb={root.path}: no train/ folder in it. Fix: give the "
                               "folder of MUSDB18-HQ as unzipped (it holds train/ and test/; "
                               "the compressed .stem.mp4 MUSDB18 is not read: download "
                               "MUSDB18-HQ, or convert it with `musdbconvert` from the musdb "
                               "package)")
    return out


def held_out(names: tp.Sequence[str], valid_tracks: tp.Any, where: str) -> tp.List[str]:
    """The train tracks held out for validation: N (an int >= 1) or a fraction (0, 1) of
    them, the first by a hash of the name (deterministic, independent of the order)."""
    count = len(names)
    if isinstance(valid_tracks, float) and 0 < valid_tracks < 1:
        wanted = max(1, round(valid_tracks * count))
    else:
        wanted = int(valid_tracks)
    if wanted >= count:
        raise DatasetError(f"dset.valid_tracks={valid_tracks}: {where} has {count} train "
                           "tracks, so holding out that many leaves none to train on. Fix: "
                           "a smaller dset.valid_tracks, or add a valid/ folder")
    ranked = sorted(names, key=lambda n: (hashlib.sha1(n.encode()).hexdigest(), n))
    return sorted(ranked[:wanted])


def split_tracks(roots: tp.Sequence[Root], valid_tracks: tp.Any = None,
                 names: tp.Collection[str] = ()) -> tp.Dict[str, tp.List[TrackRef]]:
    """{split: [TrackRef]} of every root, split by split (see the module docstring)."""
    out: tp.Dict[str, tp.List[TrackRef]] = {s: [] for s in SPLITS}
    for root in roots:
        found = {s: list_tracks(root.path / s, names) if (root.path / s).is_dir() else []
                 for s in SPLITS}
        moved: tp.Collection[str] = ()
        if root.kind == "musdb":
            official = set(musdb_validation_tracks())
            moved = [t for t in found["train"] if t in official]
        elif not found["valid"] and valid_tracks is not None and found["train"]:
            moved = held_out(found["train"], valid_tracks, str(root.path / "train"))
        for split in SPLITS:
            for track in found[split]:
                target = "valid" if split == "train" and track in moved else split
                key = f"{root.label}:{track}" if root.label else track
                out[target].append(TrackRef(key, root.path / split / track, root, split))
    return out


def check_valid_tracks(value: tp.Any) -> None:
    """dset.valid_tracks (train tracks held out): null, an integer >= 1 or a fraction in
    (0, 1): the one rule, config.values checks it too."""
    ok = value is None or (is_number(value, integer=True) and value >= 1) \
        or (is_number(value) and 0 < value < 1)
    if not ok:
        raise value_error("dset.valid_tracks", value, "must be null, a number of tracks >= 1, "
                          "or a fraction in (0, 1)")
