"""The public, load-and-use side of demucs-lora: find a model by name, put adapters on it.

Why a module of its own: every user-facing entry point (the Python API, the export,
test and separate CLIs) resolves "a model name" the same way, so a name that works in one
place works in all of them. Resolution order for ``get_model(name_or_sig, repo)``:

1. a path to a ``.th`` file (a demucs package, float, half or int8-quantized);
2. ``NAME`` in ``repo`` (``NAME.th``, ``NAME-CHECKSUM.th`` or a bag of one model
   ``NAME.yaml``), as ``python -m tools.export`` writes them;
3. an XP signature: ``outputs/xps/SIG/best.th`` under ``root`` (default: the cwd).

Every file is opened with ``weights_only=True`` and an allowlist of the demucs classes
(``demucs_lora.safe_load``): model files are code, so nothing else is unpickled unless
``trust_remote_code=True``.

Hot-swapping adapters on one base (what this 10-line script does, and what
tests/test_api.py runs): ``load_lora_weights`` injects the LoRA layers the first time and
only replaces their tensors afterwards, so the base is loaded once::

    import soundfile as sf, torch
    from demucs_lora import apply_model, get_model, load_lora_weights

    model = get_model("base", repo="release_models")          # plain HTDemucs, loaded once
    data, sr = sf.read("song.wav", dtype="float32", always_2d=True)   # at model.samplerate
    wav = torch.from_numpy(data.T.copy()); ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8                  # normalize like the demucs CLI
    for adapter in ["adapters/piano", "adapters/guitar"]:     # .safetensors + .json pairs
        model = load_lora_weights(model, adapter)             # 1st: inject; then: swap tensors
        stems = apply_model(model, ((wav - mean) / std)[None], shifts=0)[0] * std + mean
        for source, stem in zip(model.sources, stems):
            sf.write(f"{adapter.split('/')[-1]}_{source}.wav", stem.T.numpy(), sr)

Swapping needs adapters of the same layout (ranks, alpha, targets, sources); for others
start again from a fresh ``get_model`` (or ``copy.deepcopy`` of the plain base).
"""
from __future__ import annotations

import copy
import typing as tp
from pathlib import Path

from .errors import AdapterMismatch, ModelLoadError

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn

PathLike = tp.Union[str, Path]

LAYOUT_KEYS = ("ranks", "alpha", "rslora", "bias", "enable_qkv", "train_extra")
"""Header keys that must equal the injected layers' config for an in-place swap."""


def xps_root(root: tp.Optional[PathLike] = None) -> Path:
    """``ROOT/outputs/xps`` (ROOT defaults to the current directory, as Dora's)."""
    return Path(root or Path.cwd()) / "outputs" / "xps"


def recent_xps(root: tp.Optional[PathLike] = None, count: int = 5) -> tp.List[str]:
    """Signatures of the ``count`` most recently modified XP folders, newest first."""
    folder = xps_root(root)
    if not folder.is_dir():
        return []
    xps = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    xps.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.name for p in xps[:count]]


def xp_folder(sig: str, root: tp.Optional[PathLike] = None) -> tp.Optional[Path]:
    """The folder of XP ``sig`` if it exists (a plain name, not a path), else None."""
    if not sig or "/" in sig or sig in (".", ".."):
        return None
    folder = xps_root(root) / sig
    return folder if folder.is_dir() else None


def unknown_model_error(name: str, repo: tp.Optional[PathLike],
                        root: tp.Optional[PathLike] = None) -> ModelLoadError:
    """The error for a name that is no file, no repo entry and no XP: lists what exists."""
    recent = recent_xps(root)
    where = [f"no file {name}"]
    if repo is not None:
        where.append(f"no {name}.th / {name}.yaml in repo {repo}")
    else:
        where.append("no repo given (pass repo=/--repo DIR for exported names)")
    where.append(f"no XP {xps_root(root) / name}")
    hint = (f"recent XPs: {', '.join(recent)}" if recent
            else f"no XP in {xps_root(root)} (run from the folder that holds outputs/)")
    return ModelLoadError(f"model {name!r} not found: {'; '.join(where)}. {hint}")


def _repo_has(name: str, repo: Path) -> bool:
    if (repo / f"{name}.yaml").is_file():
        return True
    return any(p.suffix == ".th" and (p.stem == name or p.stem.rsplit("-", 1)[0] == name)
               for p in repo.iterdir())


def model_display_name(name_or_sig: str) -> str:
    """Folder-friendly name of a model: a file's stem, else the name itself."""
    text = str(name_or_sig)
    return Path(text).stem if text.endswith(".th") else text.replace("/", "_")


