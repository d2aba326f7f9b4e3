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

The numbers come from ``demucs_lora.inference.evaluation`` (how each mixture is
normalized, seeding, rounding). Exit status: 0 done; 2 a config or usage error; 1 a
data, model or adapter error, or every score NaN (README: exit status).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from pathlib import Path

from demucs_lora.commands.arguments import positive_int
from demucs_lora.config.compose import compose, hydra_errors_as_config_errors, load_xp_config
from demucs_lora.core.errors import ConfigError, DemucsLoRAError, exit_on_user_error
from demucs_lora.core.files import atomic_write_text
from demucs_lora.config.run_config import data_config
from demucs_lora.inference.evaluation import build_dataset, evaluate_model, format_table
from demucs_lora.inference.separation import inference_device

if tp.TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

GROUPS = ("model", "dset", "optim", "variant")


class NoScores(DemucsLoRAError):
    """Every score is NaN (the model outputs NaN/inf): exit status 1, not a table of '-'."""


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
    cfg = canonical_config(load_xp_config(config_file))  # older files: top-level sources
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
        with hydra_errors_as_config_errors():
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item.lstrip("+")]))
    return cfg


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
    parser.add_argument("--max-tracks", type=positive_int, default=None, metavar="N",
                        help="evaluate N tracks only")
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
    from demucs_lora.model_files.resolve import resolve_adapter, xp_folder
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
    from demucs_lora.api import get_model
    from demucs_lora.config.values import check_value_ranges
    from demucs_lora.model_files.resolve import xp_folder
    metrics = selected_metrics(args)
    device = inference_device(args.device)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: overrides are key=value, the model "
                          "is given with -n")
    model = get_model(args.name, repo=args.repo, adapter=args.adapter,
                      trust_remote_code=args.trust_remote_code)
    xp = _source_xp(args.name, args.adapter)
    cfg = xp_config(xp / "config.yaml", args.overrides) if xp else compose(args.overrides)
    check_value_ranges(cfg, ("test.shifts", "test.overlap"))
    sources = cfg.dset.get("sources")
    if sources is not None and list(sources) != list(model.sources):
        print(f"note: evaluating the model's sources {list(model.sources)} (config has "
              f"{list(sources)})", file=sys.stderr)
    dataset = build_dataset(data_config(cfg, model.sources), args.split, model.samplerate,
                            model.audio_channels, progress=not args.no_progress)
    test = cfg.test
    results = {"model": str(args.name), "adapter": args.adapter, "split": args.split,
               "xp": xp.name if xp else None, "sources": list(model.sources),
               "settings": {"shifts": int(test.shifts), "overlap": float(test.overlap),
                            "split": bool(test.split), "seed": int(cfg.get("seed", 0))}}
    scores = evaluate_model(model, dataset, shifts=int(test.shifts),
                            overlap=float(test.overlap), split=bool(test.split),
                            metrics=metrics, max_tracks=args.max_tracks, device=device,
                            progress=not args.no_progress, seed=int(cfg.get("seed", 0)),
                            label=f"model {args.name}" + (f" with adapter {args.adapter}"
                                                          if args.adapter else ""))
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
    """Console script ``demucs-lora-test``; a user error exits with one line (exit_code)."""
    args = get_parser().parse_intermixed_args(argv)
    with exit_on_user_error():
        run(args)


if __name__ == "__main__":
    main()
