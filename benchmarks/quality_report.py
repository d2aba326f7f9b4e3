"""docs/quality.md's tables and the gain-vs-steps figure, generated from the results JSON.

`write_docs()` replaces the text between each pair of markers of docs/quality.md with the
table of its JSON file in benchmarks/results: `quality_protocol.json` (the protocol on the
mid-size base, benchmarks/quality_protocol.py) and `quality.json` (the tiny-base protocol,
benchmarks/quality.py), and the mid-size base's pre-training curve
(demucs_lora/assets/base_medium_A.json). tests/test_quality_docs.py checks that the
committed docs match.
"""
from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

from demucs_lora.core.files import atomic_write, atomic_write_text

from .common import RESULTS_DIR, ROOT

DOCS = ROOT / "docs" / "quality.md"
BASE_RECIPE = ROOT / "demucs_lora" / "assets" / "base_medium_A.json"
SECTIONS = {"base-medium": "base_medium_A.json", "quality-protocol": "quality_protocol.json",
            "quality-tiny": "quality.json"}


def _cell(value: float, fmt: str = "{:+.2f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) \
        else "-"


def _gain(m: dict) -> str:
    g = m["test_gain"]
    ci = f" ± {g['ci']:.2f}" if math.isfinite(g.get("ci", math.nan)) else ""
    edge = ", edge" if m["best_at_edge"] else ""
    return f"{_cell(g['mean'])}{ci} ({g['n']} seeds, lr {m['lr']}{edge})"


def _steps(m: dict, uniform: tp.Optional[dict]) -> str:
    from .quality_stats import steps_to
    if not uniform or not uniform["valid_curve"] or not m["valid_curve"]:
        return "-"
    per = uniform["steps"] // max(1, len(uniform["valid_curve"]))
    need = steps_to(m["valid_curve"], uniform["valid_curve"][-1], per)
    return f"{need} / {m['steps']}" if need else f"> {m['steps']}"


def protocol_lines(data: tp.Optional[dict]) -> tp.List[str]:
    """The protocol's table: method, params (% of model), gain ± CI per task, steps."""
    if not data or not data.get("runs"):
        return ["_Not measured yet: the protocol has not been run on the mid-size base "
                "(command and cost above)._"]
    if "tasks" not in data:
        return partial_lines(data)
    s = data["settings"]
    tasks = list(data["tasks"])
    lines = [f"Base {s['base']}; {s['steps']} steps per run; test gain over the starting "
             f"model, dB, mean ± 95 % CI over the seeds at the best lr (valid-selected); "
             "steps to target: steps to reach uniform's final valid gain / steps per run.",
             "", "| method | trainable params | " +
             " | ".join(f"{t}: test gain" for t in tasks) + " | " +
             " | ".join(f"{t}: steps to target" for t in tasks) + " |",
             "|---|---|" + "---|" * (2 * len(tasks))]
    first = data["tasks"][tasks[0]]
    for key, m in first.items():
        share = f" ({100 * m['params'] / m['model_params']:.1f} %)" \
            if m["params"] and m["model_params"] else ""
        cells = [_gain(data["tasks"][t][key]) for t in tasks if key in data["tasks"][t]]
        steps = [_steps(data["tasks"][t][key], data["tasks"][t].get("uniform"))
                 for t in tasks if key in data["tasks"][t]]
        lines.append(f"| {m['label']} | {m['params']:,}{share} | " + " | ".join(cells) +
                     " | " + " | ".join(steps) + " |")
    lines += sweep_lines(data)
    lines.append("")
    for v in data.get("verdicts", []):
        # a figure, not a target: -inf in memory, null once written to JSON
        no_target = v["target"] is None or not math.isfinite(v["target"])
        value = _cell(v["value"], "{:+.3f}" if no_target else "{:.3f}")
        if no_target:
            lines.append(f"- {v['name']}: {value} ({v['note'] or 'reported, no target'})")
            continue
        lines.append(f"- {v['name']}: {value} (target {v['op']} {v['target']}) "
                     f"**{'PASS' if v['pass'] else 'MISS'}** {v['note']}")
    lines += recommendation_lines(data)
    stem = "../benchmarks/results/" + ("quality_protocol_smoke" if s["smoke"] else
                                       "quality_protocol")
    lines.append(f"\n![valid gain vs steps]({stem}_gain_vs_steps.png)")
    return lines


def sweep_lines(data: dict) -> tp.List[str]:
    """Each method's lr sweep per task (valid gain of the seed-0 run; the chosen lr in
    bold, a diverged run named as such): shows that no best lr sits at an edge."""
    tasks = list(data["tasks"])
    lines = ["", "The lr sweeps (valid gain of seed 0, dB; the best lr in bold):", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for key, m in data["tasks"][tasks[0]].items():
        cells = []
        for t in tasks:
            tm = data["tasks"][t].get(key)
            if tm is None:
                cells.append("-")
                continue
            parts = []
            for lr, gain in tm["sweep"].items():
                value = "diverged" if lr in tm.get("diverged_lrs", ()) else _cell(gain)
                parts.append(f"**{lr}: {value}**" if lr == tm["lr"] else f"{lr}: {value}")
            cells.append(", ".join(parts))
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return lines


def recommendation_lines(data: dict) -> tp.List[str]:
    """What the protocol recommends: the methods that earned a place, or uniform."""
    if "earned" not in data:
        return []
    first = next(iter(data["tasks"].values()))
    names = [first[k]["label"] if k in first else k for k in data["earned"]]
    from demucs_lora.grids.methods import method
    from demucs_lora.grids.rank_modes import GRID_METHODS
    extra = [method(k).label for k in GRID_METHODS
             if k not in ("full", "uniform", *data["earned"])]
    beside = f"; {' and '.join(extra)} run beside them as the user guide's sweep promises, " \
        "not as a recommendation" if extra else ""
    if names:
        return ["", f"**Earned a place** (at least +0.2 dB over uniform with a 95 % CI above 0, "
                f"on every task): {', '.join(names)}. `dora grid rank_modes` sweeps them, "
                f"uniform r=4/8/16 and full fine-tuning{beside}."]
    return ["", "**No method beat uniform beyond noise on every task** (at least +0.2 dB "
            "with a 95 % CI above 0; the numbers are above): uniform is the recommendation. "
            f"`dora grid rank_modes` sweeps uniform r=4/8/16 and full fine-tuning{beside}."]


def interim_lines(runs: tp.Sequence[dict]) -> tp.List[str]:
    """Per task and method so far: the best lr of its seed-0 sweep (valid split) and the
    test gain over the seeds run there, mean ± 95 % CI."""
    from .quality import best_lr
    from .quality_stats import mean_ci
    groups: tp.Dict[tp.Tuple[str, str], tp.List[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    lines = ["| task | method | sweep (valid gain at seed 0) | best lr | test gain at the best "
             "lr |", "|---|---|---|---|---|"]
    for (task, method), rs in groups.items():
        sweep = {r["lr"]: r["valid_gain"] for r in rs if r["seed"] == 0}
        best, at_edge = best_lr(sweep)
        gains = [r["test_gain"] for r in rs if r["lr"] == best]
        g = mean_ci(gains)
        ci = f" ± {g['ci']:.2f}" if math.isfinite(g["ci"]) else ""
        edge = " (edge: sweep goes on)" if at_edge else ""
        lines.append(f"| {task} | {method} | " + ", ".join(
            f"{lr}: {_cell(v)}" for lr, v in sorted(sweep.items(), key=lambda kv: float(kv[0])))
            + f" | {best}{edge} | {_cell(g['mean'])}{ci} ({g['n']} seed{'s' * (g['n'] != 1)}) |")
    return lines


def partial_lines(data: dict) -> tp.List[str]:
    """The runs finished so far, while the protocol is still under way (no verdicts yet)."""
    runs = sorted(data["runs"].values(), key=lambda r: (r["task"], r["method"], float(r["lr"]),
                                                         r["seed"]))
    lines = [f"_In progress: {len(runs)} runs finished; the verdicts appear once every run "
             "of the plan has finished (the command above goes on where it stopped)._", "",
             *interim_lines(runs), "", "Every run so far:", "",
             "| task | method | lr | seed | trainable params | valid gain | test gain | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['task']} | {r['method']} | {r['lr']} | {r['seed']} | "
                     f"{r['params']:,} | {_cell(r['valid_gain'])} | {_cell(r['test_gain'])} | "
                     f"{r['train_seconds']:.0f} |")
    return lines


def tiny_lines(data: tp.Optional[dict]) -> tp.List[str]:
    """The tiny-base protocol's table (benchmarks/quality.py), links made docs-relative."""
    if not data:
        return ["_No tiny-base results (python -m benchmarks.quality)._"]
    from .quality import table_lines
    return [line.replace("](benchmarks/", "](../benchmarks/") for line in table_lines(data)]


def _shipped(recipe: dict) -> str:
    """Which chunk's model the asset is, once the pre-training converged."""
    asset = recipe.get("asset")
    if not asset:
        return ""
    return (f" The shipped file is chunk {asset['chunk']}'s model (XP {asset['xp']}, valid "
            f"nSDR {asset['valid_nsdr']:.3f}), the best chunk.")


def base_lines(recipe: tp.Optional[dict]) -> tp.List[str]:
    """The mid-size base's pre-training so far: the valid nSDR curve, chunk by chunk."""
    if not recipe:
        return ["_Not trained yet: `make base-medium`._"]
    lines = [f"Status: **{recipe['status']}** after {recipe['epochs']} epochs "
             f"({len(recipe['chunks'])} chunks of {recipe['chunk_epochs']}), "
             f"{recipe['train_hours']} h of training ({recipe['wall_hours']} h wall); "
             f"{recipe['params']:,} parameters, stored {recipe['stored']}. Valid nSDR "
             f"(dB, 4 stems, domain A) before training: "
             f"{_cell(recipe.get('valid_initial_nsdr'), '{:.3f}')}; best "
             f"{recipe['best_valid_nsdr']:.3f}." + _shipped(recipe), "",
             "| chunk | XP | seed | valid nSDR after each epoch | best | train s |",
             "|---|---|---|---|---|---|"]
    for c in recipe["chunks"]:
        lines.append(f"| {c['chunk']} | {c['xp']} | {c['chunk']} | "
                     f"{', '.join(f'{v:.3f}' for v in c['valid_nsdr'])} | "
                     f"{c['best_valid_nsdr']:.3f} | {c['train_seconds']:.0f} |")
    return lines


MAKERS = {"base-medium": base_lines, "quality-protocol": protocol_lines,
          "quality-tiny": tiny_lines}


def render(text: str, results: tp.Mapping[str, tp.Optional[dict]]) -> str:
    """`text` with each marked section replaced by its generated lines."""
    from tools.gen_docs import replace_block
    for section, name in SECTIONS.items():
        new = replace_block(text, section, "\n".join(MAKERS[section](results.get(name))))
        text = text if new is None else new
    return text


def load(results_dir: Path = RESULTS_DIR, recipe: Path = BASE_RECIPE
         ) -> tp.Dict[str, tp.Optional[dict]]:
    out = {}
    for name in SECTIONS.values():
        path = recipe if name == recipe.name else results_dir / name
        out[name] = json.loads(path.read_text()) if path.exists() else None
    return out


def write_docs(path: Path = DOCS, results_dir: Path = RESULTS_DIR) -> Path:
    text = path.read_text()
    new = render(text, load(results_dir))
    if new != text:
        atomic_write_text(path, new)
    return path


def write_figure(tasks: tp.Mapping[str, tp.Mapping[str, dict]], path: Path) -> Path:
    """Seed-mean valid gain against optimizer steps, one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4.2),
                             squeeze=False)
    for ax, (task, methods) in zip(axes[0], tasks.items()):
        for i, m in enumerate(methods.values()):
            curve = m["valid_curve"]
            if not curve or not m["steps"]:
                continue
            per = m["steps"] / len(curve)
            style = {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--", "lw": 1.2}
            if m["method"] == "uniform":      # the reference every method is judged by
                style = {"color": "k", "ls": "-", "lw": 2.4}
            elif m["method"] == "full":
                style = {"color": "0.45", "ls": ":", "lw": 2.0}
            ax.plot([per * (j + 1) for j in range(len(curve))], curve, marker="o", ms=3,
                    label=m["label"], **style)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("valid gain (dB, mean over seeds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
