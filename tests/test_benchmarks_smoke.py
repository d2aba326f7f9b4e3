"""CI smoke runs of the benchmarks: tiny models, 2 steps, JSON written with finite ratios.

Each benchmark runs as `python -m benchmarks.NAME --smoke --out TMP` in a subprocess (as
`make bench` would), so the real results in benchmarks/results are never touched.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(name, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out",
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / f"{name}_smoke.json"
    assert path.exists(), proc.stdout[-2000:]
    result = json.loads(path.read_text())
    assert result["benchmark"] == name
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    for row in result["targets"]:
        assert set(row) >= {"name", "value", "target", "op", "pass"}
    return result, proc.stdout


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(120)
def test_train_step_smoke(tmp_path):
    result, stdout = run_smoke("train_step", tmp_path)
    configs = result["configs"]
    assert set(configs) == {"full", "floor", "uniform", "heuristic", "heuristic_ckpt", "peft",
                            "ours_peft_set"}
    assert not result["errors"]
    for name, c in configs.items():
        assert finite(c["time_ratio"]) and c["time_ratio"] > 0, name
        assert finite(c["mem_ratio"]), name
        assert len(c["step_s_rounds"]) == 2, name
    assert configs["full"]["time_ratio"] == 1.0 and configs["full"]["mem_ratio"] == 1.0
    assert configs["floor"]["trainable"] == 0
    assert configs["full"]["trainable_pct"] == 100.0
    # PEFT and ours wrap exactly the same layers with the same rank
    assert configs["peft"]["trainable"] == configs["ours_peft_set"]["trainable"] > 0
    assert finite(result["ours_vs_peft_time"]) and finite(result["ours_vs_peft_mem"])
    assert "PASS" in stdout or "MISS" in stdout


@pytest.mark.timeout(60)
def test_inference_smoke(tmp_path):
    result, _ = run_smoke("inference", tmp_path)
    for name, c in result["configs"].items():
        assert finite(c["time_ratio"]), name
    e = result["exactness"]
    assert e["max_abs_effect_of_adapter"] > 0          # the random adapter does something
    assert e["relative_diff"] < 1e-5                   # merging is exact
    assert result["configs"]["base"]["time_ratio"] == 1.0


@pytest.mark.timeout(60)
def test_size_smoke(tmp_path):
    result, _ = run_smoke("size", tmp_path)
    c = result["configs"]
    assert result["base"]["bytes"] > 0
    assert 0 < c["uniform_r4"]["bytes"] < c["uniform_r8"]["bytes"] < c["uniform_r16"]["bytes"]
    assert all(finite(v["ratio"]) for v in c.values())


@pytest.mark.timeout(60)
def test_data_loading_smoke(tmp_path):
    result, _ = run_smoke("data_loading", tmp_path)
    assert finite(result["ratio"]) and result["ratio"] > 0
    assert result["loader_batches_per_s"] > 0 and result["train_steps_per_s"] > 0
    assert len(result["rounds"]) == 2


def test_update_readme(tmp_path):
    from benchmarks.run_all import END, START, make_table, update_readme
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold\n{END}\n\nafter\n")
    assert update_readme(readme, "| a | b |\n")
    text = readme.read_text()
    assert "old" not in text and "| a | b |" in text and text.endswith("after\n")
    assert update_readme(readme, "| c |\n") and "| a | b |" not in readme.read_text()
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| a |\n") and plain.read_text() == "no markers\n"
    assert not update_readme(tmp_path / "missing.md", "x")
    assert "No benchmark results" in make_table({})
