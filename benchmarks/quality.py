"""Adaptation quality, fairly: every method at its best lr, equal steps, a data-size curve.

    python -m benchmarks.quality [--methods full,uniform_r8,...] [--epochs 8] [--out DIR]
    python -m benchmarks.quality --smoke --out TMP --workdir TMP/work      # CI

From the same base (the shipped `demucs_lora/assets/base_tiny_A.th`, a tiny HTDemucs
trained on synthetic domain A, 4 stems), every run adapts to synthetic domain B
(`dset.synth.domain=B`, same 4 stems). Each run is a real `dora run` subprocess, as a
user types it. Methods (METHODS):

    full FT            htdemucs.lora_rank=0
    uniform r=4/8/16   htdemucs.lora_rank=R
    heuristic r=8 bm   htdemucs.lora_rank_mode=heuristic htdemucs.lora_budget_match=true
    gradient r=8       htdemucs.lora_rank_mode=gradient (the parameter budget of uniform r=8)

Protocol (why: a single lr per method, or a sweep that stops one step early, decides the
comparison; equal wall-clock favours whichever run the machine's load slowed least):

1. Equal steps: every run trains `epochs` x `max_batches` batches of 4 (no time budget).
2. lr sweep per method: 3 values a factor ~3 apart (full FT from 3e-4, LoRA from 1e-3, on
   the LR_LADDER); when the best (on the valid split) is at an edge of the values tried,
   the next value beyond it is run too, up to --max-extend times, so the best is inside
   the sweep (`best_at_edge` in the JSON says when it is not).
3. The best lr is chosen on the valid split (best valid nSDR over epochs, the model
   best.th keeps); that model is scored on the test split: gain = test nSDR of best.th
   minus test nSDR of the base.
4. Data-size curve: each method at its best lr (from the sweep at the largest size) with
   fewer training tracks (TRACKS, e.g. 2, 4, 8); the valid and test tracks are the same
   at every size (synthetic track i of a split does not depend on the other splits).

Writes NAME.json (`quality.json`, `quality_smoke.json` in smoke mode) and figures
NAME_gain_vs_params.png (test gain at the best lr), NAME_gain_vs_tracks.png (the
data-size curve), NAME_lr_sweep.png (valid gain vs lr) and NAME_ranks.png to --out.
XPs land in `outputs/xps` under --workdir (default: the repository root); a finished XP
is not run again, so re-running only re-reads (and re-scores, cached per XP) the results.
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

from demucs_lora.core.files import atomic_write, atomic_write_text

from . import common
from .common import ROOT

NAME = "quality"
PROTOCOL = "lr-sweep, equal steps, valid-selected, test-scored, data-size curve"
BASE = ROOT / "demucs_lora" / "assets" / "base_tiny_A.th"
SOURCES = common.SOURCES
LR_LADDER = ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1")   # a factor ~3 apart
START_LRS = {"full": ("3e-4", "1e-3", "3e-3"), "lora": ("1e-3", "3e-3", "1e-2")}
TRACKS = (2, 4, 8)          # data-size curve; the sweep runs at the largest
DEFAULT_EPOCHS = 8

# Shared by every run. max_batches=3: a 2-track set (8 s tracks, 3 s train examples, hop
# 1 s: 6 examples a track) has 3 batches of 4, so every run at every size takes exactly
# epochs x 3 optimizer steps. Validation after every epoch (test.every=1).
COMMON = ["model=htdemucs_tiny", "dset.synth.domain=B", "dset.synth.valid_tracks=2",
          "dset.synth.test_tracks=4", "dset.synth.seconds=8", "batch_size=4",
          "max_batches=3"]
# Smoke: a tiny dataset, 1 epoch of 1 batch; the sweep and the curve shrunk (SMOKE_PLAN).
SMOKE = ["model=htdemucs_tiny", "dset.synth.domain=B", "dset.synth.valid_tracks=1",
         "dset.synth.test_tracks=1", "dset.synth.seconds=3", "dset.segment=1",
         "batch_size=2", "max_batches=1", "test.initial=true",
         "htdemucs.lora_gradient_batches=2"]
SMOKE_PLAN = {"methods": ("full", "uniform_r4"), "lrs": {"full": ("1e-3",)},
              "tracks": (1, 2), "epochs": 1, "max_extend": 0}


class Method(tp.NamedTuple):
    key: str
    label: str
    mode: str          # full | uniform | heuristic | gradient
    rank: int
    args: tp.Tuple[str, ...]


def _lora(key: str, label: str, mode: str, rank: int, *extra: str) -> Method:
    return Method(key, label, mode, rank, (f"htdemucs.lora_rank={rank}",
                                           f"htdemucs.lora_rank_mode={mode}", *extra))


METHODS: tp.Dict[str, Method] = {m.key: m for m in [
    Method("full", "full FT", "full", 0, ("htdemucs.lora_rank=0",)),
    _lora("uniform_r4", "uniform r=4", "uniform", 4),
    _lora("uniform_r8", "uniform r=8", "uniform", 8),
    _lora("uniform_r16", "uniform r=16", "uniform", 16),
    _lora("heuristic_r8_bm", "heuristic r=8 budget-matched", "heuristic", 8,
          "htdemucs.lora_budget_match=true"),
    _lora("gradient_r8", "gradient r=8", "gradient", 8),
]}


class Run(tp.NamedTuple):
    method: Method
    lr: str
    tracks: int

    @property
    def key(self) -> str:
        return f"{self.method.key}@lr={self.lr},tracks={self.tracks}"


# ----------------------------------------------------------------------------- sweep logic
def start_lrs(method: Method, override: tp.Optional[tp.Mapping[str, tp.Sequence[str]]] = None
              ) -> tp.List[str]:
    if override and method.key in override:
        return list(override[method.key])
    return list(START_LRS["full" if method.mode == "full" else "lora"])


def next_lr(tried: tp.Sequence[str], scores: tp.Mapping[str, float]) -> tp.Optional[str]:
    """The ladder value beyond the best lr when the best is at an edge of `tried`, else
    None (best inside, or the ladder ends, or nothing scored)."""
    valid = {lr: s for lr, s in scores.items() if lr in tried and s is not None
             and math.isfinite(s)}
    if len(valid) < 2:
        return None
    ordered = sorted(tried, key=float)
    best = max(valid, key=valid.get)
    index = LR_LADDER.index(best) if best in LR_LADDER else None
    if index is None:
        return None
    if best == ordered[0] and index > 0:
        return LR_LADDER[index - 1]
    if best == ordered[-1] and index + 1 < len(LR_LADDER):
        return LR_LADDER[index + 1]
    return None


def best_lr(scores: tp.Mapping[str, float]) -> tp.Tuple[tp.Optional[str], bool]:
    """(lr with the best valid score, whether it is at an edge of the lrs tried)."""
    valid = {lr: s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not valid:
        return None, True
    best = max(valid, key=valid.get)
    ordered = sorted(scores, key=float)
    return best, len(ordered) < 3 or best in (ordered[0], ordered[-1])


# ----------------------------------------------------------------------------- XPs
def shared_args(shared: tp.Sequence[str], method_args: tp.Sequence[str]) -> tp.List[str]:
    """The shared overrides a method's run takes: a full fine-tune (lora_rank=0) drops the
    LoRA-only keys (htdemucs.lora_*), which a run refuses without a rank."""
    if "htdemucs.lora_rank=0" not in method_args:
        return list(shared)
    return [a for a in shared if not a.startswith("htdemucs.lora_")]


def overrides(run: Run, base: str, epochs: int, smoke: bool) -> tp.List[str]:
    shared = shared_args(SMOKE if smoke else COMMON, run.method.args)
    return [f"continue_from={base}", *shared, f"dset.synth.tracks={run.tracks}",
            f"epochs={epochs}", *run.method.args, f"optim.lr={run.lr}"]


def read_history(folder: Path) -> tp.List[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def dora_run(args: tp.Sequence[str], workdir: Path, log: Path) -> tp.Tuple[int, float]:
    """`dora run ARGS` in workdir, its output appended to `log`: (exit status, seconds)."""
    from demucs_lora.training.dora_run import run_dora
    print("$ (cd " + str(workdir) + ") dora run " + " ".join(args), flush=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        proc = run_dora(["run", *args], workdir, stdout=handle, stderr=subprocess.STDOUT)
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


def finished(history: tp.List[dict], epochs: int) -> bool:
    return len(history) >= epochs


def diverged(folder: Path) -> bool:
    """True when the XP stopped on TrainingDiverged (its train.log says so): an outcome of
    its lr, not a failure, and running the same XP again diverges again."""
    from demucs_lora.core.errors import TrainingDiverged
    path = folder / "train.log"   # the error line reads "TrainingDiverged: <message>"
    return path.exists() and f"{TrainingDiverged.__name__}:" in path.read_text(errors="replace")


def _nsdr(summary: tp.Mapping[str, float], sources: tp.Sequence[str] = tuple(SOURCES)
          ) -> tp.Dict[str, float]:
    out = {s: summary.get(f"nsdr_{s}", float("nan")) for s in sources}
    out["mean"] = summary.get("nsdr", float("nan"))
    return out


def test_scores(model_path: Path, data_args: tp.Sequence[str], workdir: Path,
                cache: tp.Optional[Path] = None) -> tp.Dict[str, float]:
    """nSDR per source and mean of a model file on the test split of the run's data
    (demucs_lora.inference.evaluation, as `tools.test_pretrained --split test` computes it)."""
    if cache is not None and cache.exists() and \
            cache.stat().st_mtime >= model_path.stat().st_mtime:
        return json.loads(cache.read_text())
    from demucs_lora.config.compose import compose
    from demucs_lora.config.run_config import data_config
    from demucs_lora.inference.evaluation import build_dataset, evaluate_model
    from demucs_lora.models.load import load_model
    cwd = Path.cwd()
    os.chdir(workdir)   # dset.metadata (./metadata) is relative to where dora ran
    try:
        cfg = compose([a for a in data_args if not a.startswith("continue_from=")])
        model = load_model(model_path)
        dataset = build_dataset(data_config(cfg, model.sources), "test", model.samplerate,
                                model.audio_channels, progress=False)
        scores = _nsdr(evaluate_model(model, dataset, metrics=("nsdr",), progress=False,
                                      split=bool(cfg.test.split),
                                      overlap=float(cfg.test.overlap))["summary"],
                       list(model.sources))
    finally:
        os.chdir(cwd)
    if cache is not None:
        atomic_write_text(cache, json.dumps(scores))
    return scores


def summarize(run: Run, folder: Path) -> dict:
    """Valid gains, params, epochs, steps and train time of one XP (from its folder)."""
    history = read_history(folder)
    trainable, total = trainable_from_log(folder)
    ranks = read_ranks(folder) if run.method.mode != "full" else None
    lora_params = sum(row["trainable"] for row in ranks["layers"]) if ranks else None
    nan = float("nan")
    out = {"method": run.method.key, "label": run.method.label, "mode": run.method.mode,
           "rank": run.method.rank, "lr": run.lr, "tracks": run.tracks, "xp": folder.name,
           "trainable_total": trainable, "model_params": total, "lora_params": lora_params,
           "params": lora_params if run.method.mode != "full" else trainable,
           "epochs": len(history),
           "steps": sum(h.get("train_batches", 0) for h in history) or None,
           "train_seconds": sum(h.get("train_seconds", 0.0) for h in history)}
    first = history[0] if history else {}
    initial = {s: first.get(f"valid_initial_nsdr_{s}") for s in SOURCES}
    initial["mean"] = first.get("valid_initial_nsdr")
    scored = [h for h in history if h.get("valid_nsdr") is not None]
    out.update(valid_initial=initial, valid_best={}, valid_gain=nan, best_epoch=None,
               curve=[])
    if scored and initial["mean"] is not None:
        best = max(scored, key=lambda h: h["valid_nsdr"])
        out.update(valid_best={**{s: best.get(f"valid_nsdr_{s}", nan) for s in SOURCES},
                               "mean": best["valid_nsdr"]},
                   valid_gain=best["valid_nsdr"] - initial["mean"], best_epoch=best["epoch"],
                   curve=[{"epoch": h["epoch"], "valid_nsdr": h["valid_nsdr"]}
                          for h in scored])
    if ranks:
        out["ranks"] = [{"layer": row["layer"], "rank": row["rank"]} for row in ranks["layers"]]
    return out


# ----------------------------------------------------------------------------- targets
def ratio(a: float, b: float) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return float("nan")
    return a / b


def targets(best: tp.Mapping[str, dict]) -> tp.List[dict]:
    """On the test gains at each method's best lr (present methods only)."""
    rows = []
    if "full" in best and "uniform_r8" in best:
        rows.append(common.target_row("uniform r=8 test gain / full-FT test gain (best lrs)",
                                      ratio(best["uniform_r8"]["test_gain"]["mean"],
                                            best["full"]["test_gain"]["mean"]), 0.90, ">="))
    if "gradient_r8" in best and "uniform_r8" in best:
        rows.append(common.target_row(
            "gradient r=8 test gain - uniform r=8 test gain (dB, best lrs)",
            best["gradient_r8"]["test_gain"]["mean"] - best["uniform_r8"]["test_gain"]["mean"],
            0.0, ">="))
    edges = sum(1 for b in best.values() if b["best_at_edge"])
    rows.append(common.target_row("methods whose best lr is at the edge of its sweep",
                                  edges, 0, "<="))
    return rows


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