def load_plain_model(name_or_sig: PathLike, repo: tp.Optional[PathLike] = None,
                     trust_remote_code: bool = False,
                     root: tp.Optional[PathLike] = None) -> "nn.Module":
    """The model ``name_or_sig`` names (see the module docstring), in eval mode."""
    from .model import _load_from_repo, _load_single_model
    root = Path(root or Path.cwd())
    text = str(name_or_sig)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = root / path
    if text.endswith(".th") or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return _load_single_model(path, trust_remote_code).eval()
    if repo is not None:
        repo_path = Path(repo).expanduser()
        repo_path = repo_path if repo_path.is_absolute() else root / repo_path
        if not repo_path.is_dir():
            raise ModelLoadError(f"repo {repo} is not a folder (it must hold NAME.th files, "
                                 "e.g. the release_models/ that tools.export writes)")
        if _repo_has(text, repo_path):
            return _load_from_repo(text, repo_path, trust_remote_code).eval()
    xp = xp_folder(text, root)
    if xp is not None:
        best = xp / "best.th"
        if not best.is_file():
            raise ModelLoadError(f"XP {xp} has no best.th yet (did its training finish an "
                                 "epoch?)")
        return _load_single_model(best, trust_remote_code).eval()
    raise unknown_model_error(text, repo, root)


def resolve_adapter(adapter: PathLike, root: tp.Optional[PathLike] = None) -> Path:
    """An adapter path (``x``, ``x.safetensors`` or ``x.json``) or an XP signature
    (its ``lora_best``); returns the path without suffix."""
    from .lora.state import adapter_paths
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


def can_swap(model: "nn.Module", adapter: PathLike) -> bool:
    """True when ``adapter`` fits the LoRA layers already injected in ``model``
    (same ranks, alpha, rslora, bias, q/k/v mask, fully trained extras and sources),
    so that loading it only replaces tensors."""
    from .lora.inject import has_lora, lora_config
    from .lora.state import read_header
    if not has_lora(model):
        return False
    header = read_header(adapter)
    config = lora_config(model)
    same = all(_normalize(header.get(k)) == _normalize(config.get(k)) for k in LAYOUT_KEYS)
    return same and list(header.get("sources") or model.sources) == list(model.sources)


def _normalize(value: tp.Any) -> tp.Any:
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def with_adapter(base: "nn.Module", adapter: PathLike,
                 current: tp.Optional["nn.Module"] = None, merge: bool = False
                 ) -> "nn.Module":
    """``adapter`` on ``base`` (left untouched), reusing ``current`` when it can swap.

    ``current`` is a model returned by an earlier call: when the new adapter has the same
    layout, its tensors are replaced in place (no copy of the base); otherwise a fresh
    copy of ``base`` gets the adapter. ``merge`` folds it into the weights (faster
    inference; the next swap unmerges first).
    """
    from .lora.inject import merge_lora
    from .lora.state import load_lora_weights
    if current is not None and can_swap(current, adapter):
        model = load_lora_weights(current, adapter)
    else:
        model = load_lora_weights(copy.deepcopy(base), adapter)
    if merge:
        merge_lora(model)
    return model.eval()


def get_model(name_or_sig: PathLike, repo: tp.Optional[PathLike] = None,
              adapter: tp.Optional[PathLike] = None, trust_remote_code: bool = False,
              root: tp.Optional[PathLike] = None) -> "nn.Module":
    """Load an HTDemucs for inference (eval mode, on CPU), optionally with an adapter.

    Args:
        name_or_sig: a ``.th`` path, a model name in ``repo`` (``NAME.th``, also the
            int8 packages ``tools.export --quantize 8`` writes) or an XP signature
            (``outputs/xps/SIG/best.th`` under ``root``, default the cwd).
        repo: folder of exported / demucs model files.
        adapter: an adapter (``path`` of a ``.safetensors`` + ``.json`` pair, or an XP
            signature for its ``lora_best``), loaded unmerged on top; it must have been
            trained on this base (checked by fingerprint: ``AdapterMismatch`` otherwise).
            An XP's ``best.th`` already has its adapter merged in: put adapters on the base.
        trust_remote_code: allow full unpickling of files outside the demucs allowlist.

    Raises ModelLoadError (unknown name: lists recent XPs, or NaN/inf weights) or
    AdapterMismatch (NaN/inf or malformed adapters too).
    """
    from .finite import check_finite_model
    model = check_finite_model(load_plain_model(name_or_sig, repo, trust_remote_code, root),
                               str(name_or_sig))
    if adapter is not None:
        from .lora.state import load_lora_weights
        path = resolve_adapter(adapter, root)
        try:
            model = load_lora_weights(model, path)
        except AdapterMismatch as exc:
            hint = ""
            if xp_folder(str(name_or_sig), root) is not None:
                hint = (f"; {name_or_sig} is an XP whose best.th has its adapter merged in: "
                        "load adapters on its base (continue_from in its config.yaml)")
            raise AdapterMismatch(f"{exc} [base: {name_or_sig}]{hint}") from None
    return model.eval()


def quantize(model: "nn.Module", bits: int = 8, training_args: tp.Optional[dict] = None
             ) -> tp.Dict[str, tp.Any]:
    """Weight-only int8 package of a plain (merged) model; see ``demucs_lora.quantize``.

    Save it with ``torch.save`` (or ``quantize.save_quantized(model, path)``) and load it
    back with ``get_model(path)``; the stock demucs CLI cannot read it.
    """
    from .quantize import quantize as _quantize
    return _quantize(model, bits=bits, training_args=training_args)
