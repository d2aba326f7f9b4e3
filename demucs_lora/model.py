"""Build the model a run trains: load the base strictly, remap sources, attach LoRA.

`build_model(cfg)` = load base -> remap sources (heads sliced / copied per `source_init`)
-> allocate ranks -> inject LoRA -> freeze. `lora_rank: 0` means full fine-tuning through
the same path, so LoRA and full fine-tuning are compared like for like.
"""
from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
import yaml
from demucs.htdemucs import HTDemucs
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import ConfigError, ModelLoadError
from .lora.targets import head_names

logger = logging.getLogger(__name__)

# htdemucs.* keys that belong to the LoRA machinery, not to the HTDemucs constructor.
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_rslora", "lora_targets",
             "lora_bias", "lora_rank_mode", "lora_budget_match", "lora_max_rank",
             "layer_ranks", "min_rank", "max_rank", "lora_enable_qkv",
             "lora_gradient_batches")


def architecture_kwargs(cfg: DictConfig) -> dict:
    """HTDemucs constructor kwargs from the config (the htdemucs.* keys that HTDemucs takes;
    the lora keys and the derived hop_length are not among them)."""
    from .config_keys import htdemucs_kwargs
    known = htdemucs_kwargs()
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.htdemucs, resolve=True).items()
              if k in known}
    kwargs.update(samplerate=cfg.dset.samplerate, audio_channels=cfg.dset.channels,
                  segment=cfg.dset.segment)
    return kwargs


def _xp_folder(sig: str, root: Path) -> Path:
    return root / "outputs" / "xps" / sig


def _load_single_model(path: Path, trust_remote_code: bool) -> nn.Module:
    from .safe_load import load_model_file
    model = load_model_file(path, trust_remote_code=trust_remote_code, strict=True)
    if not isinstance(model, HTDemucs):
        raise ModelLoadError(f"{path} holds a {type(model).__name__}, not an HTDemucs: "
                             "demucs-lora adapts HTDemucs models (demucs v4) only")
    return model


def _load_from_repo(name: str, repo: Path, trust_remote_code: bool) -> nn.Module:
    """A demucs pretrained name in a local repo: `NAME.th`, `NAME-CHECKSUM.th` or a bag
    `NAME.yaml`. A bag of one model gives that model; bigger bags are an error."""
    if not repo.is_dir():
        raise ModelLoadError(f"pretrained_repo={repo} is not a folder (it must hold demucs "
                             "model files, e.g. htdemucs.yaml and 955717e8-8726e21a.th)")
    files = {p.stem.rsplit("-", 1)[0] if "-" in p.stem else p.stem: p
             for p in repo.iterdir() if p.suffix == ".th"}
    if name in files:
        return _load_single_model(files[name], trust_remote_code)
    bag_file = repo / f"{name}.yaml"
    if bag_file.exists():
        bag = yaml.safe_load(bag_file.read_text())
        sigs = bag.get("models", [])
        if len(sigs) != 1:
            raise ModelLoadError(
                f"{bag_file} is a bag of {len(sigs)} models {sigs}: adapt one of them, e.g. "
                f"continue_from={sigs[0] if sigs else 'SIG'} pretrained_repo={repo}")
        if sigs[0] not in files:
            raise ModelLoadError(f"{bag_file} names model {sigs[0]}, but {repo} has no "
                                 f"{sigs[0]}*.th file (found: {sorted(files)})")
        model = _load_single_model(files[sigs[0]], trust_remote_code)
        if bag.get("segment") is not None:
            model.segment = bag["segment"]
        return model
    available = sorted(set(files) | {p.stem for p in repo.glob("*.yaml")})
    raise ModelLoadError(f"continue_from={name}: no {name}.th or {name}.yaml in "
                         f"pretrained_repo={repo} (available: {available}); demucs "
                         "pretrained models cannot be downloaded here, copy them there")