def plot_gain_vs_params(results: tp.Dict[str, dict], path: Path, title: str,
                        ylabel: str = "mean nSDR gain on test B (dB)") -> None:
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
    ax.margins(x=0.25, y=0.2)
    _finish(plt, fig, ax, path, title, "trainable parameters (log)", ylabel, legend=bool(seen),
            which="both")


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _method_curves(best: tp.Mapping[str, dict],
                   points: tp.Callable[[dict], tp.Iterable[tp.Tuple[float, float]]],
                   label: tp.Callable[[dict], str], lw: float,
                   circled: tp.Optional[tp.Callable[[dict], tp.Optional[tp.Tuple[float, float]]]]
                   = None):
    """(plt, fig, ax) with one line per method through its finite `points`, and the point
    `circled` gives (the chosen one) circled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in best.values():
        finite = sorted((x, y) for x, y in points(b) if y is not None and math.isfinite(y))
        if not finite:
            continue
        ax.plot(*zip(*finite), marker=MARKERS[b["mode"]], color=_color(b), lw=lw,
                label=label(b))
        mark = circled(b) if circled is not None else None
        if mark is not None:
            ax.scatter([mark[0]], [mark[1]], s=120, facecolors="none", edgecolors=_color(b),
                       zorder=4)
    return plt, fig, ax


def _finish(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str,
            legend: bool, which: str = "major") -> None:
    """Labels, grid, the zero-gain line and the legend; the figure written and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which=which, alpha=0.3)
    ax.axhline(0, color="grey", lw=0.8)
    if legend:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_gain_vs_tracks(best: tp.Mapping[str, dict], path: Path, title: str) -> None:
    plt, fig, ax = _method_curves(
        best, lambda b: [(int(t), g) for t, g in b["curve"].items()],
        lambda b: f"{b['label']} (lr {b['lr']})", lw=1.4)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(t) for b in best.values() for t in b["curve"]})
    ax.set_xticks(ticks or [1])
    ax.set_xticklabels([str(t) for t in ticks] or ["1"])
    _finish(plt, fig, ax, path, title, "training tracks (valid and test tracks fixed)",
            "mean nSDR gain on test B (dB)", legend=bool(best))


