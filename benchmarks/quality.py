"""Adaptation quality at an equal wall-clock training budget: LoRA rank modes vs full FT.

    python -m benchmarks.quality [--budget-seconds S] [--out benchmarks/results]
    python -m benchmarks.quality --smoke --out TMP --workdir TMP/work      # CI, < 2 min

From the same base (the shipped `demucs_lora/assets/base_tiny_A.th`, a tiny HTDemucs
trained on synthetic domain A, 4 stems), every configuration adapts to synthetic domain B
(`dset.synth.domain=B`, same 4 stems) with `train_budget_seconds=S`: training stops after
the epoch in which the summed train time reaches S (`epochs` is set high so the budget is
what stops it). Each configuration is a real `dora run` subprocess, as a user types it:

    full FT          htdemucs.lora_rank=0 optim.lr=3e-4
    uniform r=4/8/16 htdemucs.lora_rank=R optim.lr=LORA_LR
    heuristic r=8    htdemucs.lora_rank_mode=heuristic (not budget-matched)
    gradient r=8     htdemucs.lora_rank_mode=gradient (the parameter budget of uniform r=8)

The gain of a run is its best validation nSDR (the epoch with the best mean, i.e. the
model `best.th` holds) minus `valid_initial_nsdr*` (the base on valid B, before training),
per source and mean, all read from the XP's history.json. Trainable parameters: the sum of
`layers[].trainable` in ranks.json for LoRA runs, `Trainable parameters` of train.log for
the full fine-tune. Targets: uniform r=8 gain / full-FT gain >= 0.90, and gradient gain >=
uniform gain (same rank, same parameter budget).

Writes NAME.json (`quality.json`, `quality_smoke.json` in smoke mode) and two figures,
NAME_gain_vs_params.png and NAME_ranks.png, to --out. XPs land in `outputs/xps` under
--workdir (default: the repository root; Dora resumes them, and a configuration whose
budget is already spent is not run again, so re-running only re-reads the results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from . import common
from .common import ROOT

NAME = "quality"
BASE = ROOT / "demucs_lora" / "assets" / "base_tiny_A.th"
SOURCES = common.SOURCES
FULL_LR = "3e-4"
LORA_LR = "2e-3"
DEFAULT_BUDGET = 90.0

# Shared by every run (the base, domain B and its size, batch). max_batches=4 makes an
# epoch ~4 steps: the budget is checked after each epoch, so short epochs keep the train
# time of the runs close (with whole epochs of 12 steps, ~50 s here, one run could get
# an extra epoch, +50%, over another). Validation runs after every epoch (test.every=1),
# so the last epoch before the budget stop is always scored.
COMMON = ["model=htdemucs_tiny", "dset.synth.domain=B", "dset.synth.tracks=8",
          "dset.synth.valid_tracks=2", "dset.synth.test_tracks=2", "dset.synth.seconds=8",
          "batch_size=4", "max_batches=4", "epochs=50"]
# Smoke: one epoch of 2 batches on a tiny dataset (overrides COMMON's values).
SMOKE = ["model=htdemucs_tiny", "dset.synth.domain=B", "dset.synth.tracks=2",
         "dset.synth.valid_tracks=1", "dset.synth.test_tracks=1", "dset.synth.seconds=3",
         "dset.segment=1", "batch_size=2", "max_batches=2", "epochs=1", "test.initial=true",
         "htdemucs.lora_gradient_batches=2"]


class Run(tp.NamedTuple):
    key: str
    label: str
    mode: str          # full | uniform | heuristic | gradient
    rank: int
    args: tp.Tuple[str, ...]


def runs(smoke: bool, lora_lr: str, full_lr: str = FULL_LR) -> tp.List[Run]:
    def lora(mode: str, rank: int) -> Run:
        return Run(f"{mode}_r{rank}", f"{mode} r={rank}", mode, rank,
                   (f"htdemucs.lora_rank={rank}", f"htdemucs.lora_rank_mode={mode}",
                    f"optim.lr={lora_lr}"))
    full = Run("full", "full FT", "full", 0, ("htdemucs.lora_rank=0", f"optim.lr={full_lr}"))
    if smoke:
        return [full, lora("uniform", 4), lora("gradient", 4)]
    return [full, lora("uniform", 4), lora("uniform", 8), lora("uniform", 16),
            lora("heuristic", 8), lora("gradient", 8)]


# ----------------------------------------------------------------------------- XPs
def overrides(run: Run, base: str, budget: float, smoke: bool) -> tp.List[str]:
    shared = SMOKE if smoke else COMMON
    return [f"continue_from={base}", *shared, f"train_budget_seconds={budget:g}", *run.args]


def xp_folder(args: tp.Sequence[str], workdir: Path) -> Path:
    """The folder Dora gives these overrides (a pure function of them), under workdir.

    Dora makes its `dora.dir` absolute against the cwd when the entry point is imported:
    take the folder relative to this process's cwd and put it under workdir.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from demucs_lora.train import main
    folder = Path(main.get_xp(list(args)).folder)
    if folder.is_absolute():
        folder = Path(os.path.relpath(folder, Path.cwd()))
    return workdir / folder


