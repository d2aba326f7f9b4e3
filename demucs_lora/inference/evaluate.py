"""Test a model on a dataset split: per-source SDR (nSDR), SI-SDR, L1-freq, bleedless,
fullness; a printed table and the same numbers as JSON (``demucs-lora-test``).

    python -m tools.test_pretrained -n NAME_OR_SIG [--repo DIR] [--adapter PATH]
        [--split test|valid] [--json OUT] [--metrics sdr neg_log_wmse ...]
        [test.shifts=2 test.overlap=0.25 dset.wav=...]

``--lora_checkpoint`` is a spelling of ``--adapter``; ``--metrics`` picks among
``metrics.ALL_METRICS`` (MSST's names; the default is ``metrics.METRICS``).

Which config describes the data: for an XP signature (or an adapter whose header names an
XP), the XP's own resolved ``config.yaml``, so dataset and sources are those it trained
on; group overrides (``dset=wav``, ``variant=five_stem``, ``model=...``) change it by
what they change in ``conf/`` and ``key=value`` overrides are applied on top. Otherwise
the ``conf/`` defaults composed with the overrides. The sources evaluated are the model's.

Why the mixture is normalized here and not by the dataset: ``StemDataset`` can normalize
by the whole-track statistics of its metadata (what training uses); for testing we read raw
audio (``normalize=False``) and normalize each mixture exactly like the demucs CLI and
``demucs.evaluate`` (``separate.separate_tensor``), so metrics are on the original scale
and comparable with demucs'. ``test.shifts`` draws random offsets: Python's ``random`` is
seeded with ``seed`` so reruns agree. Values are rounded to ``DECIMALS`` in the JSON and
the table is formatted from that dict, so the two always agree.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import typing as tp
from pathlib import Path

from demucs_lora.core.files import atomic_write_text
from demucs_lora.core.errors import ConfigError, DemucsLoRAError, exit_on_user_error

if tp.TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig
    from torch import nn

DECIMALS = 4


class NoScores(DemucsLoRAError):
    """Every score is NaN (the model outputs NaN/inf): exit status 1, not a table of '-'."""
from demucs_lora.core.paths import CONF_DIR
GROUPS = ("model", "dset", "optim", "variant")


# ----------------------------------------------------------------------------- config
def compose(overrides: tp.Sequence[str] = ()) -> "DictConfig":
    """``conf/config.yaml`` composed with Hydra overrides (no Hydra run, no chdir); the
    guide's spellings are accepted (demucs_lora.config.aliases)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from demucs_lora.config.keys import canonical_checked, prepare_argv
    overrides = prepare_argv(overrides)
    if not CONF_DIR.is_dir():
        raise ConfigError(f"no Hydra config folder at {CONF_DIR}: run from a source checkout")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                               job_name="test_pretrained"):
        return canonical_checked(hydra_compose(config_name="config", overrides=overrides),
                                 overrides)


def _flat(cfg: tp.Mapping, prefix: str = "") -> tp.Dict[str, tp.Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def xp_config(config_file: Path, overrides: tp.Sequence[str]) -> "DictConfig":
    """An XP's config.yaml with overrides: groups as their delta over the defaults,
    ``key=value`` set directly (the key must exist: a typo is an error, not a no-op)."""
    from omegaconf import OmegaConf
    from demucs_lora.config.aliases import canonical_config, normalize_argv
    cfg = canonical_config(OmegaConf.load(config_file))     # older files: top-level sources
    overrides = normalize_argv(overrides)
    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    values = [o for o in overrides if o not in groups]
    if groups:
        plain = OmegaConf.to_container(compose([]), resolve=True)
        changed = OmegaConf.to_container(compose(groups), resolve=True)
        before, after = _flat(plain), _flat(changed)
        for key, value in after.items():
            if key not in before or before[key] != value:
                OmegaConf.update(cfg, key, value, force_add=True)
    for item in values:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. test.shifts=2)")
        if OmegaConf.select(cfg, key.lstrip("+"), default="__missing__") == "__missing__" \
                and not key.startswith("+"):
            raise ConfigError(f"override {item!r}: {config_file} has no key {key!r} "
                              "(prefix it with + to add a new key)")
        dotted = OmegaConf.from_dotlist([item.lstrip("+")])
        cfg = OmegaConf.merge(cfg, dotted)
    return cfg