def plot_lr_sweep(best: tp.Mapping[str, dict], path: Path, title: str) -> None:
    plt, fig, ax = _method_curves(
        best, lambda b: [(float(lr), s["valid_gain"]) for lr, s in b["sweep"].items()],
        lambda b: b["label"], lw=1.2,
        circled=lambda b: None if b["lr"] is None
        else (float(b["lr"]), b["sweep"][b["lr"]]["valid_gain"]))
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, title, "optim.lr (circle: the best, chosen on valid)",
            "best mean nSDR gain on valid B (dB)", legend=bool(best), which="both")


# ----------------------------------------------------------------------------- main
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v, fmt: str = "{:+.2f}") -> str:
    return fmt.format(v) if _finite(v) else "-"


def format_results(best: tp.Mapping[str, dict], tracks: tp.Sequence[int]) -> str:
    header = ["method", "params", "lrs tried", "best lr", "edge", "valid gain",
              *[f"test {s}" for s in SOURCES], "test mean", *[f"{t} tracks" for t in tracks]]
    rows = []
    for b in best.values():
        g = b["test_gain"]
        rows.append([b["label"], f"{b['params']:,}" if b["params"] else "-",
                     ",".join(sorted(b["sweep"], key=float)), b["lr"] or "-",
                     "yes" if b["best_at_edge"] else "no", _cell(b["valid_gain"]),
                     *[_cell(g.get(s)) for s in SOURCES], _cell(g.get("mean")),
                     *[_cell(b["curve"].get(str(t))) for t in tracks]])
    return common.format_table(header, rows)


