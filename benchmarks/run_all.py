"""Run every benchmark, then regenerate the results table of docs/benchmarks.md.

    python -m benchmarks.run_all [--smoke] [--only train_step,size]   # the CPU suite
    python -m benchmarks.run_all --device cuda [--smoke]   # the CUDA suite (make bench-gpu)
    python -m benchmarks.run_all --table-only      # rebuild the table from results/*.json

Each benchmark runs in a fresh process and writes benchmarks/results/NAME.json; the table
goes to benchmarks/results/README_table.md and replaces the block between
`<!-- bench:start -->` and `<!-- bench:end -->` in docs/benchmarks.md (when both markers exist).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import typing as tp
from pathlib import Path

from demucs_lora.core.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("train_step", "inference", "size", "data_loading", "quality")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GPU_COMMAND = "python -m benchmarks.run_all --device cuda"  # or `make bench-gpu`


CUDA_BENCHMARKS = ("train_step", "inference")   # what the CUDA suite measures
DEVICE_INDEPENDENT = ("size", "data_loading", "quality")
# Run by hand (heavy or needing extras), shown in the table when their JSON exists:
# `python -m benchmarks.accumulate` (peak memory of optim.accumulate, released architecture)
# and `python -m benchmarks.onnx_runtime` (onnxruntime vs PyTorch, docs/publishing.md).
TABLE_ONLY = {"accumulate": "Gradient accumulation (`python -m benchmarks.accumulate`)",
              "onnx_runtime": "ONNX export (`python -m benchmarks.onnx_runtime`)"}


def run_benchmark(name: str, extra: tp.Sequence[str]) -> int:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def load_results(folder: Path, smoke: bool = False) -> tp.Dict[str, dict]:
    """{NAME: result} of the CPU suite and {NAME_cuda: result} of the CUDA suite."""
    out = {}
    for name in (*BENCHMARKS, *TABLE_ONLY):
        for suite in ("cpu", "cuda"):
            key = f"{name}_cuda" if suite == "cuda" else name
            path = folder / f"{key}{'_smoke' if smoke else ''}.json"
            if path.exists():
                out[key] = json.loads(path.read_text())
    return out


def _x(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}x"


def _verdicts(result: dict) -> tp.Dict[str, str]:
    return {t["name"]: ("PASS" if t["pass"] else "MISS") for t in result.get("targets", [])}


def _target_cell(result: dict, *names: str) -> str:
    rows = [t for t in result.get("targets", []) if t["name"] in names]
    return "; ".join(f"{t['op']} {t['target']}: **{'PASS' if t['pass'] else 'MISS'}**"
                     for t in rows)


def _config_targets(result: dict, config: str, run_index: int) -> str:
    """Targets of `config`, shown on the first run only (the one they are checked on)."""
    if run_index != 0:
        return ""
    rows = [t for t in result.get("targets", []) if t.get("config") == config]
    return "; ".join(f"{t['name'].split(' vs ')[-1] if ' vs ' in t['name'] else t['name']}"
                     f" {t['op']} {t['target']}: **{'PASS' if t['pass'] else 'MISS'}**"
                     for t in rows)


def _params(c: dict) -> str:
    if c.get("trainable") is None:
        return "-"
    return f"{c['trainable'] / 1e6:.2f}M ({c['trainable_pct']:.1f}%)"


def _floor_cells(c: dict) -> tp.Tuple[str, str]:
    if not c.get("floor"):
        return "", ""
    return c["floor"], f"{_x(c.get('floor_time_ratio'))} / {_x(c.get('floor_mem_ratio'))}"


def upsampler_cost(run: dict, metric: str = "cpu") -> tp.Dict[str, dict]:
    """What the `upsampler` group (in the default targets) costs each mode: params, and
    step time / peak memory as ratios to the same mode without it (medians of per-round
    ratios)."""
    from .common import median
    key = "cpu_s_rounds" if metric == "cpu" else "step_s_rounds"
    out = {}
    for mode in ("uniform", "heuristic"):
        a, b = run["configs"].get(f"{mode}_no_upsampler"), run["configs"].get(mode)
        if not a or not b or not a.get(key) or not b.get(key) or not a.get("trainable"):
            continue
        extra = b["trainable"] - a["trainable"]
        out[mode] = {"params": extra, "params_pct": 100.0 * extra / a["trainable"],
                     "time": median([y / x for x, y in zip(a[key], b[key]) if x]),
                     "memory": (b["peak_mem_bytes"] / a["peak_mem_bytes"])
                     if a.get("peak_mem_bytes") and b.get("peak_mem_bytes") else None}
    return out


def _train_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    metric = s.get("time_metric", "wall")
    lines = []
    for i, run in enumerate(r["runs"]):
        lines += [f"**Train step, {run['arch_label']}** ({run['arch']}, {run['precision']}, "
                  f"batch {s['batch']} x {s['segment_s']} s, median of {s['rounds']} "
                  "interleaved rounds; ratios vs full fine-tune, and vs each configuration's "
                  "own floor)", "",
                  f"| configuration | trainable params | step time ({metric}) | "
                  "step time (wall) | peak memory | own floor | vs own floor (time / memory)"
                  " | targets |", "|---|---|---|---|---|---|---|---|"]
        for name, c in run["configs"].items():
            floor, dist = _floor_cells(c)
            lines.append(f"| {c['label']} | {_params(c)} | {_x(c['time_ratio'])} | "
                         f"{_x(c.get('wall_ratio'))} | {_x(c['mem_ratio'])} | {floor} | {dist} "
                         f"| {_config_targets(r, name, i)} |")
        if "peft" in run["configs"]:
            lines += ["", f"Our LoRA vs PEFT on the same layers: step time "
                      f"{_x(run['ours_vs_peft_time'], 3)}, peak memory "
                      f"{_x(run['ours_vs_peft_mem'], 3)}."]
        cost = upsampler_cost(run, metric)
        if cost:
            lines += ["", "What the `upsampler` group costs (" + "; ".join(
                f"{mode}: +{c['params']:,} params (+{c['params_pct']:.1f}%), step time "
                f"{_x(c['time'], 3)}, peak memory {_x(c['memory'], 3)}"
                for mode, c in cost.items()) + "; median of per-round ratios, same run)."]
        lines.append("")
    if s.get("segment_s") != 7.8:
        lines.append(f"Note: segment {s['segment_s']} s instead of the 7.8 s of "
                     "conf/dset/wav.yaml, to keep a run of every configuration short on this "
                     "machine.")
    if metric == "cpu":
        lines.append("Step time (cpu): process CPU time of a single-threaded step, robust to "
                     "other jobs on a shared machine; wall-clock ratios alongside. Peak memory: "
                     "peak RSS of each configuration's own process over its RSS after the "
                     "model is built.")
    return lines


def _cuda_train_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    m = r["machine"]
    gpu = m.get("gpu") or "no GPU (CPU fallback of the smoke run)"
    lines = [f"**GPU train step** ({gpu}; {r['runs'][0]['arch_label']}, batch {s['batch']} "
             f"x {s['segment_s']} s, median of {s['rounds']} interleaved rounds; "
             "torch.cuda.max_memory_allocated)", "",
             "| precision | configuration | trainable params | step s | time x | "
             "max allocated | memory x | vs own floor (time / memory) | SDPA kernel |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        for name, c in run["configs"].items():
            total = c.get("max_allocated_bytes")
            _, dist = _floor_cells(c)
            lines.append(f"| {run['precision']} | {c['label']} | {_params(c)} | "
                         f"{c['step_s']:.3f} | {_x(c['time_ratio'])} | "
                         f"{'-' if not total else f'{total / 2**30:.2f} GiB'} | "
                         f"{_x(c['mem_ratio'])} | {dist} | {', '.join(c.get('sdpa') or [])} |")
    lines.append("")
    for t in r.get("targets", []):
        if t["value"] is None or not math.isfinite(t["value"]):
            lines.append(f"- {t['name']}: not measured (target {t['op']} {t['target']})")
            continue
        lines.append(f"- {t['name']}: {t['value']:.2f} (target {t['op']} {t['target']}): "
                     f"**{'PASS' if t['pass'] else 'MISS'}**")
    if s.get("note"):
        lines.append(f"\nNote: {s['note']}.")
    return lines


def _inference_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    lines = []
    for i, run in enumerate(r["runs"]):
        lines += [f"**Inference, {run['arch_label']}** ({s['seconds']} s of audio, eval + "
                  f"no_grad, median of {s['rounds']} rounds; ratios vs base)", "",
                  "| configuration | time | target |", "|---|---|---|"]
        cells = {"merged": _target_cell(r, "merged time vs base (1.00x within noise)"),
                 "unmerged": _target_cell(r, "unmerged (uniform) time vs base")} \
            if i == 0 else {}
        for name, c in run["configs"].items():
            lines.append(f"| {c['label']} | {_x(c['time_ratio'], 3)} | {cells.get(name, '')} |")
        e = run["exactness"]
        lines += ["", f"Merged vs unmerged output: max abs diff "
                  f"{e['max_abs_diff_merged_vs_unmerged']:.2g} ({e['relative_diff']:.2g} of the "
                  "output peak" + (f"; {_target_cell(r, 'merged vs unmerged max abs diff (relative)')}"
                                   if i == 0 else "") + ").", ""]
    return lines[:-1]


def _size_table(r: dict) -> tp.List[str]:
    lines = []
    for i, run in enumerate(r["runs"]):
        base = run["base"]
        lines += [f"**Adapter size, {run['arch_label']}** (vs the demucs checkpoint: float32 "
                  f"{base['bytes'] / 2**20:.1f} MiB, float16 {base['bytes_float16'] / 2**20:.1f} "
                  "MiB, the format demucs releases; MiB = 2^20 bytes)", "",
                  "| adapter | stored as | params | size | % of float32 base | % of float16 base "
                  "| output error (of peak / of adapter effect) | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, c in run["configs"].items():
            cell = ""
            if i == 0 and name == "uniform_r8":
                cell = _target_cell(r, "adapter / base bytes at r=8 uniform, both float32 (%)")
            elif i == 0 and name == "uniform_r8_float16":
                cell = _target_cell(r, "float16 adapter / float16 base (the released format) "
                                       "at r=8 uniform (%)")
            err = f"{c['error_vs_output_peak']:.1e} / {c['error_vs_adapter_effect']:.1e}" \
                if "max_abs_error" in c else "exact"
            lines.append(f"| {c['mode']} r={c['rank']} | {c['save_dtype']} | "
                         f"{c['params'] / 1e6:.3f}M | {c['bytes'] / 2**20:.2f} MiB | "
                         f"{c['percent']:.2f}% | {c['percent_of_float16_base']:.2f}% | {err} | "
                         f"{cell} |")
        lines.append("")
    return lines[:-1]


def _data_table(r: dict) -> tp.List[str]:
    s = r["settings"]
    return [f"**Data loading** (synthetic stems, batch {s['batch']} x {s['segment_s']} s, "
            f"num_workers {s['num_workers']}; consumer: {s['consumer']})", "",
            "| train DataLoader + augment | train steps | ratio | target |", "|---|---|---|---|",
            f"| {r['loader_batches_per_s']:.1f} batches/s | {r['train_steps_per_s']:.2f} steps/s | "
            f"{r['ratio']:.0f}x | {_target_cell(r, *_verdicts(r))} |"]


def _targets_table(title: str, r: dict) -> tp.List[str]:
    """The measured targets of a benchmark: what, value, target, verdict."""
    rows = [f"| {t['name']} | {t['value']:.3g} | {t['op']} {t['target']:g} | "
            f"{'**PASS**' if t['pass'] else '**MISS**'} |" for t in r.get("targets", [])]
    return [f"**{title}** (settings: {json.dumps(r.get('settings', {}))})", "",
            "| measured | value | target | verdict |", "|---|---|---|---|", *rows]


def _quality_table(r: dict) -> tp.List[str]:
    """A pointer: the quality tables live in docs/quality.md (benchmarks.quality_report)."""
    return ["**Quality**: [quality.md](quality.md) (tables generated from "
            "benchmarks/results/quality*.json by `python -m benchmarks.quality_protocol "
            "--docs`)."]


def make_table(results: tp.Mapping[str, dict]) -> str:
    """Markdown of all results (whatever subset exists)."""
    if not results:
        return "_No benchmark results yet: run `python -m benchmarks.run_all`._\n"
    from .common import format_machine
    cpu = {k: v for k, v in results.items() if not k.endswith("_cuda")}
    lines = []
    if cpu:
        machine = next(iter(cpu.values()))["machine"]
        lines += [f"Measured on {format_machine(machine)}; `python -m benchmarks.run_all` "
                  "regenerates this table (raw numbers in benchmarks/results/*.json).", ""]
    for name, fn in (("train_step", _train_table), ("inference", _inference_table),
                     ("size", _size_table), ("data_loading", _data_table),
                     ("quality", _quality_table)):
        if name in results:
            lines += fn(results[name]) + [""]
    for name, title in TABLE_ONLY.items():
        if name in results:
            lines += _targets_table(title, results[name]) + [""]
    if "train_step_cuda" in results:
        lines += _cuda_train_table(results["train_step_cuda"]) + [""]
    else:
        lines += [f"**GPU train step**: not measured yet (no GPU here). On a CUDA machine, "
                  f"`{GPU_COMMAND}` measures it (batch 4 x 7.8 s, released architecture, "
                  "fp32 / bf16 / fp16 AMP) and adds its rows here.", ""]
    if "inference_cuda" in results:
        lines += _inference_table(results["inference_cuda"]) + [""]
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
    from tools.gen_docs import replace_block
    text = path.read_text()
    new = replace_block(text, "bench", table)
    if new is None:
        return False
    if new != text:
        atomic_write_text(path, new)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run all benchmarks, then the table of docs/benchmarks.md")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the CUDA suite (" + ", ".join(CUDA_BENCHMARKS) + "; "
                             "results NAME_cuda.json); with --smoke and no CUDA device it "
                             "runs on CPU and says so")
    parser.add_argument("--only", default=None, help="comma-separated subset of " +
                        ",".join(BENCHMARKS))
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--table-only", action="store_true",
                        help="do not run anything, rebuild the table from the JSON files")
    parser.add_argument("--doc", "--readme", dest="readme",
                        default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the markdown file whose bench markers get the table")
    args = parser.parse_args(argv)
    default = CUDA_BENCHMARKS if args.device == "cuda" else BENCHMARKS
    names = default if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    if args.device == "cuda":
        skipped = [n for n in names if n not in CUDA_BENCHMARKS]
        if skipped:
            print(f"--device cuda: skipping {skipped} (device-independent or CPU-bound; "
                  "run them without --device cuda)")
        names = tuple(n for n in names if n in CUDA_BENCHMARKS)
    folder = Path(args.out) if args.out else RESULTS_DIR
    failed = []
    if not args.table_only:
        extra = (["--smoke"] if args.smoke else []) + \
            (["--out", str(folder)] if args.out else [])
        for name in names:
            device = [] if name in DEVICE_INDEPENDENT else ["--device", args.device]
            if run_benchmark(name, device + extra):
                failed.append(name)
    table = make_table(load_results(folder, smoke=args.smoke))
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / f"README_table{'_smoke' if args.smoke else ''}.md"
    atomic_write_text(table_path, table)
    print(f"\n{table}\nwrote {table_path}")
    if not args.smoke and folder == RESULTS_DIR:
        print(("updated " if update_readme(args.readme, table) else
               "bench markers not found, unchanged: ") + args.readme)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