# ----------------------------------------------------------------------------- data
def build_dataset(cfg: "DictConfig", sources: tp.Sequence[str], split: str,
                  samplerate: int, channels: int, progress: bool = True):
    """Whole-track, un-normalized StemDataset of ``split`` for ``sources``."""
    from demucs_lora.data.stems import _abspath, build_metadata, dataset_root, stem_files, StemDataset
    from demucs_lora.core.errors import DatasetError
    residual = cfg.get("residual_source")
    root = dataset_root(cfg, list(sources), progress=progress)
    files = stem_files(cfg)
    meta = build_metadata(root, list(sources), _abspath(cfg.dset.metadata), residual, files)
    dataset = StemDataset(root, split, list(sources), meta, segment=None,
                          samplerate=samplerate, channels=channels, normalize=False,
                          residual_source=residual, stem_files=files)
    if len(dataset) == 0:
        raise DatasetError(f"{root}: no tracks in {split}/ (expected {root / split}/TRACK/"
                           f"{{mixture,{','.join(sources)}}}.wav); use --split valid or "
                           "another dset.wav")
    return dataset


def evaluate_model(model: "nn.Module", dataset, shifts: int = 0, overlap: float = 0.25,
                   split: bool = True, metrics: tp.Sequence[str] = (),
                   max_tracks: tp.Optional[int] = None, device: str = "cpu",
                   progress: bool = True, seed: int = 0) -> dict:
    """``{"tracks": {name: {source: {metric: v}}}, "summary": {metric_source, metric}}``,
    values rounded to DECIMALS; every track separated with ``separate_tensor``."""
    import torch
    import tqdm
    from demucs_lora.metrics import METRICS, summarize, track_metrics
    from demucs_lora.inference.separate import separate_tensor
    metrics = tuple(metrics or METRICS)
    names = list(dataset.metadata)
    count = len(names) if max_tracks is None else min(max_tracks, len(names))
    random.seed(seed)
    torch.manual_seed(seed)
    model = model.to(device).eval()
    tracks = {}
    for index in tqdm.tqdm(range(count), desc="test", unit="track", disable=not progress):
        item = dataset[index]
        mix, ref = item[0], item[1:]
        est = separate_tensor(model, mix.to(device), shifts=shifts, overlap=overlap,
                              split=split, device=device).cpu()
        tracks[names[index]] = track_metrics(est, ref, list(model.sources), metrics,
                                             samplerate=model.samplerate, mix=mix)
    summary = summarize(list(tracks.values()))
    return {"tracks": _round(tracks), "summary": _round(summary)}


def _round(value: tp.Any) -> tp.Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, DECIMALS)
    return value


