"""The config a run actually uses, derived from the composed one and the base model.

`prepare_config` (no model, no data): canonical keys only, unknown keys refused, values
checked, paths made absolute, LoRA without a base refused unless `lora_without_base`.
`resolve_with_base` (the base loaded, before any data is read):
- dset.sources null -> the base's sources (a new model: the 4 demucs stems);
- each source the base lacks gets a head per source_init / spelling / taxonomy
  (demucs_lora.core.sources); the choices land in source_init;
- architecture keys (htdemucs.* constructor arguments) given with continue_from must
  equal the base's (the weights fix them); config.yaml then records the base's values;
- htdemucs.hop_length: only the value HTDemucs derives (nfft // 4);
- dset.stem_files: a source whose file is missing uses the one file of another spelling.
Each decision is one line for train.log. Nothing is mutated in place. The result is what
`config.run_config.run_config` turns into the typed pieces the rooms receive.
"""
from __future__ import annotations

import inspect
import logging
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from demucs_lora.config.aliases import set_dotted
from demucs_lora.config.check import check_weights
from demucs_lora.core.errors import ConfigError
from demucs_lora.core.plain import plain

logger = logging.getLogger(__name__)
# HTDemucs arguments that shape no weight (the state_dict's keys and shapes are the same
# for any value: tests/safety/test_weight_free_kwargs.py): a loaded base takes the
# config's value. use_train_segment: inference splitting; t_dropout: the dropout of the
# cross-domain transformer (the guide's "Training Configuration" sets 0.0, the released
# htdemucs was trained with 0.02).
RUNTIME_KWARGS = ("use_train_segment", "t_dropout")


# ----------------------------------------------------------------------------- helpers
def _updated(cfg: DictConfig, updates: tp.Mapping[str, tp.Any]) -> DictConfig:
    data = OmegaConf.to_container(cfg, resolve=False)
    for key, value in updates.items():
        set_dotted(data, key, value)
    return OmegaConf.create(data)


def _same(a, b) -> bool:
    a, b = plain(a), plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def hydra_context() -> tp.Tuple[tp.List[str], tp.Optional[str]]:
    """(command-line overrides, model group choice) of the running Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return [], None
    return list(hc.overrides.task), hc.runtime.choices.get("model")


# ----------------------------------------------------------------------------- no model
def prepare_config(cfg: DictConfig, cwd: tp.Optional[Path] = None) -> DictConfig:
    """Canonical, known, checked, absolute-path config (raises ConfigError)."""
    from demucs_lora.config.check import check_config, resolve_paths
    from demucs_lora.config.keys import canonical_checked
    overrides, _ = hydra_context()
    cfg = canonical_checked(cfg, overrides)
    check_config(cfg)
    check_lora_base(cfg)
    return resolve_paths(cfg, cwd)


def check_lora_base(cfg: DictConfig) -> None:
    rank = cfg.htdemucs.lora_rank
    if cfg.continue_from is None and rank > 0 and not cfg.get("lora_without_base"):
        raise ConfigError(
            f"htdemucs.lora_rank={rank} with continue_from=null would train adapters on a "
            "frozen, randomly initialised model: set continue_from=NAME|SIG|FILE.th (the model "
            "to adapt), htdemucs.lora_rank=0 to train a new model, or lora_without_base=true "
            "if you mean it")


def resolve_precision(cfg: DictConfig, device_type: str) -> tp.Tuple[DictConfig, tp.List[str]]:
    """mixed_precision=true -> fp16 (loss scaling) on CUDA, bf16 on CPU."""
    if cfg.mixed_precision is not True:
        return cfg, []
    value = "fp16" if device_type == "cuda" else "bf16"
    return (_updated(cfg, {"mixed_precision": value}),
            [f"mixed_precision=true: {value} autocast on {device_type}"
             + (" with loss scaling" if value == "fp16" else "")])


def data_banner(cfg: DictConfig) -> tp.Optional[str]:
    """The loud line a run on the embedded synthetic data logs (None with dset.wav)."""
    if cfg.dset.get("wav") is not None or OmegaConf.is_missing(cfg.dset, "wav") or \
            cfg.dset.get("musdb") is not None:
        return None
    synth = cfg.dset.synth
    bar = "!" * 78
    return (f"\n{bar}\n!! No dset.wav: training on the EMBEDDED SYNTHETIC DATA (generated "
            f"tracks, domain {synth.domain}),\n!! not on your music. Set dset.wav=/path/to/"
            f"stems to train on your own stems.\n{bar}")


# ----------------------------------------------------------------------------- with the base
def _base_kwargs(base) -> tp.Dict[str, tp.Any]:
    """Every HTDemucs argument of a loaded model (its constructor call + the defaults)."""
    from demucs_lora.models.build import htdemucs_kwargs
    args, kwargs = getattr(base, "_init_args_kwargs", ((), {}))
    bound = inspect.signature(type(base)).bind_partial(*args, **kwargs).arguments
    out = dict(htdemucs_kwargs())
    out.update({k: v for k, v in bound.items() if k in out})
    return out


def explicit_htdemucs_keys(cfg: DictConfig) -> tp.Set[str]:
    """htdemucs.* keys the user set: on the command line, or in a YAML file to a value
    other than the model group's (conf/model/NAME.yaml)."""
    from demucs_lora.config.keys import CONF_DIR, cli_keys
    from demucs_lora.models.build import htdemucs_kwargs
    overrides, choice = hydra_context()
    out = {k.split(".", 1)[1] for k in cli_keys(overrides) if k.startswith("htdemucs.")}
    file = CONF_DIR / "model" / f"{choice}.yaml"
    if choice is None or not file.is_file():
        return out
    from demucs_lora.config.schema import load_group_file  # with the file's defaults list
    defaults = load_group_file(file).get("htdemucs", {})
    kwargs = htdemucs_kwargs()
    for key, value in OmegaConf.to_container(cfg.htdemucs, resolve=True).items():
        if key in kwargs and (key not in defaults or not _same(defaults[key], value)):
            out.add(key)
    return out


