"""CI smoke run of benchmarks/quality.py: real `dora run`s, tiny data, one epoch of 2 batches.

`python -m benchmarks.quality --smoke --out TMP --workdir TMP/work` runs full FT, uniform
r=4 and gradient r=4 from the shipped base with their XPs (and synthetic data) under a
temporary folder, so outputs/ and benchmarks/results of the repository are never touched.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["drums", "bass", "other", "vocals"]


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_quality(out, workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--smoke", "--out",
                           str(out), "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(180)
def test_quality_smoke(tmp_path):
    out, workdir = tmp_path / "results", tmp_path / "work"
    stdout = run_quality(out, workdir)
    result = json.loads((out / "quality_smoke.json").read_text())
    assert result["benchmark"] == "quality"
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    assert not result["errors"]
    runs = result["runs"]
    assert set(runs) == {"full", "uniform_r4", "gradient_r4"}
    for key, run in runs.items():
        assert run["epochs"] == 1, key
        assert finite(run["train_seconds"]) and run["train_seconds"] > 0, key
        assert set(run["gain"]) == {*SOURCES, "mean"}, key
        assert all(finite(v) for v in run["gain"].values()), (key, run["gain"])
        assert finite(run["initial"]["mean"]) and finite(run["best"]["mean"]), key
        assert isinstance(run["params"], int) and run["params"] > 0, key
        # the XPs live under the work folder, not in the repository's outputs/
        assert (workdir / "outputs" / "xps" / run["xp"] / "history.json").exists(), key
    # every run starts from the same base on the same valid set
    assert len({round(r["initial"]["mean"], 6) for r in runs.values()}) == 1
    full, uniform, gradient = runs["full"], runs["uniform_r4"], runs["gradient_r4"]
    assert full["params"] == full["model_params"] > uniform["params"]
    assert len(uniform["ranks"]) == len(gradient["ranks"]) > 0
    assert {r["rank"] for r in uniform["ranks"]} <= {1, 2, 3, 4}
    # gradient mode spends the parameter budget of uniform at the same rank (within 5%)
    assert abs(gradient["params"] - uniform["params"]) <= 0.05 * uniform["params"]
    assert [t["name"] for t in result["targets"]] == [
        "uniform r=4 gain / full-FT gain", "gradient r=4 gain - uniform r=4 gain (dB)"]
    for row in result["targets"]:
        assert set(row) >= {"name", "value", "target", "op", "pass"}
    assert "PASS" in stdout or "MISS" in stdout
    for name in ("quality_smoke_gain_vs_params.png", "quality_smoke_ranks.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # re-running re-reads the finished XPs: nothing trains again
    stdout = run_quality(out, workdir)
    assert stdout.count("not run again") == 3, stdout[-2000:]
    again = json.loads((out / "quality_smoke.json").read_text())["runs"]
    for key, run in again.items():
        assert run["epochs"] == 1 and run["gain"] == runs[key]["gain"], key
