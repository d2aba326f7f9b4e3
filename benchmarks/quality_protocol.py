"""The quality protocol where LoRA is low-rank (issue 19): two tasks, lr sweeps, seeds, CIs.

    python -m benchmarks.quality_protocol                        # the full protocol, resumable
    python -m benchmarks.quality_protocol --jobs 2               # the two tasks side by side
    python -m benchmarks.quality_protocol --tasks four_stem --methods uniform,gora
    python -m benchmarks.quality_protocol --smoke --out TMP --workdir TMP/work   # CI
    python -m benchmarks.quality_protocol --docs                 # docs/quality.md tables

From the mid-size base (`demucs_lora/assets/base_medium_A.th`, `make base-medium`: 4.08 M
parameters, uniform r=8 trains 6.7 % of them), each run adapts to synthetic domain B in one
of two TASKS: the 5-stem layout (kick and hi-hat split out of drums, `variant=five_stem`)
and the 4-stem layout. Every run is a real `dora run`, so an XP that finished is never run
again: stop the protocol at any time and run the same command to go on. The results JSON is
rewritten after every run. Per task and method (METHODS, all LoRA methods at the parameter
budget of uniform r=8, checked to +-5 %):

1. lr sweep at seed 0 from START_LRS on the LR ladder of benchmarks/quality.py, extended past
   an edge best (up to --max-extend values), chosen on the valid split; seed-0 runs already
   finished at other lrs of the ladder join the sweep;
2. the best lr again with seeds 1 .. SEEDS-1 (the seed moves the data order, the adapter
   init and the calibration batches); test gain = test nSDR of the valid-selected best.th
   minus that of the starting model (the base with its remapped heads); mean and 95 % CI
   over the seeds (`quality_stats`);
3. equal steps: every run trains `epochs` x `max_batches` batches;
4. steps to target: the optimizer steps at which the seed-mean valid-gain curve first
   reaches uniform's final (last-epoch) seed-mean valid gain (valid, not test: the test
   split is scored once per run, on best.th).
Verdicts (per task): best allocation/initialisation minus uniform >= +0.2 dB with a CI that
excludes 0; the best initialisation's steps to uniform's final gain <= 0.5 x the run's
steps; uniform / full fine-tuning >= 0.95; the heuristic's cost (a memory choice).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

from demucs_lora.core.files import file_sha256
from demucs_lora.grids.methods import METHODS, method

from . import common, quality
from . import quality_stats as stats
from .common import ROOT
from .quality_report import write_docs, write_figure

NAME = "quality_protocol"
BASE = ROOT / "demucs_lora" / "assets" / "base_medium_A.th"
TASKS = {"five_stem": ("variant=five_stem",), "four_stem": ("dset.synth.domain=B",)}
COMMON = ["model=htdemucs_medium", "dset.synth.tracks=16", "dset.synth.valid_tracks=4",
          "dset.synth.test_tracks=8", "dset.synth.seconds=8", "batch_size=4",
          "max_batches=12", "htdemucs.lora_gradient_batches=8"]
SMOKE = ["model=htdemucs_tiny", "dset.synth.tracks=2", "dset.synth.valid_tracks=1",
         "dset.synth.test_tracks=1", "dset.synth.seconds=3", "dset.segment=1",
         "batch_size=2", "max_batches=1", "htdemucs.lora_gradient_batches=1"]
# Where each sweep starts. LoRA starts at 3e-3, 1e-2, 3e-2: uniform, swept first from 1e-3,
# was best at 1e-2 on both tasks and collapsed at 3e-2 (valid gain at 1e-3 / 3e-3 / 1e-2 /
# 3e-2: five_stem +5.88 / +7.36 / +7.74 / +2.27 dB, four_stem +4.42 / +5.15 / +5.58 / -0.63),
# so starting there saves a run per method; a method best at 3e-3 still extends down. Runs
# already finished at other lrs of the ladder join their method's sweep.
START_LRS = {"full": ("3e-4", "1e-3", "3e-3"), "lora": ("3e-3", "1e-2", "3e-2")}
PLAN = {"tasks": tuple(TASKS), "rank": 8, "epochs": 8, "seeds": 3, "max_extend": 2,
        "methods": METHODS, "start_lrs": START_LRS}
SMOKE_PLAN = {"tasks": tuple(TASKS), "rank": 2, "epochs": 1, "seeds": 2, "max_extend": 0,
              "methods": ("uniform", "gora"), "lrs": ("3e-3",)}
BUDGET_TOLERANCE = 0.05
ALLOCATION_OR_INIT = ("gradient", "adaptive", "sensitivity", "lora_ga", "gora",
                      "gradient_rslora", "gradient_mean_rank")
INITS = ("lora_ga", "gora")


class Run(tp.NamedTuple):
    task: str
    method: str
    lr: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}@lr={self.lr},seed={self.seed}"


class Protocol:
    """Runs (or re-reads) the XPs of a plan and writes the results JSON after each."""

    def __init__(self, plan: dict, smoke: bool, workdir: Path, out: Path, base: Path):
        self.plan, self.smoke, self.workdir, self.out = plan, smoke, workdir, out
        self.base = str(base.relative_to(ROOT)) if workdir == ROOT else str(base)
        self.base_sha256 = file_sha256(base)
        self.log = workdir / "outputs" / f"{NAME}_dora_{'+'.join(plan['tasks'])}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.runs: tp.Dict[str, dict] = {}
        self.before: tp.Dict[str, dict] = {}
        self.errors: tp.List[str] = []

    def overrides(self, run: Run) -> tp.List[str]:
        args = method(run.method, self.plan["rank"]).overrides
        return [f"continue_from={self.base}",
                *quality.shared_args(SMOKE if self.smoke else COMMON, args),
                *TASKS[run.task], f"epochs={self.plan['epochs']}", *args,
                f"optim.lr={run.lr}", f"seed={run.seed}"]

    def __call__(self, run: Run) -> dict:
        if run.key in self.runs:
            return self.runs[run.key]
        from demucs_lora.train import xp_folder_in  # the folder Dora gives these overrides
        args = self.overrides(run)
        folder = xp_folder_in(args, self.workdir)
        rc = 0
        if quality.finished(quality.read_history(folder), self.plan["epochs"]):
            print(f"{run.key}: XP {folder.name} finished, not run again", flush=True)
        elif quality.diverged(folder):
            print(f"{run.key}: XP {folder.name} diverged earlier, not run again", flush=True)
        else:
            rc, _ = quality.dora_run(args, self.workdir, self.log)
        result = summarize(folder, run, args, self.before_scores(run.task, args), self.workdir)
        if rc != 0 and not result["diverged"]:
            self.errors.append(f"{run.key}: dora run exited {rc} (see {self.log})")
        self.runs[run.key] = result
        self.write()
        print(f"{run.key}: XP {folder.name}, valid gain {result['valid_gain']:+.3f} dB, "
              f"test gain {result['test_gain']:+.3f} dB"
              + (" (diverged: its lr is out of the sweep)" if result["diverged"] else ""),
              flush=True)
        return result

    def finished_lrs(self, task: str, key: str) -> tp.List[str]:
        """The ladder's lrs at which this method's seed-0 run has finished (XP folders)."""
        from demucs_lora.train import xp_folder_in
        return [lr for lr in quality.LR_LADDER if quality.finished(quality.read_history(
            xp_folder_in(self.overrides(Run(task, key, lr, 0)), self.workdir)),
            self.plan["epochs"])]

    def before_scores(self, task: str, args: tp.Sequence[str]) -> dict:
        """Test nSDR of the task's starting model (the base with the task's heads)."""
        if task not in self.before:
            self.before[task] = starting_scores(args, self.workdir,
                                                f"{task}_{self.base_sha256[:8]}")
        return self.before[task]

    @property
    def _result_args(self) -> argparse.Namespace:
        return argparse.Namespace(smoke=self.smoke, out=str(self.out))

    @property
    def result_path(self) -> Path:
        """The results JSON this protocol writes (common.result_path)."""
        return common.result_path(NAME, self._result_args)

    def write(self, summary: tp.Optional[dict] = None) -> Path:
        """The results JSON, merged with what other protocol processes (--jobs) wrote."""
        path = self.result_path
        with _locked(path):
            old = json.loads(path.read_text()) if path.exists() else {}
            if old.get("settings", {}).get("base_sha256") != self.base_sha256:
                old = {}
            data = {"benchmark": NAME, "machine": common.describe_machine("cpu"),
                    "settings": {**settings(self.plan, self.smoke, self.base),
                                 "base_sha256": self.base_sha256},
                    "runs": {**old.get("runs", {}), **self.runs},
                    "before": {**old.get("before", {}), **self.before},
                    "errors": list(dict.fromkeys([*self._old_errors(old), *self.errors])),
                    **(summary or {})}
            return common.write_result(NAME, data, self._result_args)

    def _old_errors(self, old: dict) -> tp.List[str]:
        """The errors other processes or sittings wrote, less those of runs this one has
        run or re-read since (an error message starts with its run's key)."""
        return [e for e in old.get("errors", []) if e.split(":", 1)[0] not in self.runs]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside `path`, so two protocol processes never lose a run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_tasks_side_by_side(argv: tp.Sequence[str], tasks: tp.Sequence[str], jobs: int) -> int:
    """One protocol process per task (at most `jobs` at once), each on cores // jobs
    threads: measured on the 2-core machine, two 1-thread trainings of the mid-size base
    did 1.5x the steps per second of one 2-thread training. Returns the worst exit code."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    rest = [a for i, a in enumerate(argv) if not a.startswith(("--jobs", "--tasks")) and
            (i == 0 or argv[i - 1] not in ("--jobs", "--tasks"))]
    pending, running, worst = list(tasks), [], 0
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            print(f"task {task}: protocol process on {threads} thread(s)", flush=True)
            running.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.quality_protocol", *rest, "--tasks", task],
                cwd=ROOT, env=env))
        running[0].wait()
        worst = max(worst, running.pop(0).returncode)
    return worst


def check_same_base(path: Path, sha256: str) -> tp.Optional[str]:
    """Why results at `path` cannot be resumed with this base (None: they can). The XP
    signatures name the base by its path, so a base retrained in between would mix."""
    if not path.exists():
        return None
    recorded = json.loads(path.read_text()).get("settings", {}).get("base_sha256")
    if recorded is None or recorded == sha256:
        return None
    return (f"{path} was measured on another version of the base (sha256 {recorded[:12]}, "
            f"now {sha256[:12]}): the finished XPs would mix two bases. Move the results "
            "and outputs/xps aside (or use --workdir and --out elsewhere) to start afresh")


def starting_scores(args: tp.Sequence[str], workdir: Path, task: str) -> dict:
    """nSDR on the test split of the model a run starts from (cached under workdir)."""
    import os
    cache = workdir / "outputs" / f"{NAME}_before_{task}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora.config.compose import compose
    from demucs_lora.core.files import atomic_torch_save
    from demucs_lora.config.run_config import model_spec
    from demucs_lora.models.build import build_model
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        plain = [a for a in args if not a.startswith(("htdemucs.lora", "optim.lora"))]
        model, _ = build_model(model_spec(compose([*plain, "htdemucs.lora_rank=0"])))
        path = workdir / "outputs" / f"{NAME}_start_{task}.th"
        atomic_torch_save(serialize_model(model, OmegaConf.create({}), half=False), path)
    finally:
        os.chdir(cwd)
    return quality.test_scores(path, args, workdir, cache)


def summarize(folder: Path, run: Run, args: tp.Sequence[str], before: dict,
              workdir: Path) -> dict:
    """One XP: params, valid curve (gains per epoch), test gain of its best.th."""
    history = quality.read_history(folder)
    trainable, total = quality.trainable_from_log(folder)
    ranks = quality.read_ranks(folder)
    initial = history[0].get("valid_initial_nsdr") if history else None
    curve = [h["valid_nsdr"] - initial for h in history
             if initial is not None and h.get("valid_nsdr") is not None]
    best_th = folder / "best.th"
    test = quality.test_scores(best_th, args, workdir, folder / "quality_test.json") \
        if best_th.exists() else {}
    return {"task": run.task, "method": run.method, "lr": run.lr, "seed": run.seed,
            "xp": folder.name, "command": "dora run " + " ".join(args),
            "params": sum(r["trainable"] for r in ranks["layers"]) if ranks else trainable,
            "model_params": total, "steps": sum(h.get("train_batches", 0) for h in history),
            "train_seconds": sum(h.get("train_seconds", 0.0) for h in history),
            "valid_curve": curve, "valid_gain": max(curve) if curve else math.nan,
            "diverged": quality.diverged(folder),
            "test": test, "test_gain": test.get("mean", math.nan) - before.get("mean", math.nan)}


def sweep_and_seeds(protocol: Protocol, task: str, key: str) -> dict:
    """The method's lr sweep (seed 0), then its best lr at every seed; its summary."""
    if protocol.plan.get("lrs"):
        lrs = list(protocol.plan["lrs"])
    else:
        start = protocol.plan["start_lrs"]["full" if key == "full" else "lora"]
        lrs = sorted(set(start) | set(protocol.finished_lrs(task, key)), key=float)
    firsts = {lr: protocol(Run(task, key, lr, 0)) for lr in lrs}
    for _ in range(protocol.plan["max_extend"]):
        lr = quality.next_lr(lrs, _scores(firsts))
        if lr is None:
            break
        lrs.append(lr)
        firsts[lr] = protocol(Run(task, key, lr, 0))
    scores = _scores(firsts)
    best, at_edge = quality.best_lr(scores)
    seeds = [protocol(Run(task, key, best, s)) for s in range(protocol.plan["seeds"])] \
        if best else []
    label = method(key, protocol.plan["rank"]).label
    steps = seeds[0]["steps"] if seeds else None
    params = seeds[0]["params"] if seeds else None
    ordered = sorted(lrs, key=float)
    return {"method": key, "label": label, "lr": best, "best_at_edge": at_edge,
            "sweep": {lr: firsts[lr]["valid_gain"] for lr in ordered},
            "diverged_lrs": [lr for lr in ordered if firsts[lr].get("diverged")],
            "params": params, "model_params": seeds[0]["model_params"] if seeds else None,
            "steps": steps, "seeds": [r["seed"] for r in seeds],
            "test_gains": [r["test_gain"] for r in seeds],
            "test_gain": stats.mean_ci(r["test_gain"] for r in seeds),
            "valid_curve": stats.mean_curve([r["valid_curve"] for r in seeds])}


def _scores(firsts: tp.Mapping[str, dict]) -> tp.Dict[str, float]:
    """Valid gain of each lr's seed-0 run; an lr whose run diverged cannot be the best,
    whatever its epochs before the divergence reached."""
    return {lr: -math.inf if r.get("diverged") else r["valid_gain"] for lr, r in firsts.items()}


def task_verdicts(task: str, methods: tp.Dict[str, dict], rank: int) -> tp.List[dict]:
    """The issue's verdicts on one task (those whose methods ran)."""
    rows = []
    uniform = methods.get("uniform")
    if uniform and uniform["params"]:
        for m in methods.values():
            if m["method"] not in ("full", "uniform") and m["params"]:
                off = m["params"] / uniform["params"] - 1
                rows.append(stats.verdict(f"{task}: {m['label']} params vs uniform (relative)",
                                          abs(off), BUDGET_TOLERANCE, "<="))
    others = [m for k, m in methods.items() if k in ALLOCATION_OR_INIT]
    if uniform and others:
        best = max(others, key=lambda m: _mean(m))
        diff = stats.difference_ci(best["test_gains"], uniform["test_gains"])
        row = stats.verdict(
            f"{task}: best allocation/init ({best['label']}) - uniform, test gain dB "
            "(and its 95 % CI excludes 0)", diff["diff"], 0.2, ">=",
            f"95 % CI [{diff['low']:+.2f}, {diff['high']:+.2f}]")
        row["pass"] = row["pass"] and diff["low"] > 0
        rows.append(row)
    inits = [m for k, m in methods.items() if k in INITS]
    if uniform and inits and uniform["valid_curve"]:
        best = max(inits, key=lambda m: _mean(m))
        per = uniform["steps"] // max(1, len(uniform["valid_curve"]))
        need = stats.steps_to(best["valid_curve"], uniform["valid_curve"][-1], per)
        rows.append(stats.verdict(
            f"{task}: steps {best['label']} needs to reach uniform's final valid gain / "
            "run steps", need / uniform["steps"] if need else math.inf, 0.5, "<=",
            f"{need} of {uniform['steps']} steps" if need else "never reached"))
    if uniform and "full" in methods:
        rows.append(stats.verdict(f"{task}: uniform r={rank} test gain / full FT test gain",
                                  quality.ratio(_mean(uniform), _mean(methods["full"])),
                                  0.95, ">="))
    if uniform and "heuristic" in methods:
        cost = _mean(methods["heuristic"]) - _mean(uniform)
        rows.append(stats.verdict(f"{task}: heuristic - uniform, test gain dB (its rank-0 "
                                  "outer layers are a memory choice)", cost, -math.inf,
                                  ">=", "reported, no target"))
    return rows


def earned(tasks: tp.Mapping[str, tp.Mapping[str, dict]]) -> tp.List[str]:
    """The methods that beat uniform beyond noise on every task (at least +0.2 dB, 95 % CI
    above 0): the ones `dora grid rank_modes` sweeps and the docs recommend."""
    out = []
    for key in PLAN["methods"]:
        if key in ("full", "uniform"):
            continue
        diffs = [stats.difference_ci(ms[key]["test_gains"], ms["uniform"]["test_gains"])
                 for ms in tasks.values() if key in ms and "uniform" in ms]
        if diffs and len(diffs) == len(tasks) and \
                all(d["diff"] >= 0.2 and d["low"] > 0 for d in diffs):
            out.append(key)
    return out


def _mean(m: dict) -> float:
    value = m["test_gain"]["mean"]
    return value if math.isfinite(value) else -math.inf


def settings(plan: dict, smoke: bool, base: str) -> dict:
    shared = SMOKE if smoke else COMMON
    opt = dict(a.split("=", 1) for a in shared)
    return {"smoke": smoke, "base": base, "common": shared, "tasks": list(plan["tasks"]),
            "task_args": {t: list(TASKS[t]) for t in plan["tasks"]},
            "methods": list(plan["methods"]), "rank": plan["rank"], "epochs": plan["epochs"],
            "steps": plan["epochs"] * int(opt["max_batches"]), "seeds": plan["seeds"],
            "max_extend": plan["max_extend"], "lr_ladder": list(quality.LR_LADDER),
            "start_lrs": plan.get("lrs") or plan["start_lrs"]}


def parse(argv) -> tp.Tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CI: the tiny base, 2 methods, "
                        "1 lr, 2 seeds, 1 step per run, both tasks")
    parser.add_argument("--tasks", help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(PLAN["methods"]))
    parser.add_argument("--seeds", type=int, help=f"seeds at the best lr (default {PLAN['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {PLAN['epochs']})")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    parser.add_argument("--workdir", help="cwd of the dora runs (default: the repository root)")
    parser.add_argument("--jobs", type=int, default=1, help="run up to N tasks side by side, "
                        "each on cores/N threads, then summarize (default 1)")
    parser.add_argument("--docs", action="store_true", help="only regenerate docs/quality.md "
                        "from benchmarks/results/quality*.json")
    args = parser.parse_args(argv)
    plan = dict(SMOKE_PLAN if args.smoke else PLAN)
    for key in ("tasks", "methods"):
        if getattr(args, key):
            plan[key] = tuple(getattr(args, key).split(","))
    unknown = [t for t in plan["tasks"] if t not in TASKS] + \
        [m for m in plan["methods"] if m not in PLAN["methods"]]
    if unknown:
        parser.error(f"unknown task(s) or method(s): {unknown}")
    for key in ("seeds", "epochs"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    return args, plan


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, plan = parse(argv)
    if args.docs:
        print(f"wrote {write_docs()}")
        return 0
    if args.jobs > 1 and len(plan["tasks"]) > 1:
        code = run_tasks_side_by_side(argv, plan["tasks"], args.jobs)
        if code:
            return code
        print("all tasks finished: the summary pass re-reads them", flush=True)
    common.passive_omp()
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT
    out = common.results_dir(args).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = quality.BASE if args.smoke else BASE
    if not base.exists():
        print(f"error: {base} does not exist: run `make base-medium` first", file=sys.stderr)
        return 1
    recipe = base.with_suffix(".json")
    if not args.smoke and recipe.exists() and json.loads(recipe.read_text()).get(
            "status") != "converged":
        print(f"warning: {recipe} says the base is still training (make base-medium): "
              "results measured now cannot be resumed on the base it ends with", flush=True)
    protocol = Protocol(plan, args.smoke, workdir, out, base)
    problem = check_same_base(protocol.result_path, protocol.base_sha256)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    tasks = {t: {m: sweep_and_seeds(protocol, t, m) for m in plan["methods"]}
             for t in plan["tasks"]}
    verdicts = [v for t, ms in tasks.items() for v in task_verdicts(t, ms, plan["rank"])]
    chosen = earned(tasks)
    path = protocol.write({"tasks": tasks, "verdicts": verdicts, "earned": chosen})
    figure = write_figure(tasks, out / f"{path.stem}_gain_vs_steps.png")
    for task, methods in tasks.items():
        print(f"\n{task}:")
        for m in methods.values():
            g = m["test_gain"]
            print(f"  {m['label']:<40} params {m['params']}  lr {m['lr']}  test gain "
                  f"{g['mean']:+.3f} +- {g['ci']:.3f} dB ({g['n']} seeds)")
    print("verdicts:")
    for v in verdicts:
        print(f"  [{'PASS' if v['pass'] else 'MISS'}] {v['name']}: {v['value']:.3f} "
              f"(target {v['op']} {v['target']}) {v['note']}")
    print("earned a place in dora grid rank_modes: " + (", ".join(chosen) if chosen else
          "none (uniform is the recommendation)"))
    print(f"wrote {path}, {figure.name}")
    return 1 if protocol.errors else 0


if __name__ == "__main__":
    sys.exit(main())