def load_base(continue_from: tp.Optional[str], pretrained_repo: tp.Optional[str] = None,
              trust_remote_code: bool = False, root: tp.Optional[Path] = None,
              ) -> tp.Optional[nn.Module]:
    """Resolve `continue_from`: a .th path, an XP signature, or a name in the local repo.
    Returns None when continue_from is None (the caller builds a fresh model)."""
    if continue_from is None:
        return None
    root = Path(root or Path.cwd())
    text = str(continue_from)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = root / path
    if text.endswith(".th") or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"continue_from={text}: file {path} does not exist")
        return _load_single_model(path, trust_remote_code)
    xp = _xp_folder(text, root)
    if xp.is_dir():
        best = xp / "best.th"
        if not best.exists():
            raise ModelLoadError(f"continue_from={text}: XP {xp} has no best.th yet "
                                 "(did its training finish an epoch?)")
        return _load_single_model(best, trust_remote_code)
    if pretrained_repo is None:
        raise ModelLoadError(
            f"continue_from={text} is not a .th file nor an XP in {root / 'outputs/xps'}; for "
            "a demucs pretrained name set pretrained_repo=/folder/with/model/files")
    repo = Path(pretrained_repo).expanduser()
    return _load_from_repo(text, repo if repo.is_absolute() else root / repo,
                           trust_remote_code)


def _head_blocks(conv: nn.Module, n_sources: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Split a head ConvTranspose (weight (in, S*k, ...), bias (S*k)) into per-source
    blocks: HTDemucs reshapes the output channels as (S, k) with k = channels(*2 for cac)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    w = weight.reshape(weight.shape[0], n_sources, -1, *weight.shape[2:])
    b = bias.reshape(n_sources, -1) if bias is not None else None
    return w, b


def _new_head(w_blocks, b_blocks, plan: tp.List[tp.List[int]], head: nn.Module) -> None:
    """Fill `head` (new model) with, per new source, the sum of the listed base blocks."""
    with torch.no_grad():
        w_new = head.weight.reshape(head.weight.shape[0], len(plan), -1, *head.weight.shape[2:])
        w_new.zero_()
        for s, srcs in enumerate(plan):
            for i in srcs:
                w_new[:, s] += w_blocks[:, i]
        if head.bias is not None and b_blocks is not None:
            b_new = head.bias.reshape(len(plan), -1)
            b_new.zero_()
            for s, srcs in enumerate(plan):
                for i in srcs:
                    b_new[s] += b_blocks[i]


def source_plan(base_sources: tp.Sequence[str], sources: tp.Sequence[str],
                source_init: tp.Optional[tp.Mapping] = None) -> tp.List[tp.List[int]]:
    """For each new source, the indices of the base heads it starts from: `source_init`,
    else the base's head of that name or spelling, else the default taxonomy
    (demucs_lora.source_taxonomy: kick -> drums, guitar -> other, ...), else zero."""
    from .source_taxonomy import plan_sources
    source_init = dict(source_init or {})
    for new, old in source_init.items():
        olds = [old] if isinstance(old, str) else list(old)
        bad = [o for o in olds if o not in base_sources]
        if new not in sources or bad:
            raise ConfigError(
                f"source_init={{{new}: {old}}}: keys must be in dset.sources={list(sources)} "
                f"and values in the base model's sources={list(base_sources)}")
    plan = plan_sources(base_sources, sources, source_init)
    for choice in plan:
        if choice.why == "zero":
            logger.info(choice.line)
    return [[list(base_sources).index(o) for o in choice.init] for choice in plan]


def remap_sources(model: HTDemucs, sources: tp.Sequence[str],
                  source_init: tp.Optional[tp.Mapping] = None) -> HTDemucs:
    """A new HTDemucs for `sources` whose heads are sliced/copied from `model`'s.
    Kept sources keep their weights (in the new order); every other weight is copied."""
    base_sources = list(model.sources)
    if list(sources) == base_sources and not source_init:
        return model
    plan = source_plan(base_sources, sources, source_init)
    args, kwargs = model._init_args_kwargs
    kwargs = dict(kwargs, sources=list(sources))
    new = type(model)(*args, **kwargs).to(next(model.parameters()).dtype)
    new.segment = model.segment
    heads = head_names(model)
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(h + ".") for h in heads)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(any(m.startswith(h + ".") for h in heads) for m in missing)
    for head in heads:
        w_blocks, b_blocks = _head_blocks(model.get_submodule(head), len(base_sources))
        _new_head(w_blocks, b_blocks, plan, new.get_submodule(head))
    return new


