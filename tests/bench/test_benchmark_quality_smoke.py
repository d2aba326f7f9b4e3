"""benchmarks/quality.py: the sweep logic, and a CI smoke run of real `dora run`s.

`python -m benchmarks.quality --smoke --out TMP --workdir TMP/work` runs full FT at one lr
and uniform r=4 at three lrs (one step each, 2 training tracks), then both at their best lr
with 1 training track (the data-size curve), from the shipped base; XPs and synthetic data
live under a temporary folder, so outputs/ and benchmarks/results are never touched.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_targets_printed, finite

from benchmarks import quality

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["drums", "bass", "other", "vocals"]



def test_sweep_extends_past_an_edge_best():
    tried = ["1e-3", "3e-3", "1e-2"]
    assert quality.next_lr(tried, {"1e-3": 1.0, "3e-3": 2.0, "1e-2": 3.0}) == "3e-2"
    assert quality.next_lr(tried, {"1e-3": 3.0, "3e-3": 2.0, "1e-2": 1.0}) == "3e-4"
    assert quality.next_lr(tried, {"1e-3": 1.0, "3e-3": 3.0, "1e-2": 2.0}) is None
    assert quality.next_lr(["1e-1", "3e-2", "1e-2"], {"1e-1": 3, "3e-2": 2, "1e-2": 1}) is None
    assert quality.best_lr({"1e-3": 1.0, "3e-3": 3.0, "1e-2": 2.0}) == ("3e-3", False)
    assert quality.best_lr({"1e-3": 1.0, "3e-3": 3.0, "1e-2": float("nan")}) == ("3e-3", False)
    assert quality.best_lr({"1e-3": 3.0, "3e-3": 1.0, "1e-2": 2.0}) == ("1e-3", True)
    assert quality.best_lr({"1e-3": 1.0}) == ("1e-3", True)   # one value: always an edge
    # the ladder is a factor ~3 apart, and every default sweep has 3 values on it
    ladder = [float(x) for x in quality.LR_LADDER]
    assert all(2.9 < b / a < 3.4 for a, b in zip(ladder, ladder[1:]))
    assert all(len(v) >= 3 and set(v) <= set(quality.LR_LADDER)
               for v in quality.START_LRS.values())


def test_every_run_of_every_size_takes_the_same_steps():
    # 2 tracks of 8 s, 3 s train examples, hop 1 s: 6 examples a track, 3 batches of 4
    opt = dict(a.split("=", 1) for a in quality.COMMON)
    per_track = math.ceil((float(opt["dset.synth.seconds"]) - 3.0) / 1.0) + 1
    assert min(quality.TRACKS) * per_track // int(opt["batch_size"]) >= int(opt["max_batches"])


def run_quality(out, workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--smoke", "--out",
                           str(out), "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
def test_quality_smoke(tmp_path):
    out, workdir = tmp_path / "results", tmp_path / "work"
    stdout = run_quality(out, workdir)
    result = json.loads((out / "quality_smoke.json").read_text())
    assert result["benchmark"] == "quality" and result["protocol"] == quality.PROTOCOL
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    assert not result["errors"]
    runs = result["runs"]
    # full FT at 1 lr, uniform r=4 at 3 lrs (2 tracks), both again at 1 track
    assert len(runs) == 1 + 3 + 2
    assert result["equal_steps"]["equal"] and result["equal_steps"]["steps"] == [1]
    for key, run in runs.items():
        assert run["epochs"] == 1 and run["steps"] == 1, key
        assert finite(run["valid_gain"]), key
        assert set(run["test"]) == {*SOURCES, "mean"} and finite(run["test"]["mean"]), key
        assert isinstance(run["params"], int) and run["params"] > 0, key
        # the XPs live under the work folder, not in the repository's outputs/
        assert (workdir / "outputs" / "xps" / run["xp"] / "history.json").exists(), key
    # every run starts from the same base on the same valid set
    assert len({round(r["valid_initial"]["mean"], 6) for r in runs.values()}) == 1
    best = result["best"]
    assert set(best) == {"full", "uniform_r4"}
    uniform, full = best["uniform_r4"], best["full"]
    assert set(uniform["sweep"]) == {"1e-3", "3e-3", "1e-2"} and uniform["lr"] in uniform["sweep"]
    assert uniform["sweep"][uniform["lr"]]["valid_gain"] == max(
        s["valid_gain"] for s in uniform["sweep"].values())       # chosen on valid
    assert full["best_at_edge"] and list(full["sweep"]) == ["1e-3"]
    for b in best.values():
        assert set(b["curve"]) == {"1", "2"} and all(finite(v) for v in b["curve"].values())
        assert set(b["test_gain"]) == {*SOURCES, "mean"} and finite(b["test_gain"]["mean"])
    assert full["params"] > uniform["params"]
    assert {r["rank"] for r in uniform["ranks"]} <= {1, 2, 3, 4}
    assert [t["name"] for t in result["targets"]] == [
        "methods whose best lr is at the edge of its sweep"]
    assert_targets_printed(result, stdout)
    for name in ("gain_vs_params", "gain_vs_tracks", "lr_sweep", "ranks"):
        path = out / f"quality_smoke_{name}.png"
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = "\n".join(quality.table_lines(result))
    assert "best lr" in table and "old protocol" not in table

    # re-running re-reads the finished XPs: nothing trains again
    stdout = run_quality(out, workdir)
    assert stdout.count("not run again") == 6, stdout[-2000:]
    again = json.loads((out / "quality_smoke.json").read_text())["best"]
    for key, b in again.items():
        assert b["test_gain"] == best[key]["test_gain"] and b["lr"] == best[key]["lr"], key


def test_old_protocol_results_are_labelled():
    gain = {**{s: 1.0 for s in SOURCES}, "mean": 1.0}
    from benchmarks.common import describe_machine
    old = {"machine": describe_machine(), "settings": {"budget_seconds": 90.0, "lora_lr": "2e-3",
                                       "full_lr": "3e-4"},
           "runs": {"full": {"label": "full FT", "params": 10, "epochs": 8, "gain": gain}},
           "targets": []}
    assert "old protocol" in "\n".join(quality.table_lines(old))


# ------------------------------------------------------------ the protocol (issue 19)
def run_protocol(out, workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality_protocol", "--smoke",
                           "--out", str(out), "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(900)
def test_quality_protocol_smoke(tmp_path):
    """Both tasks, uniform and GoRA at 1 lr and 2 seeds, 1 step each; then a re-run that
    trains nothing; the docs table renders from the JSON."""
    from benchmarks import quality_report
    from demucs_lora.grids.methods import method
    out, workdir = tmp_path / "results", tmp_path / "work"
    stdout = run_protocol(out, workdir)
    result = json.loads((out / "quality_protocol_smoke.json").read_text())
    assert not result["errors"] and set(result["tasks"]) == {"five_stem", "four_stem"}
    assert len(result["runs"]) == 2 * 2 * 2   # tasks x methods x seeds (1 lr)
    for key, run in result["runs"].items():
        assert run["steps"] == 1 and finite(run["test_gain"]) and finite(run["valid_gain"]), key
        assert len(run["valid_curve"]) == 1, key
    assert {r["model_params"] for r in result["runs"].values() if "five_stem" in r["task"]}
    for task, methods in result["tasks"].items():
        uniform, gora = methods["uniform"], methods["gora"]
        assert uniform["seeds"] == gora["seeds"] == [0, 1]
        assert uniform["test_gain"]["n"] == 2 and finite(uniform["test_gain"]["ci"])
        assert uniform["test_gain"]["mean"] == pytest.approx(
            sum(uniform["test_gains"]) / 2)
        assert abs(gora["params"] / uniform["params"] - 1) <= 0.05   # budget-matched
    names = [v["name"] for v in result["verdicts"]]
    assert any("params vs uniform" in n for n in names)
    assert any("- uniform, test gain dB" in n for n in names)
    assert any("steps" in n for n in names)
    for v in result["verdicts"]:
        assert f"[{'PASS' if v['pass'] else 'MISS'}] {v['name']}" in stdout, v["name"]
    figure = out / "quality_protocol_smoke_gain_vs_steps.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(quality_report.protocol_lines(result))
    assert "GoRA" in table and "five_stem: test gain" in table
    assert method("gora", 8).overrides[-1] == "htdemucs.lora_init=gradient"
    stdout = run_protocol(out, workdir)   # resumable: finished XPs are not run again
    assert stdout.count("not run again") == 8, stdout[-2000:]
    again = json.loads((out / "quality_protocol_smoke.json").read_text())
    assert again["tasks"]["four_stem"]["uniform"]["test_gains"] == \
        result["tasks"]["four_stem"]["uniform"]["test_gains"]


def test_protocol_processes_merge_their_runs(tmp_path):
    """--jobs runs one process per task, all writing one results JSON: a write keeps the
    runs the other process wrote, and drops results measured on another base."""
    from benchmarks import quality_protocol as qp
    plan = dict(qp.SMOKE_PLAN)
    one = qp.Protocol({**plan, "tasks": ("five_stem",)}, True, tmp_path, tmp_path, quality.BASE)
    two = qp.Protocol({**plan, "tasks": ("four_stem",)}, True, tmp_path, tmp_path, quality.BASE)
    one.runs["five_stem/uniform@lr=3e-3,seed=0"] = {"test_gain": 1.0}
    one.write()
    two.runs["four_stem/uniform@lr=3e-3,seed=0"] = {"test_gain": 2.0}
    two.errors.append("four_stem: failed")
    path = two.write()
    data = json.loads(path.read_text())
    assert set(data["runs"]) == {"five_stem/uniform@lr=3e-3,seed=0",
                                 "four_stem/uniform@lr=3e-3,seed=0"}
    assert data["errors"] == ["four_stem: failed"]
    data["settings"]["base_sha256"] = "0" * 64     # measured on another base: not merged
    path.write_text(json.dumps(data))
    one.write()
    assert set(json.loads(path.read_text())["runs"]) == {"five_stem/uniform@lr=3e-3,seed=0"}


def test_side_by_side_tasks_keep_the_other_options(monkeypatch):
    """Each task's process gets the user's options but its own --tasks, on cores/jobs
    threads."""
    from benchmarks import quality_protocol as qp
    started = []

    class Proc:
        returncode = 0

        def __init__(self, cmd, cwd, env):
            started.append((cmd, env["OMP_NUM_THREADS"]))

        def wait(self):
            return 0

    monkeypatch.setattr(qp.subprocess, "Popen", Proc)
    monkeypatch.setattr(qp.os, "cpu_count", lambda: 2)
    argv = ["--jobs", "2", "--methods", "uniform", "--tasks=five_stem,four_stem", "--seeds", "2"]
    assert qp.run_tasks_side_by_side(argv, ("five_stem", "four_stem"), 2) == 0
    assert [(c[3:], t) for c, t in started] == [
        (["--methods", "uniform", "--seeds", "2", "--tasks", "five_stem"], "1"),
        (["--methods", "uniform", "--seeds", "2", "--tasks", "four_stem"], "1")]


def test_protocol_sweep_takes_in_finished_runs_off_its_start():
    """A method swept before the start moved keeps its finished lrs in its sweep; a new one
    starts at START_LRS and extends past an edge best."""
    from benchmarks import quality_protocol as qp

    class Fake:
        plan = dict(qp.PLAN, seeds=2)

        def __init__(self, finished, scores):
            self.finished, self.scores, self.ran = finished, scores, []

        def finished_lrs(self, task, key):
            return self.finished

        def __call__(self, run):
            self.ran.append((run.lr, run.seed))
            return {"valid_gain": self.scores[run.lr], "test_gain": 1.0, "steps": 96,
                    "params": 10, "model_params": 100, "seed": run.seed,
                    "valid_curve": [self.scores[run.lr]]}

    old = Fake(["1e-3", "3e-3", "1e-2", "3e-2"], {"1e-3": 5.9, "3e-3": 7.4, "1e-2": 7.7,
                                                 "3e-2": 2.3})
    summary = qp.sweep_and_seeds(old, "five_stem", "uniform")
    assert list(summary["sweep"]) == ["1e-3", "3e-3", "1e-2", "3e-2"]
    assert summary["lr"] == "1e-2" and not summary["best_at_edge"]
    new = Fake([], {"3e-4": 6.5, "1e-3": 7.0, "3e-3": 6.0, "1e-2": 5.0, "3e-2": 1.0})
    summary = qp.sweep_and_seeds(new, "five_stem", "gora")
    first = [lr for lr, seed in new.ran if seed == 0][:5]
    assert first == ["3e-3", "1e-2", "3e-2", "1e-3", "3e-4"]
    assert summary["lr"] == "1e-3" and new.ran[-1] == ("1e-3", 1)


def test_a_diverged_lr_is_an_outcome_not_an_error(tmp_path):
    """A run that stopped on TrainingDiverged is read as a result of its lr: not run again,
    not a protocol error, never the best lr whatever its first epochs reached; an old error
    of a run re-read since is dropped from the JSON."""
    from benchmarks import quality_protocol as qp
    xp = tmp_path / "xp"
    xp.mkdir()
    (xp / "train.log").write_text("[ERROR] - TrainingDiverged: training diverged at epoch 2\n")
    assert quality.diverged(xp) and not quality.diverged(tmp_path)

    class Fake:
        plan = dict(qp.PLAN, seeds=1)

        def finished_lrs(self, task, key):
            return []

        def __call__(self, run):
            gain = {"3e-3": 7.0, "1e-2": 7.5, "3e-2": 9.0}[run.lr]
            return {"valid_gain": gain, "test_gain": 1.0, "steps": 96, "params": 10,
                    "model_params": 100, "seed": run.seed, "valid_curve": [gain],
                    "diverged": run.lr == "3e-2"}

    summary = qp.sweep_and_seeds(Fake(), "five_stem", "uniform")
    assert summary["lr"] == "1e-2" and not summary["best_at_edge"]
    assert summary["diverged_lrs"] == ["3e-2"] and summary["sweep"]["3e-2"] == 9.0
    protocol = qp.Protocol(dict(qp.SMOKE_PLAN, tasks=("five_stem",)), True, tmp_path,
                           tmp_path, quality.BASE)
    protocol.errors.append("five_stem/uniform@lr=3e-2,seed=0: dora run exited 1")
    protocol.write()
    again = qp.Protocol(dict(qp.SMOKE_PLAN, tasks=("five_stem",)), True, tmp_path,
                        tmp_path, quality.BASE)
    again.runs["five_stem/uniform@lr=3e-2,seed=0"] = {"diverged": True}
    assert json.loads(again.write().read_text())["errors"] == []