def check_architecture(cfg: DictConfig, base, explicit: tp.Iterable[str]
                       ) -> tp.Tuple[tp.Dict[str, tp.Any], tp.List[str]]:
    """({htdemucs.KEY: base value} to record, log lines); ConfigError on any explicit
    architecture key that differs from the base."""
    from demucs_lora.models.build import htdemucs_kwargs
    kwargs, defaults = _base_kwargs(base), htdemucs_kwargs()
    htd = OmegaConf.to_container(cfg.htdemucs, resolve=True)
    bad, lines, runtime = [], [], {}
    for key in sorted(set(explicit) & set(kwargs)):
        if _same(htd.get(key), kwargs[key]):
            continue
        if key in RUNTIME_KWARGS:
            runtime[key] = htd[key]
            lines.append(f"htdemucs.{key}={htd[key]} applied to the base (it had "
                         f"{plain(kwargs[key])}; no weight depends on it)")
            continue
        bad.append(f"htdemucs.{key}={htd.get(key)!r} but the base {cfg.continue_from} has "
                   f"{key}={plain(kwargs[key])!r}: its weights fix the architecture. Drop "
                   f"htdemucs.{key} (or set it to {plain(kwargs[key])!r}), or train a new "
                   "model without continue_from")
    if bad:
        raise ConfigError(bad[0] if len(bad) == 1 else "\n  " + "\n  ".join(bad))
    record = {f"htdemucs.{k}": plain(v) for k, v in kwargs.items()
              if k in htd or not _same(v, defaults[k])}
    record.update({f"htdemucs.{k}": v for k, v in runtime.items()})
    return record, lines


def apply_runtime_kwargs(base, cfg: DictConfig) -> None:
    """Every member of a bag, or the one base model (see `_apply_runtime_kwargs`)."""
    for member in getattr(base, "models", [base]):
        _apply_runtime_kwargs(member, cfg)


def _apply_runtime_kwargs(base, cfg: DictConfig) -> None:
    """Set the weight-free HTDemucs arguments of the config on the loaded base (and in
    its constructor record, so the saved model keeps them)."""
    for key in RUNTIME_KWARGS:
        value = cfg.htdemucs.get(key)
        args, kwargs = getattr(base, "_init_args_kwargs", ((), {}))
        if value is None or _same(kwargs.get(key, getattr(base, key, None)), value):
            continue
        if key == "t_dropout":   # every dropout of the transformer (HTDemucs keeps no attr)
            _set_dropout(getattr(base, "crosstransformer", None), float(value))
        else:
            setattr(base, key, value)
        base._init_args_kwargs = (args, {**kwargs, key: value})


def _set_dropout(module, p: float) -> None:
    import torch.nn as nn
    for sub in module.modules() if module is not None else ():
        if isinstance(sub, nn.Dropout):
            sub.p = p
        elif isinstance(sub, nn.MultiheadAttention):
            sub.dropout = p