def table_lines(r: dict) -> tp.List[str]:
    """README rows of a quality result (the old protocol's JSON is labelled as such)."""
    if r.get("protocol") is None:
        return _old_table_lines(r)
    s = r["settings"]
    tracks = s["tracks"]
    lines = [f"**Quality** (synthetic domain A -> B from the shipped tiny base; every run "
             f"{s['steps']} steps ({s['epochs']} epochs x {s['max_batches']} batches of "
             f"{s['batch_size']}); each method at its best lr of a sweep chosen on the valid "
             f"split ({s['valid_tracks']} tracks), scored on the test split "
             f"({s['test_tracks']} tracks); nSDR gain over the base, dB; sweep at "
             f"{max(tracks)} training tracks)", "",
             "| method | trainable params | lrs tried | best lr | valid gain | " +
             " | ".join(f"test {x}" for x in SOURCES) + " | test mean | " +
             " | ".join(f"{t} tracks" for t in tracks) + " |",
             "|---|---|---|---|---|" + "---|" * (len(SOURCES) + 1 + len(tracks))]
    for b in r["best"].values():
        g = b["test_gain"]
        edge = " (edge)" if b["best_at_edge"] else ""
        lines.append(f"| {b['label']} | {b['params']:,} | "
                     f"{', '.join(sorted(b['sweep'], key=float))} | {b['lr']}{edge} | "
                     f"{_cell(b['valid_gain'])} | " +
                     " | ".join(_cell(g.get(x)) for x in SOURCES) + f" | {_cell(g.get('mean'))} | "
                     + " | ".join(_cell(b["curve"].get(str(t))) for t in tracks) + " |")
    lines += ["", f"Scale of this run: {s['scale']}."]
    for t in r.get("targets", []):
        lines.append(f"- {t['name']}: {_cell(t['value'], '{:.2f}')} (target {t['op']} "
                     f"{t['target']}): **{'PASS' if t['pass'] else 'MISS'}**")
    stem = "../benchmarks/results/" + NAME  # relative to docs/benchmarks.md
    lines.append(f"\n![test gain vs params]({stem}_gain_vs_params.png) "
                 f"![gain vs training tracks]({stem}_gain_vs_tracks.png) "
                 f"![lr sweep]({stem}_lr_sweep.png) ![ranks per layer]({stem}_ranks.png)")
    return lines


