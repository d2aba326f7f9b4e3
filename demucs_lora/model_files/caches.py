"""Where demucs 4.1 keeps the models it downloaded, read offline (nothing is fetched).

- Hugging Face hub (demucs' default): repo ``NAMESPACE/REPO`` (``demucs.hf.hf_repo_name``:
  ``htdemucs`` -> ``adefossez/HTDemucs``, ``htdemucs_ft`` -> ``adefossez/HTDemucs-ft``)
  holding ``NAME.yaml`` (the bag) and one ``SIG.safetensors`` per member, in the standard
  cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``):
  ``models--NAMESPACE--REPO/refs/main`` names a snapshot ``snapshots/REV/``.
- The legacy path: ``SIG-CHECKSUM.th`` files in torch hub's ``checkpoints`` folder
  (``TORCH_HOME``), with the bag of each name in the ``remote/NAME.yaml`` files demucs ships.

The environment is read at each call (not at import), so a test or a user can point
``HF_HOME`` / ``TORCH_HOME`` elsewhere at any time.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing as tp
from pathlib import Path

import yaml

DEFAULT_NAMESPACE = "adefossez"


@dataclasses.dataclass
class Found:
    """A name found somewhere: the bag description (if any) and one file per member."""
    where: str                        # human description, e.g. "HF cache adefossez/HTDemucs"
    files: tp.List[Path]
    bag: tp.Optional[dict] = None     # the NAME.yaml content (models, weights, segment)
    missing: tp.List[str] = dataclasses.field(default_factory=list)  # members not found


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def torch_hub_checkpoints() -> Path:
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_repo_id(name: str) -> tp.Tuple[str, str]:
    """(repo_id, bare name) for ``name``, ``NAMESPACE/name`` or ``hf://NAMESPACE/name``."""
    from demucs.hf import hf_repo_name
    name = name[len("hf://"):] if name.startswith("hf://") else name
    namespace, _, bare = name.rpartition("/")
    return f"{namespace or DEFAULT_NAMESPACE}/{hf_repo_name(bare)}", bare


def _snapshot(repo_id: str) -> tp.Optional[Path]:
    folder = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
    return snaps[-1] if len(snaps) == 1 else None


def read_bag(path: Path) -> dict:
    from demucs_lora.core.errors import ModelLoadError
    try:
        bag = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"bag file {path} cannot be read: {exc}") from None
    models = bag.get("models") if isinstance(bag, dict) else None
    if not isinstance(models, list) or not models or not all(
            isinstance(m, (str, int)) and not isinstance(m, bool) for m in models):
        raise ModelLoadError(f"bag file {path} must hold `models: [SIG, ...]` (demucs' bag "
                             f"format), found {bag!r:.200}")
    if len(models) > MAX_BAG_MEMBERS:
        raise ModelLoadError(f"bag file {path} lists {len(models)} models; a bag holds at "
                             f"most {MAX_BAG_MEMBERS} (demucs' own bags hold 4)")
    models = [str(m) for m in models]
    bad = [m for m in models if not _MEMBER_NAME.match(m)]
    if bad:
        raise ModelLoadError(f"bag file {path}: member {bad[0]!r} is not a model name (a "
                             "signature such as 955717e8: no path, it may not leave the "
                             "bag's folder)")
    segment = bag.get("segment")
    if segment is not None and not (_weight(segment) and segment > 0):
        raise ModelLoadError(f"bag file {path}: segment={segment!r} must be a positive "
                             "number of seconds or absent")
    return dict(bag, models=models, weights=_bag_weights(bag.get("weights"), len(models),
                                                         path))


MAX_BAG_MEMBERS = 32
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _bag_weights(weights: tp.Any, count: int, path: Path) -> tp.Optional[tp.List[tp.List[float]]]:
    """A bag's `weights`: null, or one list of finite numbers >= 0 per member (demucs'
    BagOfModels: weights[member][source]); the per-source length is checked against the
    members' sources once they are loaded (model_files.resolve.load_found)."""
    from demucs_lora.core.errors import ModelLoadError
    if weights is None:
        return None
    rows = weights if isinstance(weights, list) else None
    if rows is None or len(rows) != count or not all(
            isinstance(r, list) and r and all(_weight(w) for w in r) for r in rows) \
            or len({len(r) for r in rows}) != 1 or not all(sum(c) > 0 for c in zip(*rows)):
        raise ModelLoadError(f"bag file {path}: weights must be one list of finite numbers "
                             f">= 0 per model ({count} models, each the same length: one "
                             f"weight per source, no source weighted 0 in every model), "
                             f"found {weights!r:.200}")
    return [[float(w) for w in r] for r in rows]


def _weight(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value >= 0


def find_in_hf_cache(name: str) -> tp.Optional[Found]:
    """``NAME.yaml`` + members from the HF cache snapshot of the name's demucs repo."""
    if name.count("/") > 1 and not name.startswith("hf://"):
        return None
    repo_id, bare = hf_repo_id(name)
    snap = _snapshot(repo_id)
    if snap is None or not (snap / f"{bare}.yaml").is_file():
        return None
    bag = read_bag(snap / f"{bare}.yaml")
    files = [snap / f"{sig}.safetensors" for sig in bag["models"]]
    return Found(f"HF cache {repo_id} ({snap})", [f for f in files if f.is_file()], bag,
                 [f.name for f in files if not f.is_file()])


def _legacy_filenames() -> tp.Dict[str, str]:
    """sig -> ``SIG-CHECKSUM.th`` from demucs' shipped list of legacy downloads."""
    from demucs.pretrained import REMOTE_ROOT
    names = {}
    for line in (REMOTE_ROOT / "files.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("root:"):
            names[line.split("-", 1)[0]] = line
    return names


def find_in_torch_hub(name: str) -> tp.Optional[Found]:
    """A name (bag in demucs' remote/NAME.yaml) or signature in torch hub's checkpoints."""
    from demucs.pretrained import REMOTE_ROOT
    folder = torch_hub_checkpoints()
    if not folder.is_dir() or "/" in name:
        return None
    known = _legacy_filenames()

    def member(sig: str) -> tp.Optional[Path]:
        path = folder / known[sig] if sig in known else None
        if path is not None and path.is_file():
            return path
        matches = sorted(folder.glob(f"{sig}-*.th")) + sorted(folder.glob(f"{sig}.th"))
        return matches[0] if matches else None

    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if bag_file.is_file():
        bag = read_bag(bag_file)
        paths = {sig: member(sig) for sig in bag["models"]}
        if not any(paths.values()):
            return None
        return Found(f"torch hub checkpoints {folder}", [p for p in paths.values() if p], bag,
                     [f"{known.get(s, s + '-*.th')}" for s, p in paths.items() if p is None])
    path = member(name)
    return Found(f"torch hub checkpoints {folder}", [path]) if path else None


def cache_places(name: str) -> tp.List[str]:
    """Where the caches were searched, for the error that lists every place."""
    repo_id, bare = hf_repo_id(name) if name.count("/") <= 1 or name.startswith("hf://") \
        else (name, name)
    return [f"HF hub cache {hf_cache_dir()} (repo {repo_id}, file {bare}.yaml)",
            f"torch hub checkpoints {torch_hub_checkpoints()} (SIG-CHECKSUM.th files)"]
