"""The one place that turns a model name into model files, for training and serving.

Precedence (docs/models.md documents it for users):

1. a path: a ``.th`` / ``.safetensors`` file, a bag ``.yaml``, or a folder (an XP folder,
   or a folder holding exactly one model or one bag);
2. an XP signature in Dora's XP folder (``best.th`` of ``<dora.dir>/xps/SIG``);
3. a name in ``pretrained_repo`` (``NAME.yaml`` bag, ``NAME.th``, ``NAME-CHECKSUM.th``,
   ``NAME.safetensors``), as demucs' ``--repo`` folders and ``tools.export`` lay them out;
4. the caches demucs downloads into, offline: the Hugging Face hub cache, then torch hub's
   checkpoints (``model_files.caches``);
5. otherwise a ``ModelLoadError`` listing every place looked and how to get the files there.

A name that is both a local XP and a pretrained model elsewhere is an ambiguity error: the
user picks with a path (``outputs/xps/SIG/best.th``) or by renaming.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing as tp
from pathlib import Path

import yaml

from demucs_lora.core.errors import ModelLoadError
from demucs_lora.core.paths import CONF_DIR
from demucs_lora.model_files import caches
from demucs_lora.model_files.caches import Found, read_bag
from demucs_lora.model_files.packages import MODEL_SUFFIXES, checksum_of

PathLike = tp.Union[str, Path]
CONF_FILE = CONF_DIR / "config.yaml"


def xps_dir(root: tp.Optional[PathLike] = None) -> Path:
    """Dora's XP folder: the running XP's parent inside a run, else ``dora.dir`` of
    conf/config.yaml (the file Dora reads) under ``root`` (default the cwd)."""
    from dora.xp import get_xp, is_xp
    if is_xp() and root is None:
        return Path(get_xp().folder).parent
    folder = "outputs"
    if CONF_FILE.is_file():
        folder = (yaml.safe_load(CONF_FILE.read_text()).get("dora") or {}).get("dir", folder)
    path = Path(folder).expanduser()
    return (path if path.is_absolute() else Path(root or Path.cwd()) / path) / "xps"


def recent_xps(root: tp.Optional[PathLike] = None, count: int = 5) -> tp.List[str]:
    """Signatures of the ``count`` most recently modified XP folders, newest first."""
    folder = xps_dir(root)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.name for p in found[:count]]


def xp_folder(sig: str, root: tp.Optional[PathLike] = None) -> tp.Optional[Path]:
    """The folder of XP ``sig`` if it exists (a plain name, not a path), else None."""
    if not sig or "/" in sig or sig in (".", ".."):
        return None
    folder = xps_dir(root) / sig
    return folder if folder.is_dir() else None


def _xp_found(folder: Path) -> Found:
    if (folder / "best.yaml").is_file():  # an adapted bag (bag.write_bag)
        return _bag_found(folder / "best.yaml", _repo_models(folder), f"XP {folder}")
    best = folder / "best.th"
    if not best.is_file():
        raise ModelLoadError(f"XP {folder} has no best.th yet (did its training finish an "
                             "epoch?)")
    return Found(f"XP {folder}", [best])


def _repo_models(repo: Path) -> tp.Dict[str, Path]:
    """sig -> file for the model files of a demucs repo folder (demucs' LocalRepo rules)."""
    models: tp.Dict[str, Path] = {}
    for file in sorted(repo.iterdir()):
        if file.suffix not in MODEL_SUFFIXES or file.name.startswith("."):
            continue
        sig = file.stem.rsplit("-", 1)[0] if checksum_of(file) else file.stem
        if sig in models:
            raise ModelLoadError(f"{repo} holds two files for model {sig}: {models[sig].name} "
                                 f"and {file.name}; delete all but one")
        models[sig] = file
    return models


def _bag_found(bag_file: Path, models: tp.Mapping[str, Path], where: str) -> Found:
    bag = read_bag(bag_file)
    files = [models.get(sig) for sig in bag["models"]]
    return Found(where, [f for f in files if f is not None], bag,
                 [sig for sig, f in zip(bag["models"], files) if f is None])


def find_in_repo(name: str, repo: Path) -> tp.Optional[Found]:
    if not repo.is_dir():
        raise ModelLoadError(f"pretrained_repo={repo} is not a folder (it must hold demucs "
                             "model files, e.g. htdemucs.yaml and 955717e8-8726e21a.th)")
    models = _repo_models(repo)
    if name in models:
        return Found(f"pretrained_repo {repo}", [models[name]])
    if (repo / f"{name}.yaml").is_file():
        return _bag_found(repo / f"{name}.yaml", models, f"pretrained_repo {repo}")
    return None


_HUB_NAME = re.compile(r"^(hf://)?[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w\-]*$")


def is_hub_name(text: str) -> bool:
    """``hf://NAMESPACE/NAME`` or ``NAMESPACE/NAME`` (README): a model name looked up in
    the HF cache, when no file or folder of that name exists."""
    return bool(_HUB_NAME.match(text)) and not text.endswith(
        tuple(MODEL_SUFFIXES) + (".yaml",))


def _find_path(text: str, path: Path) -> tp.Optional[Found]:
    if path.is_file():
        if path.suffix == ".yaml":
            return _bag_found(path, _repo_models(path.parent), f"bag file {path}")
        return Found(f"file {path}", [path])
    if path.is_dir():
        if any((path / n).is_file() for n in ("best.th", "best.yaml", "history.json")):
            return _xp_found(path)
        bags = sorted(path.glob("*.yaml"))
        models = _repo_models(path)
        if len(bags) == 1:
            return _bag_found(bags[0], models, f"bag file {bags[0]}")
        if not bags and len(models) == 1:
            return Found(f"folder {path}", list(models.values()))
        raise ModelLoadError(
            f"{text}: folder {path} holds {len(bags)} bag(s) and {len(models)} model file(s) "
            f"({sorted([b.name for b in bags] + [m.name for m in models.values()])[:8]}): "
            f"name one, or pass the folder as pretrained_repo and a model name")
    if is_hub_name(text):   # hf://NS/NAME or NS/NAME: a name (HF cache), not a path
        return None
    if path.suffix in (*MODEL_SUFFIXES, ".yaml") or os.sep in text:
        hint = ""
        for part in Path(text).parts:  # e.g. the guide's outputs/SIG/checkpoints/best.th
            xp = xp_folder(part)
            if xp is not None:
                hint = f" (XP {part} is {xp}: use continue_from={part} or {xp / 'best.th'})"
        raise ModelLoadError(f"model {text}: file {path} does not exist{hint}")
    return None


def _not_found(text: str, places: tp.List[str], root: tp.Optional[PathLike]) -> ModelLoadError:
    recent = recent_xps(root)
    hint = f" (recent XPs: {', '.join(recent)})" if recent else ""
    return ModelLoadError(
        f"model {text!r} not found. Looked in: " + "; ".join(places) + ". To get a demucs "
        f"pretrained model here, run `demucs -n {text} some.wav` once on a machine with "
        "network (it fills the HF cache; copy ~/.cache/huggingface/hub over, or set HF_HOME), "
        "or copy its NAME.yaml and model files into a folder and set pretrained_repo=FOLDER."
        + hint)


def find_model(name: PathLike, pretrained_repo: tp.Optional[PathLike] = None,
               root: tp.Optional[PathLike] = None) -> Found:
    """The files ``name`` means (see the module docstring for the order)."""
    text = str(name)
    base = Path(root or Path.cwd())
    path = Path(text).expanduser()
    found = _find_path(text, path if path.is_absolute() else base / path)
    if found is not None:
        return _complete(text, found)
    places = [f"no file or folder {base / path}"]
    xp = xp_folder(text, root)
    later = _find_named(text, pretrained_repo, base, places)
    if xp is not None:
        if later is not None:
            raise ModelLoadError(
                f"model {text!r} is ambiguous: it is a local XP ({xp}) and a pretrained model "
                f"({later.where}). Pick one with a path: {xp / 'best.th'} for the XP, or "
                f"{later.files[0] if later.files else later.where} for the pretrained model "
                "(as continue_from=PATH for training, -n PATH for separate, test_pretrained)")
        return _xp_found(xp)
    places.insert(1, f"no XP {xps_dir(root) / text}")
    if later is None:
        raise _not_found(text, places, root)
    return _complete(text, later)


def _find_named(text: str, repo: tp.Optional[PathLike], base: Path,
                places: tp.List[str]) -> tp.Optional[Found]:
    if repo is not None:
        repo_path = Path(repo).expanduser()
        repo_path = repo_path if repo_path.is_absolute() else base / repo_path
        found = find_in_repo(text, repo_path)
        if found is not None:
            return found
        available = sorted(set(_repo_models(repo_path)) | {p.stem for p in
                                                             repo_path.glob("*.yaml")})
        places.append(f"pretrained_repo {repo_path} (no {text}.yaml, {text}.th, "
                      f"{text}-CHECKSUM.th or {text}.safetensors; available: {available})")
    else:
        places.append("no pretrained_repo set")
    for finder in (caches.find_in_hf_cache, caches.find_in_torch_hub):
        found = finder(text)
        if found is not None:
            return found
    places.extend(caches.cache_places(text))
    return None


def _complete(text: str, found: Found) -> Found:
    if found.missing:
        raise ModelLoadError(
            f"model {text!r}: the bag in {found.where} names member(s) {found.missing} "
            "whose files are not there (an interrupted download or copy): fetch them again "
            "(`demucs -n NAME` on a machine with network) or copy them beside the bag")
    return found


@dataclasses.dataclass
class Loaded:
    """A resolved model: one model, or the members of a bag with its weights."""
    members: tp.List[tp.Any]
    weights: tp.Optional[tp.List[tp.List[float]]]
    segment: tp.Optional[float]
    found: Found


def load_found(found: Found, trust_remote_code: bool = False) -> Loaded:
    """Build every member model (strict, allowlisted) of what ``find_model`` found."""
    from demucs_lora.model_files.packages import load_model_file
    members = [load_model_file(f, trust_remote_code=trust_remote_code) for f in found.files]
    bag = found.bag or {}
    weights = bag.get("weights")
    for model, row, file in zip(members, weights or (), found.files):
        if len(row) != len(getattr(model, "sources", row)):
            raise ModelLoadError(f"{found.where}: the bag's weights give {len(row)} per "
                                 f"model, but {file.name} separates {len(model.sources)} "
                                 f"sources {list(model.sources)}: give one weight per source")
    return Loaded(members, weights, bag.get("segment"), found)


def resolve_adapter(adapter: PathLike, root: tp.Optional[PathLike] = None) -> Path:
    """An adapter path (``x``, ``x.safetensors`` or ``x.json``) or an XP signature
    (its ``lora_best``); returns the path without suffix."""
    from demucs_lora.lora.adapter_file import adapter_paths, check_adapter_path
    check_adapter_path(adapter)
    root = Path(root or Path.cwd())
    path = Path(adapter).expanduser()
    if not path.is_absolute():
        path = root / path
    tensors, header = adapter_paths(path)
    if tensors.is_file() and header.is_file():
        return tensors.with_suffix("")
    xp = xp_folder(str(adapter), root)
    if xp is not None and (xp / "lora_best.safetensors").is_file():
        return xp / "lora_best"
    raise ModelLoadError(
        f"adapter {adapter}: no {tensors.name} + {header.name} pair at {tensors.parent} and "
        f"no XP with a lora_best adapter named {adapter!s} (an adapter is a .safetensors "
        "file plus its .json header, e.g. outputs/xps/SIG/lora_best)")