def _old_table_lines(r: dict) -> tp.List[str]:
    s = r["settings"]
    gains = next(iter(r["runs"].values()))["gain"]
    lines = ["**Quality, old protocol** (not re-run for this table: equal wall-clock budget "
             f"{s['budget_seconds']:.0f} s each, one lr per method: LoRA {s['lora_lr']}, full "
             f"FT {s['full_lr']}, too low for it; valid split only. `python -m "
             "benchmarks.quality` runs the fair protocol: lr sweeps, equal steps, test split, "
             "data-size curve)", "",
             "| run | trainable params | epochs | " + " | ".join(gains) + " |",
             "|---|---|---|" + "---|" * len(gains)]
    for run in r["runs"].values():
        lines.append(f"| {run['label']} | {run['params']:,} | {run['epochs']} | " +
                     " | ".join(f"{v:+.2f}" for v in run["gain"].values()) + " |")
    lines.append("")
    for t in r.get("targets", []):
        lines.append(f"- {t['name']}: {t['value']:.2f} (target {t['op']} {t['target']}): "
                     f"**{'PASS' if t['pass'] else 'MISS'}**")
    lines.append("\n![gain vs params](../benchmarks/results/quality_gain_vs_params.png) "
                 "![ranks per layer](../benchmarks/results/quality_ranks.png)")
    return lines


