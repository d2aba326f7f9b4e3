"""Run every benchmark, then regenerate the results table of the README.

    python -m benchmarks.run_all [--smoke] [--device cpu|cuda] [--only train_step,size]
    python -m benchmarks.run_all --table-only      # rebuild the table from results/*.json

Each benchmark runs in a fresh process and writes benchmarks/results/NAME.json; the table
goes to benchmarks/results/README_table.md and replaces the block between
`<!-- bench:start -->` and `<!-- bench:end -->` in README.md (when both markers exist).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("train_step", "inference", "size", "data_loading", "quality")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run_benchmark(name: str, extra: tp.Sequence[str]) -> int:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def load_results(folder: Path, smoke: bool = False) -> tp.Dict[str, dict]:
    out = {}
    for name in BENCHMARKS:
        path = folder / f"{name}{'_smoke' if smoke else ''}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _x(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _verdicts(result: dict) -> tp.Dict[str, str]:
    return {t["name"]: ("PASS" if t["pass"] else "MISS") for t in result.get("targets", [])}


def _target_cell(result: dict, *names: str) -> str:
    rows = [t for t in result.get("targets", []) if t["name"] in names]
    return "; ".join(f"{t['op']} {t['target']}: **{'PASS' if t['pass'] else 'MISS'}**"
                     for t in rows)


def _train_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    lines = [f"**Train step** ({s['model']}, batch {s['batch']} x {s['segment_s']} s, "
             f"median of {s['rounds']} interleaved rounds; ratios vs full fine-tune)", "",
             f"| configuration | trainable params | step time ({s.get('time_metric', 'wall')}) | "
             "step time (wall) | peak memory | targets (time; memory) |",
             "|---|---|---|---|---|---|"]
    targets = {"heuristic": ("heuristic step time vs full FT", "heuristic peak memory vs full FT"),
               "heuristic_ckpt": ("heuristic+checkpointing peak memory vs full FT",),
               "uniform": ("uniform step time vs full FT", "uniform peak memory vs full FT"),
               "ours_peft_set": ("ours / PEFT step time, same layers",)}
    for name, c in r["configs"].items():
        params = "-" if c["trainable"] is None else \
            f"{c['trainable'] / 1e6:.2f}M ({c['trainable_pct']:.1f}%)"
        lines.append(f"| {c['label']} | {params} | {_x(c['time_ratio'])} | "
                     f"{_x(c.get('wall_ratio'))} | {_x(c['mem_ratio'])} | "
                     f"{_target_cell(r, *targets.get(name, ()))} |")
    lines.append("")
    lines.append(f"Our LoRA vs PEFT on the same layers: step time {_x(r['ours_vs_peft_time'], 3)},"
                 f" peak memory {_x(r['ours_vs_peft_mem'], 3)}.")
    if s.get("note"):
        lines.append(f"Note: {s['note']}.")
    if s.get("time_metric") == "cpu":
        lines.append("Step time (cpu): process CPU time of a single-threaded step, robust to "
                     "other jobs on a shared machine; wall-clock ratios alongside.")
    return lines


def _inference_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    lines = [f"**Inference** ({s['model']}, {s['seconds']} s of audio, eval + no_grad, "
             f"median of {s['rounds']} rounds; ratios vs base)", "",
             "| configuration | time | target |", "|---|---|---|"]
    cells = {"merged": _target_cell(r, "merged time vs base (1.00x within noise)"),
             "unmerged": _target_cell(r, "unmerged (uniform) time vs base")}
    for name, c in r["configs"].items():
        lines.append(f"| {c['label']} | {_x(c['time_ratio'], 3)} | {cells.get(name, '')} |")
    e = r["exactness"]
    lines += ["", f"Merged vs unmerged output: max abs diff {e['max_abs_diff_merged_vs_unmerged']:.2g}"
              f" ({e['relative_diff']:.2g} of the output peak; "
              f"{_target_cell(r, 'merged vs unmerged max abs diff (relative)')})."]
    return lines


def _size_table(r: dict) -> tp.List[str]:
    base = r["base"]
    lines = [f"**Adapter size** (vs the float32 demucs checkpoint, {base['bytes'] / 2**20:.1f} MB,"
             f" {base['params'] / 1e6:.1f}M params)", "",
             "| adapter | params | size | % of base | target |", "|---|---|---|---|---|"]
    for name, c in r["configs"].items():
        cell = _target_cell(r, "adapter / base bytes at r=8 uniform (%)") \
            if name == "uniform_r8" else ""
        lines.append(f"| {c['mode']} r={c['rank']} | {c['params'] / 1e6:.3f}M | "
                     f"{c['bytes'] / 2**20:.2f} MB | {c['percent']:.2f}% | {cell} |")
    return lines


def _data_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    return [f"**Data loading** (synthetic stems, batch {s['batch']} x {s['segment_s']} s, "
            f"num_workers {s['num_workers']}; consumer: {s['consumer']})", "",
            "| train DataLoader + augment | train steps | ratio | target |", "|---|---|---|---|",
            f"| {r['loader_batches_per_s']:.1f} batches/s | {r['train_steps_per_s']:.2f} steps/s | "
            f"{r['ratio']:.0f}x | {_target_cell(r, *_verdicts(r))} |"]


def _quality_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    lines = [f"**Quality** (synthetic domain A -> B from the shipped base, equal training "
             f"budget {s['budget_seconds']:.0f} s each; LoRA lr {s['lora_lr']}, full FT lr "
             f"{s['full_lr']}; nSDR gain on valid B, dB)", "",
             "| run | trainable params | epochs | " + " | ".join(
                 k for k in next(iter(r["runs"].values()))["gain"]) + " |",
             "|---|---|---|" + "---|" * len(next(iter(r["runs"].values()))["gain"])]
    for run in r["runs"].values():
        lines.append(f"| {run['label']} | {run['params']:,} | {run['epochs']} | " +
                     " | ".join(f"{v:+.2f}" for v in run["gain"].values()) + " |")
    lines.append("")
    for t in r.get("targets", []):
        lines.append(f"- {t['name']}: {t['value']:.2f} (target {t['op']} {t['target']}): "
                     f"**{'PASS' if t['pass'] else 'MISS'}**")
    lines.append("\n![gain vs params](benchmarks/results/quality_gain_vs_params.png) "
                 "![ranks per layer](benchmarks/results/quality_ranks.png)")
    return lines


def make_table(results: tp.Mapping[str, dict]) -> str:
    """Markdown of all results (whatever subset exists)."""
    if not results:
        return "_No benchmark results yet: run `python -m benchmarks.run_all`._\n"
    machine = next(iter(results.values()))["machine"]
    from .common import format_machine
    lines = [f"Measured on {format_machine(machine)}; `python -m benchmarks.run_all` "
             "regenerates this table (raw numbers in benchmarks/results/*.json).", ""]
    for name, fn in (("train_step", _train_table), ("inference", _inference_table),
                     ("size", _size_table), ("data_loading", _data_table),
                     ("quality", _quality_table)):
        if name in results:
            lines += fn(results[name]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path: tp.Union[str, Path], table: tp.Optional[str] = None) -> bool:
    """Replace the text between the bench markers of `path` with `table` (default: the
    table of benchmarks/results). Returns False (and changes nothing) when the file or
    either marker is missing, or the markers are out of order."""
    path = Path(path)
    if table is None:
        table = make_table(load_results(RESULTS_DIR))
    if not path.exists():
        return False
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[:start + len(START)] + "\n" + table.rstrip() + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run all benchmarks, then the README table")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default=None, help="comma-separated subset of " +
                        ",".join(BENCHMARKS))
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--table-only", action="store_true",
                        help="do not run anything, rebuild the table from the JSON files")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    folder = Path(args.out) if args.out else RESULTS_DIR
    failed = []
    if not args.table_only:
        extra = ["--device", args.device] + (["--smoke"] if args.smoke else []) + \
            (["--out", str(folder)] if args.out else [])
        for name in names:
            if run_benchmark(name, extra if name not in ("size", "data_loading", "quality")
                             else [e for e in extra if e not in ("--device", args.device)]):
                failed.append(name)
    table = make_table(load_results(folder, smoke=args.smoke))
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / f"README_table{'_smoke' if args.smoke else ''}.md"
    table_path.write_text(table)
    print(f"\n{table}\nwrote {table_path}")
    if not args.smoke and folder == RESULTS_DIR:
        print(("updated " if update_readme(args.readme, table) else
               "README markers not found, README unchanged: ") + args.readme)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