def check_hop_length(cfg: DictConfig, nfft: int) -> tp.Dict[str, tp.Any]:
    hop = cfg.htdemucs.get("hop_length")
    if hop is not None and hop != nfft // 4:
        raise ConfigError(
            f"htdemucs.hop_length={hop}: HTDemucs derives its hop length from nfft "
            f"(nfft // 4 = {nfft // 4} for nfft={nfft}); only that value is accepted. Drop "
            "the key, or set htdemucs.nfft to 4 x hop_length (for a new model: with "
            "continue_from the weights fix nfft)")
    return {"htdemucs.hop_length": nfft // 4}


def resolve_sources(cfg: DictConfig, base) -> tp.Tuple[tp.Dict[str, tp.Any], tp.List[str]]:
    """({dset.sources, source_init} to record, log lines)."""
    from demucs_lora.config.run_config import run_sources
    from demucs_lora.models.heads import source_plan
    from demucs_lora.core.sources import init_mapping, plan_sources
    sources = run_sources(cfg, base)
    lines = []
    if cfg.dset.get("sources") is None:
        whose = "the base's" if base is not None else "the 4 demucs stems of a new model:"
        lines.append(f"dset.sources not set: {whose} {sources}")
    updates: tp.Dict[str, tp.Any] = {"dset.sources": sources}
    if base is None:
        return updates, lines
    init = OmegaConf.to_container(cfg.source_init) if cfg.source_init is not None else None
    source_plan(list(base.sources), sources, init)      # validates source_init
    plan = plan_sources(list(base.sources), sources, init)
    lines += [choice.line for choice in plan if choice.why != "kept"]
    mapping = init_mapping(plan)
    updates["source_init"] = mapping or None
    return updates, lines


def available_stems(cfg: DictConfig, sources: tp.Sequence[str]) -> tp.Optional[tp.Set[str]]:
    """Stem file names the dataset has (None: unknown, e.g. no such folder)."""
    from demucs_lora.data.layout import stem_names
    from demucs_lora.data.stems import SPLITS, dataset_roots, list_tracks
    dset = cfg.dset
    if OmegaConf.is_missing(dset, "wav") and dset.get("musdb") is None:
        return None
    if dset.get("wav") is None and dset.get("musdb") is None:
        from demucs_lora.data.synth import LAYOUTS, choose_layout
        stems = dset.synth.get("stems")
        return set(LAYOUTS.get(choose_layout(stems, sources, cfg.get("residual_source")), []))
    names: tp.Set[str] = set()
    from demucs_lora.config.run_config import data_config
    for root in dataset_roots(data_config(cfg, sources), progress=False, check=False):
        for split in SPLITS:
            if (root.path / split).is_dir():
                for track in list_tracks(root.path / split, sources):
                    names |= set(stem_names(root.path / split / track))
    return names or None


def resolve_stem_files(cfg: DictConfig, sources: tp.Sequence[str]
                       ) -> tp.Tuple[tp.Dict[str, tp.Any], tp.List[str]]:
    """A source with no file of its name but one file of another spelling reads that one."""
    from demucs_lora.core.sources import spelling_of
    given = cfg.dset.get("stem_files")
    files = dict(OmegaConf.to_container(given) if given is not None else {})
    have = available_stems(cfg, sources)
    lines = []
    if have is not None:
        for source in sources:
            if source in files or source in have or source == cfg.get("residual_source"):
                continue
            other = spelling_of(source, sorted(have))
            if other is not None:
                files[source] = other
                lines.append(f"source {source}: the dataset has {other}.wav and no "
                             f"{source}.wav: reading {other}.wav for {source}")
    return ({"dset.stem_files": files or None}, lines)


def resolve_with_base(cfg: DictConfig, base) -> tp.Tuple[DictConfig, tp.List[str]]:
    """The run's config given its base (None: a new model) + one log line per decision."""
    updates, lines = resolve_sources(cfg, base)
    nfft = int(cfg.htdemucs.nfft)
    if base is not None:
        member = getattr(base, "models", [base])[0]  # a bag's members share one architecture
        record, arch_lines = check_architecture(cfg, member, explicit_htdemucs_keys(cfg))
        updates.update(record)
        lines += arch_lines
        nfft = int(_base_kwargs(member)["nfft"])
    updates.update(check_hop_length(cfg, nfft))
    cfg = _updated(cfg, updates)
    check_weights(cfg.weights, list(cfg.dset.sources))   # the base's sources, now known
    files, file_lines = resolve_stem_files(cfg, list(cfg.dset.sources))
    return _updated(cfg, files), lines + file_lines