def _load() -> tp.Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class Runner:
    """Runs (or re-reads) XPs, scores their best.th on the test split."""

    def __init__(self, base: str, epochs: int, smoke: bool, workdir: Path, log: Path):
        self.base, self.epochs, self.smoke = base, epochs, smoke
        self.workdir, self.log = workdir, log
        self.results: tp.Dict[str, dict] = {}
        self.errors: tp.List[str] = []

    def __call__(self, run: Run) -> dict:
        if run.key in self.results:
            return self.results[run.key]
        from demucs_lora.train import xp_folder_in  # the folder Dora gives these overrides
        xp_args = overrides(run, self.base, self.epochs, self.smoke)
        folder = xp_folder_in(xp_args, self.workdir)
        wall, launched, load = None, False, _load()
        if finished(read_history(folder), self.epochs):
            print(f"{run.key}: XP {folder.name} finished, not run again")
        else:
            launched = True
            rc, wall = dora_run(xp_args, self.workdir, self.log)
            if rc != 0:
                self.errors.append(f"{run.key}: dora run exited {rc} (see {self.log})")
                print(f"{run.key}: FAILED (exit {rc}), see {self.log}", file=sys.stderr)
        result = summarize(run, folder)
        best_th = folder / "best.th"
        result["test"] = test_scores(best_th, xp_args, self.workdir,
                                     folder / "quality_test.json") if best_th.exists() else {}
        result.update(command="dora run " + " ".join(xp_args), launched=launched,
                      wall_seconds=wall,
                      load_avg_1m={"start": load, "end": _load()} if launched else None)
        self.results[run.key] = result
        print(f"{run.key}: XP {folder.name}, {result['epochs']} epochs / {result['steps']} "
              f"steps, {result['train_seconds']:.0f} s train, valid gain "
              f"{_cell(result['valid_gain'], '{:+.3f}')} dB, test "
              f"{_cell(result['test'].get('mean'), '{:.3f}')}", flush=True)
        return result


def sweep(method: Method, runner: Runner, tracks: int, lrs: tp.Sequence[str],
          max_extend: int) -> tp.Tuple[tp.Dict[str, dict], tp.Optional[str], bool]:
    """Run `lrs`, extend past an edge best up to `max_extend` times; (runs, best, at edge)."""
    tried = list(lrs)
    runs = {lr: runner(Run(method, lr, tracks)) for lr in tried}
    for _ in range(max_extend):
        lr = next_lr(tried, {k: v["valid_gain"] for k, v in runs.items()})
        if lr is None:
            break
        print(f"{method.label}: best lr at the edge of {sorted(tried, key=float)}: adding {lr}")
        tried.append(lr)
        runs[lr] = runner(Run(method, lr, tracks))
    best, at_edge = best_lr({k: v["valid_gain"] for k, v in runs.items()})
    return runs, best, at_edge