# ----------------------------------------------------------------------------- table
def format_table(results: dict) -> str:
    """Rows: the sources then ``mean``; columns: the metrics (keys as in the JSON).
    Built from ``results["summary"]`` only, so it shows exactly the JSON numbers."""
    summary = results["summary"]
    sources, metrics = results["sources"], results["metrics"]
    width = max(8, *(len(s) for s in sources))
    cols = [max(10, len(m) + 1) for m in metrics]

    def cell(value: tp.Optional[float], w: int) -> str:
        return f"{'-' if value is None else f'{value:.{DECIMALS}f}':>{w}}"

    lines = [f"{'source':<{width}}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, cols))]
    for source in sources:
        lines.append(f"{source:<{width}}" + "".join(
            cell(summary.get(f"{m}_{source}"), w) for m, w in zip(metrics, cols)))
    lines.append(f"{'mean':<{width}}" + "".join(cell(summary.get(m), w)
                                               for m, w in zip(metrics, cols)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demucs-lora-test", description="Evaluate a model (exported name, XP signature "
        "or base + adapter) on a dataset split; prints a table and writes JSON.")
    parser.add_argument("-n", "--name", required=True,
                        help="model: NAME in --repo, XP signature or .th path")
    parser.add_argument("--repo", type=Path, help="folder of model files (release_models)")
    parser.add_argument("--adapter", "--lora_checkpoint", "--lora-checkpoint", dest="adapter",
                        help="adapter path or XP signature, loaded on --name "
                             "(--lora_checkpoint: the same, as other projects spell it)")
    parser.add_argument("--split", choices=["test", "valid"], default="test")
    parser.add_argument("--json", type=Path, help="output JSON (default: XP/test_results.json "
                        "for an XP, else not written)")
    parser.add_argument("--max-tracks", type=int, default=None, help="evaluate N tracks only")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="metrics to report (default: nsdr si_sdr l1_freq bleedless "
                             "fullness); also sdr (BSSEval v4, museval's), neg_log_wmse, "
                             "aura_stft, aura_mrstft (as MSST names them)")
    parser.add_argument("-d", "--device", default=None, help="cpu or cuda (default: auto)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow full unpickling of model files (they are code!)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides: test.shifts=2 test.overlap=0.25 dset.wav=...")
    return parser


def _source_xp(name: str, adapter: tp.Optional[str]) -> tp.Optional[Path]:
    """The XP whose config describes the data: the model's, else the adapter's."""
    from demucs_lora.hub.resolve import resolve_adapter, xp_folder
    from demucs_lora.lora.adapter_file import read_header
    folder = xp_folder(name)
    if folder is not None and (folder / "config.yaml").is_file():
        return folder
    if adapter is not None:
        header = read_header(resolve_adapter(adapter))
        folder = xp_folder(str(header.get("xp") or ""))
        if folder is not None and (folder / "config.yaml").is_file():
            return folder
    return None


def selected_metrics(args: argparse.Namespace) -> tp.Tuple[str, ...]:
    """``--metrics`` (space or comma separated; KEY=VALUE items it swallowed go back to the
    overrides), checked by name; the default set without it."""
    from demucs_lora.metrics import METRICS, check_metrics
    if not args.metrics:
        return METRICS
    names = []
    for item in args.metrics:
        if "=" in item:
            args.overrides.append(item)
        else:
            names += [n for n in item.split(",") if n]
    try:
        check_metrics(names)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None
    return tuple(dict.fromkeys(names))


def run(args: argparse.Namespace) -> dict:
    """Load, configure, evaluate, print, write; returns the results dict."""
    import torch
    from demucs_lora.api import get_model
    from demucs_lora.hub.resolve import xp_folder
    metrics = selected_metrics(args)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: overrides are key=value, the model "
                          "is given with -n")
    model = get_model(args.name, repo=args.repo, adapter=args.adapter,
                      trust_remote_code=args.trust_remote_code)
    xp = _source_xp(args.name, args.adapter)
    cfg = xp_config(xp / "config.yaml", args.overrides) if xp else compose(args.overrides)
    sources = cfg.dset.get("sources")
    if sources is not None and list(sources) != list(model.sources):
        print(f"note: evaluating the model's sources {list(model.sources)} (config has "
              f"{list(sources)})", file=sys.stderr)
    dataset = build_dataset(cfg, list(model.sources), args.split, model.samplerate,
                            model.audio_channels, progress=not args.no_progress)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    test = cfg.test
    results = {"model": str(args.name), "adapter": args.adapter, "split": args.split,
               "xp": xp.name if xp else None, "sources": list(model.sources),
               "settings": {"shifts": int(test.shifts), "overlap": float(test.overlap),
                            "split": bool(test.split), "seed": int(cfg.get("seed", 0))}}
    scores = evaluate_model(model, dataset, shifts=int(test.shifts),
                            overlap=float(test.overlap), split=bool(test.split),
                            metrics=metrics, max_tracks=args.max_tracks, device=device,
                            progress=not args.no_progress, seed=int(cfg.get("seed", 0)))
    results.update(metrics=list(metrics), **scores)
    print(f"{args.name}{' + ' + str(args.adapter) if args.adapter else ''} on "
          f"{args.split} ({len(scores['tracks'])} track(s), shifts={test.shifts}, "
          f"overlap={test.overlap})")
    print(format_table(results))
    if scores["summary"] and all(v is None for v in scores["summary"].values()):
        raise NoScores(f"every score of {args.name} is NaN: the model outputs NaN/inf on "
                       f"{args.split} (nothing written); it probably diverged in training")
    out = args.json
    if out is None and xp_folder(args.name) is not None and args.adapter is None:
        out = xp_folder(args.name) / ("test_results.json" if args.split == "test"
                                      else "valid_results.json")
    if out is not None:
        _write_json(out, results)
        print(f"wrote {out}")
    return results


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora-test``; exits 1 with a message on user errors."""
    args = get_parser().parse_intermixed_args(argv)
    try:
        with exit_on_user_error():
            run(args)
    except Exception as exc:  # hydra/omegaconf: bad override, unknown key or group
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