def build_base(cfg: DictConfig, root: tp.Optional[Path] = None) -> HTDemucs:
    """The base model of a run: loaded from `continue_from` or freshly initialised."""
    base = load_base(cfg.continue_from, cfg.pretrained_repo, cfg.trust_remote_code, root)
    if base is None:
        kwargs = architecture_kwargs(cfg)
        return HTDemucs(sources=list(run_sources(cfg)), **kwargs)
    check_audio_format(cfg, base)
    return base


def check_audio_format(cfg: DictConfig, base: nn.Module) -> None:
    if base.samplerate != cfg.dset.samplerate or base.audio_channels != cfg.dset.channels:
        raise ConfigError(
            f"the base model works at {base.samplerate} Hz / {base.audio_channels} channels but "
            f"dset.samplerate={cfg.dset.samplerate} dset.channels={cfg.dset.channels}: set "
            "them to the model's values")


def run_sources(cfg: DictConfig, base: tp.Optional[nn.Module] = None) -> tp.List[str]:
    """dset.sources, or (null) the base's sources, or the 4 demucs stems for a new model."""
    sources = cfg.dset.get("sources")
    if sources is not None:
        return list(sources)
    from .source_taxonomy import DEFAULT_SOURCES
    return list(base.sources) if base is not None else list(DEFAULT_SOURCES)


def should_train_heads(cfg: DictConfig, base_sources: tp.Sequence[str]) -> bool:
    if cfg.train_heads is not None:
        return bool(cfg.train_heads)
    return run_sources(cfg) != list(base_sources)


def build_model(cfg: DictConfig, root: tp.Optional[Path] = None,
                calibration: tp.Optional[tp.Callable[[], tp.Iterable]] = None,
                base: tp.Optional[HTDemucs] = None) -> tp.Tuple[HTDemucs, dict]:
    """Load base -> remap sources -> allocate ranks -> inject -> freeze.

    `calibration()` yields (mix, sources) batches (gradient rank mode only).
    `base`: the already loaded base (else loaded from cfg.continue_from / built fresh).
    Returns the model and a report {ranks, layers, trainable, train_heads}.
    """
    from .lora.inject import inject_lora, trainable_summary
    base = build_base(cfg, root) if base is None else base
    base_sources = list(base.sources)
    model = remap_sources(base, run_sources(cfg, base), cfg.source_init)
    heads = head_names(model) if should_train_heads(cfg, base_sources) else []
    lcfg = cfg.htdemucs
    report = {"ranks": {}, "layers": [], "train_heads": heads, "base_sources": base_sources}
    if lcfg.lora_rank <= 0:
        for p in model.parameters():
            p.requires_grad_(True)
        report["trainable"] = trainable_summary(model)
        return model, report
    from .lora.ranks import allocate_ranks
    from .lora.targets import lora_target_names
    names = [n for n in lora_target_names(model, list(lcfg.lora_targets)) if n not in heads]
    batches = calibration() if (calibration is not None
                                and lcfg.lora_rank_mode == "gradient") else None
    table = allocate_ranks(model, lcfg, batches=batches, names=names)
    ranks = {k: int(v) for k, v in dict(table).items() if int(v) > 0}
    report["layers"] = inject_lora(
        model, ranks, alpha=lcfg.lora_alpha, dropout=lcfg.lora_dropout,
        rslora=lcfg.lora_rslora, bias=lcfg.lora_bias, enable_qkv=list(lcfg.lora_enable_qkv),
        train_extra=heads)
    report["ranks"] = ranks
    report["rank_table"] = table
    report["trainable"] = trainable_summary(model)
    return model, report