def _gain(test: tp.Mapping[str, float], base: tp.Mapping[str, float]) -> tp.Dict[str, float]:
    return {k: test.get(k, float("nan")) - base[k] for k in base}


def parse_plan(argv: tp.Optional[tp.Sequence[str]]) -> tp.Tuple[argparse.Namespace, dict]:
    """(the arguments, the plan: methods, lrs, tracks, epochs, max_extend)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CI: full FT (1 lr) and uniform r=4 (3 lrs), 1 step each, "
                             "curve at 1 and 2 tracks")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of every run (default {DEFAULT_EPOCHS})")
    parser.add_argument("--tracks", default=None,
                        help="training-track counts of the data-size curve (default "
                             f"{','.join(map(str, TRACKS))}; the sweep runs at the largest)")
    parser.add_argument("--max-extend", type=int, default=None,
                        help="lr values added past an edge best, per method (default 2)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {common.RESULTS_DIR.relative_to(ROOT)})")
    parser.add_argument("--workdir", default=None,
                        help="cwd of the dora runs: XPs go to WORKDIR/outputs/xps, synthetic "
                        "data to WORKDIR/metadata (default: the repository root)")
    args = parser.parse_args(argv)
    plan = dict(SMOKE_PLAN) if args.smoke else {
        "methods": tuple(METHODS), "lrs": {}, "tracks": TRACKS, "epochs": DEFAULT_EPOCHS,
        "max_extend": 2}
    if args.methods:
        plan["methods"] = tuple(args.methods.split(","))
    unknown = [m for m in plan["methods"] if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.epochs is not None:
        plan["epochs"] = args.epochs
    if args.tracks:
        plan["tracks"] = tuple(sorted(int(t) for t in args.tracks.split(",")))
    if args.max_extend is not None:
        plan["max_extend"] = args.max_extend
    return args, plan


def run_settings(plan: dict, smoke: bool, workdir: Path, base: str) -> dict:
    """What the JSON records of how the benchmark ran (and the one-line scale)."""
    shared = SMOKE if smoke else COMMON
    opt = dict(a.split("=", 1) for a in shared)
    main_tracks = max(plan["tracks"])
    batch, max_batches = int(opt["batch_size"]), int(opt["max_batches"])
    settings = {"smoke": smoke, "workdir": str(workdir), "base": base, "common": shared,
                "methods": list(plan["methods"]), "epochs": plan["epochs"],
                "max_batches": max_batches, "batch_size": batch,
                "steps": plan["epochs"] * max_batches, "tracks": list(plan["tracks"]),
                "sweep_tracks": main_tracks, "max_extend": plan["max_extend"],
                "valid_tracks": int(opt["dset.synth.valid_tracks"]),
                "test_tracks": int(opt["dset.synth.test_tracks"]),
                "lr_ladder": list(LR_LADDER), "start_lrs": START_LRS,
                "lrs_override": plan["lrs"]}
    settings["scale"] = (f"{len(plan['methods'])} methods ({', '.join(plan['methods'])}), "
                         f"{settings['steps']} steps per run, lr sweep at {main_tracks} "
                         f"training tracks, curve at {', '.join(map(str, plan['tracks']))} "
                         f"tracks, up to {plan['max_extend']} lr value(s) added past an edge "
                         "per method, one seed")
    return settings


def method_entry(method: Method, runner: Runner, plan: dict,
                 base_test: tp.Mapping[str, float]) -> dict:
    """One method: its lr sweep at the largest size, then its data-size curve at the best lr."""
    main_tracks = max(plan["tracks"])
    runs, lr, at_edge = sweep(method, runner, main_tracks,
                              start_lrs(method, plan["lrs"]), plan["max_extend"])
    chosen = runs.get(lr) if lr else None
    entry = {"method": method.key, "label": method.label, "mode": method.mode,
             "rank": method.rank, "lr": lr, "best_at_edge": at_edge,
             "params": chosen["params"] if chosen else None,
             "valid_gain": chosen["valid_gain"] if chosen else float("nan"),
             "test_gain": _gain(chosen["test"], base_test) if chosen and chosen["test"]
             else {k: float("nan") for k in base_test},
             "sweep": {k: {"valid_gain": v["valid_gain"],
                           "test_gain": _gain(v["test"], base_test)["mean"]
                           if v["test"] else float("nan"), "xp": v["xp"]}
                       for k, v in runs.items()},
             "ranks": chosen.get("ranks") if chosen else None, "curve": {}}
    entry["gain"] = entry["test_gain"]  # what the gain-vs-params figure plots
    for tracks in plan["tracks"]:
        if lr is None:
            break
        run = chosen if tracks == main_tracks else runner(Run(method, lr, tracks))
        entry["curve"][str(tracks)] = _gain(run["test"], base_test)["mean"] \
            if run["test"] else float("nan")
    return entry


def write_figures(best: tp.Mapping[str, dict], settings: dict, out_dir: Path,
                  stem: str) -> tp.List[Path]:
    title = f"domain A -> B, tiny HTDemucs, {settings['steps']} steps per run, best lr each"
    figures = [out_dir / f"{stem}_{n}.png" for n in ("gain_vs_params", "gain_vs_tracks",
                                                      "lr_sweep", "ranks")]
    plot_gain_vs_params(best, figures[0], "mean nSDR gain on test vs trainable params\n" + title)
    plot_gain_vs_tracks(best, figures[1], "data-size curve (each method at its best lr)")
    plot_lr_sweep(best, figures[2], f"lr sweep at {settings['sweep_tracks']} tracks (valid split)")
    plot_ranks({k: b for k, b in best.items() if b.get("ranks")}, figures[3],
               "per-layer LoRA ranks by mode")
    return figures


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args, plan = parse_plan(argv)
    common.passive_omp()
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT
    workdir.mkdir(parents=True, exist_ok=True)
    base = str(BASE.relative_to(ROOT)) if workdir == ROOT else str(BASE)
    out_dir = common.results_dir(args).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = NAME + ("_smoke" if args.smoke else "")
    log = workdir / "outputs" / f"{stem}_dora.log"  # the runs' output (git-ignored there)
    log.parent.mkdir(parents=True, exist_ok=True)
    settings = run_settings(plan, args.smoke, workdir, base)
    machine = common.describe_machine("cpu")
    print(common.header("Adaptation quality (domain A -> B): " + PROTOCOL, machine,
                        {"scale": settings["scale"], "workdir": workdir}), flush=True)
    runner = Runner(base, plan["epochs"], args.smoke, workdir, log)
    any_run = overrides(Run(METHODS[plan["methods"][0]], "1e-3", max(plan["tracks"])), base,
                        plan["epochs"], args.smoke)
    base_test = test_scores(BASE, any_run, workdir)   # the same test tracks at every size
    best = {key: method_entry(METHODS[key], runner, plan, base_test)
            for key in plan["methods"]}
    steps = sorted({r["steps"] for r in runner.results.values() if r["steps"]})
    target_rows = targets(best)
    data = {"benchmark": NAME, "protocol": PROTOCOL, "machine": machine, "settings": settings,
            "base_test": base_test, "best": best, "runs": runner.results,
            "equal_steps": {"steps": steps, "equal": len(steps) == 1},
            "targets": target_rows, "errors": runner.errors}
    path = common.write_result(NAME, data, argparse.Namespace(smoke=args.smoke,
                                                              out=str(out_dir)))
    figures = write_figures(best, settings, out_dir, stem)
    print()
    print(format_results(best, plan["tracks"]))
    print(f"equal steps: every run took {steps} optimizer steps")
    if target_rows:
        print("targets:")
        print(common.format_targets(target_rows))
    print(f"wrote {path}, " + ", ".join(f.name for f in figures))
    if runner.errors:
        print("errors: " + "; ".join(runner.errors), file=sys.stderr)
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