def read_history(folder: Path) -> tp.List[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def finished(history: tp.List[dict], budget: float, epochs: int) -> bool:
    """Whether the solver stopped this XP for good (budget spent or all epochs done).

    A budget-stopped XP is not 'done' for Dora (epochs remain), and re-running it would
    train one more epoch before the budget check: such runs are not launched again.
    """
    spent = sum(h.get("train_seconds", 0.0) for h in history)
    return bool(history) and (spent >= budget or len(history) >= epochs)


def dora_run(args: tp.Sequence[str], workdir: Path, log: Path) -> tp.Tuple[int, float]:
    cmd = [sys.executable, "-m", "dora", "-P", "demucs_lora", "run", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ (cd " + str(workdir) + ") dora run " + " ".join(args), flush=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=handle,
                              stderr=subprocess.STDOUT)
    return proc.returncode, time.perf_counter() - start


def trainable_from_log(folder: Path) -> tp.Tuple[tp.Optional[int], tp.Optional[int]]:
    """(trainable, total) of the last `Trainable parameters: N / M` line of train.log."""
    path = folder / "train.log"
    if not path.exists():
        return None, None
    found = re.findall(r"Trainable parameters: (\d+) / (\d+)", path.read_text())
    return (int(found[-1][0]), int(found[-1][1])) if found else (None, None)


def read_ranks(folder: Path) -> tp.Optional[dict]:
    path = folder / "ranks.json"
    return json.loads(path.read_text()) if path.exists() else None


def summarize(run: Run, folder: Path) -> dict:
    """Gains, params, epochs and train time of one XP (from its folder only)."""
    history = read_history(folder)
    trainable, total = trainable_from_log(folder)
    ranks = read_ranks(folder) if run.mode != "full" else None
    lora_params = sum(row["trainable"] for row in ranks["layers"]) if ranks else None
    out = {"label": run.label, "mode": run.mode, "rank": run.rank, "xp": folder.name,
           "overrides": list(run.args), "trainable_total": trainable, "model_params": total,
           "lora_params": lora_params,
           "params": lora_params if run.mode != "full" else trainable,
           "epochs": len(history),
           "seconds_per_epoch": (sum(h.get("train_seconds", 0.0) for h in history)
                                 / len(history)) if history else None,
           "train_seconds": sum(h.get("train_seconds", 0.0) for h in history)}
    first = history[0] if history else {}
    initial = {s: first.get(f"valid_initial_nsdr_{s}") for s in SOURCES}
    initial["mean"] = first.get("valid_initial_nsdr")
    scored = [h for h in history if h.get("valid_nsdr") is not None]
    nan = float("nan")
    if not scored or initial["mean"] is None:
        out.update(initial=initial, best={}, gain={k: nan for k in [*SOURCES, "mean"]},
                   best_epoch=None, curve=[])
        return out
    best = max(scored, key=lambda h: h["valid_nsdr"])
    best_values = {s: best.get(f"valid_nsdr_{s}", nan) for s in SOURCES}
    best_values["mean"] = best["valid_nsdr"]
    out.update(initial=initial, best=best_values, best_epoch=best["epoch"],
               gain={k: best_values[k] - initial[k] for k in best_values},
               curve=[{"epoch": h["epoch"], "valid_nsdr": h["valid_nsdr"],
                       "train_seconds": h.get("train_seconds")} for h in scored])
    if ranks:
        out["ranks"] = [{"layer": row["layer"], "rank": row["rank"]} for row in ranks["layers"]]
    return out


def carry_over(results: tp.Dict[str, dict], previous: Path) -> None:
    """Wall time and load of runs not launched now, from the JSON of the run that did."""
    try:
        before = json.loads(previous.read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return
    for key, result in results.items():
        old = before.get(key) or {}
        if not result["launched"] and old.get("xp") == result["xp"]:
            for name in ("wall_seconds", "load_avg_1m"):
                if result.get(name) is None:
                    result[name] = old.get(name)


def equal_step_gains(results: tp.Dict[str, dict]) -> dict:
    """Mean gain of each run within the first E epochs, E = the fewest epochs of any run.

    Every epoch has the same batches (max_batches), so this compares the runs at equal
    optimizer steps: it separates "learns more per step" from "takes more steps in the
    budget" (a faster step, or a machine that was less loaded during that run).
    """
    curves = {k: r["curve"] for k, r in results.items() if r["curve"]}
    if not curves:
        return {"epoch": None, "gain": {}}
    epoch = min(len(c) for c in curves.values())
    return {"epoch": epoch, "gain": {
        k: max(c["valid_nsdr"] for c in curve[:epoch]) - results[k]["initial"]["mean"]
        for k, curve in curves.items()}}


# ----------------------------------------------------------------------------- targets
def ratio(a: float, b: float) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return float("nan")
    return a / b


def targets(results: tp.Dict[str, dict], rank: int) -> tp.List[dict]:
    full = results["full"]["gain"]["mean"]
    uniform = results[f"uniform_r{rank}"]["gain"]["mean"]
    gradient = results[f"gradient_r{rank}"]["gain"]["mean"]
    return [
        common.target_row(f"uniform r={rank} gain / full-FT gain", ratio(uniform, full),
                          0.90, ">="),
        common.target_row(f"gradient r={rank} gain - uniform r={rank} gain (dB)",
                          gradient - uniform, 0.0, ">="),
    ]


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


MARKERS = {"full": "s", "uniform": "o", "heuristic": "^", "gradient": "D"}
COLORS = {"full": "black", "uniform": "tab:blue", "heuristic": "tab:orange",
          "gradient": "tab:green"}
UNIFORM_SHADES = {4: "#9ecae1", 8: "#3182bd", 16: "#08306b"}
# Label offsets (points) per mode, so that runs with equal params do not overlap.
OFFSETS = {"full": (-10, 8), "uniform": (7, -14), "heuristic": (7, -16), "gradient": (-8, 8)}


def _color(run: dict) -> str:
    if run["mode"] == "uniform":
        return UNIFORM_SHADES.get(run["rank"], COLORS["uniform"])
    return COLORS[run["mode"]]


def plot_gain_vs_params(results: tp.Dict[str, dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    uniform = sorted((r["params"], r["gain"]["mean"]) for r in results.values()
                     if r["mode"] == "uniform" and r["params"])
    if len(uniform) > 1:
        ax.plot(*zip(*uniform), color=COLORS["uniform"], alpha=0.4, lw=1)
    for r in results.values():
        x, y = r["params"], r["gain"]["mean"]
        if not x or y is None or not math.isfinite(y):
            continue
        ax.scatter([x], [y], marker=MARKERS[r["mode"]], color=_color(r), s=60,
                   label=None if r["mode"] in seen else r["mode"], zorder=3)
        seen.add(r["mode"])
        dx, dy = OFFSETS[r["mode"]]
        ax.annotate(f"{r['label']}: {y:+.2f} dB", (x, y), textcoords="offset points",
                    xytext=(dx, dy), fontsize=8, ha="right" if dx < 0 else "left")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = [t for t in (1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7, 3e7)
             if any(r["params"] and t / 3 <= r["params"] <= t * 3 for r in results.values())]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t / 1e6:g}M" if t >= 1e6 else f"{t / 1e3:g}k" for t in ticks])
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("mean nSDR gain on valid B (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.margins(x=0.25, y=0.2)
    if seen:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _group(layer: str) -> str:
    """encoder.2.dconv.layers.0.0 -> encoder.2; crosstransformer.layers.1... -> ct.layers.1"""
    parts = layer.split(".")
    if parts[0] == "crosstransformer" and len(parts) > 2:
        return "ct." + ".".join(parts[1:3])
    return ".".join(parts[:2])


def plot_ranks(results: tp.Dict[str, dict], path: Path, title: str) -> None:
    plt = _plt()
    lora = [r for r in results.values() if r.get("ranks")]
    layers: tp.List[str] = []
    for r in lora:
        for row in r["ranks"]:
            if row["layer"] not in layers:
                layers.append(row["layer"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    index = {name: i for i, name in enumerate(layers)}
    for r in lora:
        ranks = [0] * len(layers)
        for row in r["ranks"]:
            ranks[index[row["layer"]]] = row["rank"]
        ax.plot(range(len(layers)), ranks, drawstyle="steps-mid", marker=MARKERS[r["mode"]],
                ms=3, lw=1.2, label=f"{r['label']} ({r['params']:,} params)",
                color=_color(r), alpha=0.85)
    ticks, labels, previous = [], [], None
    for i, name in enumerate(layers):
        group = _group(name)
        if group != previous:
            ticks.append(i)
            labels.append(group)
            previous = group
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    for t in ticks:
        ax.axvline(t - 0.5, color="grey", lw=0.4, alpha=0.4)
    ax.set_yscale("symlog", base=2, linthresh=1)
    ax.set_yticks([0, 1, 2, 4, 8, 16, 32])
    ax.set_yticklabels(["0", "1", "2", "4", "8", "16", "32"])
    ax.set_ylim(-0.4, 45)
    ax.set_xlabel(f"LoRA target layer index (0-{len(layers) - 1}; label = first layer of a block)")
    ax.set_ylabel("rank")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if lora:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def format_results(results: tp.Dict[str, dict]) -> str:
    header = ["run", "params", "epochs", "train s", *SOURCES, "mean gain", "base", "best"]
    rows = []
    for r in results.values():
        g = r["gain"]
        cell = lambda v: "nan" if v is None or not math.isfinite(v) else f"{v:+.3f}"  # noqa
        rows.append([r["label"], f"{r['params']:,}" if r["params"] else "-", r["epochs"],
                     f"{r['train_seconds']:.0f}", *[cell(g.get(s)) for s in SOURCES],
                     cell(g.get("mean")), f"{r['initial'].get('mean') or float('nan'):.3f}",
                     f"{r['best'].get('mean', float('nan')):.3f}"])
    return common.format_table(header, rows)


def _load() -> tp.Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CI: full FT, uniform r=4, gradient r=4; 1 epoch of 2 batches")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help=f"train_budget_seconds of every run (default {DEFAULT_BUDGET:g})")
    parser.add_argument("--lora-lr", default=LORA_LR, help="optim.lr of every LoRA run")
    parser.add_argument("--full-lr", default=FULL_LR, help="optim.lr of the full fine-tune")
    parser.add_argument("--only", default=None, help="comma-separated run keys (e.g. full,"
                        "uniform_r8): run and report only these (no targets)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {common.RESULTS_DIR.relative_to(ROOT)})")
    parser.add_argument("--workdir", default=None,
                        help="cwd of the dora runs: XPs go to WORKDIR/outputs/xps, synthetic "
                        "data to WORKDIR/metadata (default: the repository root)")
    args = parser.parse_args(argv)
    common.passive_omp()
    budget = args.budget_seconds if args.budget_seconds is not None else \
        (1.0 if args.smoke else DEFAULT_BUDGET)
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT
    workdir.mkdir(parents=True, exist_ok=True)
    base = str(BASE.relative_to(ROOT)) if workdir == ROOT else str(BASE)
    out_dir = common.results_dir(args).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = NAME + ("_smoke" if args.smoke else "")
    log = workdir / "outputs" / f"{stem}_dora.log"  # the runs' output (git-ignored there)
    log.parent.mkdir(parents=True, exist_ok=True)
    plan = runs(args.smoke, args.lora_lr, args.full_lr)
    if args.only:
        keys = args.only.split(",")
        unknown = [k for k in keys if k not in {r.key for r in plan}]
        if unknown:
            parser.error(f"unknown run(s) {unknown}; choose from {[r.key for r in plan]}")
        plan = [r for r in plan if r.key in keys]
    machine = common.describe_machine("cpu")
    settings = {"budget_seconds": budget, "lora_lr": args.lora_lr, "full_lr": args.full_lr,
                "smoke": args.smoke, "workdir": str(workdir), "base": base,
                "common": SMOKE if args.smoke else COMMON}
    print(common.header("Adaptation quality at equal train budget (domain A -> B)", machine,
                        {"budget_s": f"{budget:g}", "lora_lr": args.lora_lr,
                         "full_lr": args.full_lr, "workdir": workdir}), flush=True)
    epochs = 1 if args.smoke else 50
    results: tp.Dict[str, dict] = {}
    errors = []
    for run in plan:
        xp_args = overrides(run, base, budget, args.smoke)
        folder = xp_folder(xp_args, workdir)
        wall, launched, load = None, False, _load()
        if finished(read_history(folder), budget, epochs):
            print(f"{run.label}: XP {folder.name} already spent its budget, not run again")
        else:
            launched = True
            rc, wall = dora_run(xp_args, workdir, log)
            if rc != 0:
                errors.append(f"{run.key}: dora run exited {rc} (see {log})")
                print(f"{run.label}: FAILED (exit {rc}), see {log}", file=sys.stderr)
        result = summarize(run, folder)
        result.update(command="dora run " + " ".join(xp_args), launched=launched,
                      wall_seconds=wall,
                      load_avg_1m={"start": load, "end": _load()} if launched else None)
        results[run.key] = result
        print(f"{run.label}: XP {folder.name}, {result['epochs']} epochs, "
              f"{result['train_seconds']:.0f} s train"
              + (f", {wall:.0f} s wall" if wall else "")
              + f", mean gain {result['gain']['mean']:+.3f} dB", flush=True)
    carry_over(results, out_dir / f"{stem}.json")
    equal_steps = equal_step_gains(results)
    rank = 4 if args.smoke else 8
    target_rows = [] if args.only else targets(results, rank)
    data = {"benchmark": NAME, "machine": machine, "settings": settings, "runs": results,
            "targets": target_rows, "equal_steps": equal_steps, "errors": errors}
    if not args.only:
        data["ratios"] = {
            f"{k}_gain_over_full": ratio(r["gain"]["mean"], results["full"]["gain"]["mean"])
            for k, r in results.items() if k != "full"}
        data["gradient_over_uniform"] = ratio(results[f"gradient_r{rank}"]["gain"]["mean"],
                                              results[f"uniform_r{rank}"]["gain"]["mean"])
    path = common.write_result(NAME, data, argparse.Namespace(smoke=args.smoke,
                                                              out=str(out_dir)))
    title = (f"domain A -> B, equal train budget {budget:g} s, tiny HTDemucs "
             f"(LoRA lr {args.lora_lr}, full FT lr {args.full_lr})")
    figures = [out_dir / f"{stem}_gain_vs_params.png", out_dir / f"{stem}_ranks.png"]
    plot_gain_vs_params(results, figures[0], "mean nSDR gain vs trainable params\n" + title)
    plot_ranks(results, figures[1], "per-layer LoRA ranks by mode")
    print()
    print(format_results(results))
    if equal_steps["epoch"]:
        print(f"at equal steps (best mean gain within the first {equal_steps['epoch']} epochs, "
              "the fewest any run did; every epoch has the same number of batches): "
              + ", ".join(f"{results[k]['label']} {v:+.3f}"
                          for k, v in equal_steps["gain"].items()))
    if target_rows:
        print("targets:")
        print(common.format_targets(target_rows))
    print(f"wrote {path}, {figures[0].name}, {figures[1].name}")
    if errors:
        print("errors: " + "; ".join(errors), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
