"""CI smoke runs of the benchmarks: tiny models, 2 steps, JSON written with finite ratios.

Each benchmark runs as `python -m benchmarks.NAME --smoke --out TMP` in a subprocess (as
`make bench` would), so the real results in benchmarks/results are never touched.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_targets_printed, finite

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.timeout(150)
def test_train_step_smoke(tmp_path):
    result, stdout = run_smoke("train_step", tmp_path)
    assert result["settings"]["suite"] == "cpu" and not result["errors"]
    (run,) = result["runs"]
    assert run["arch"] == "tiny" and run["precision"] == "fp32"
    configs = run["configs"]
    assert set(configs) == {"full", "floor_input", "floor_heuristic", "floor_heuristic_ckpt",
                            "uniform", "heuristic", "heuristic_ckpt", "peft", "ours_peft_set"}
    for name, c in configs.items():
        assert finite(c["time_ratio"]) and c["time_ratio"] > 0, name
        assert finite(c["mem_ratio"]), name
        assert len(c["step_s_rounds"]) == 2, name
    assert configs["full"]["time_ratio"] == 1.0 and configs["full"]["mem_ratio"] == 1.0
    assert configs["floor_input"]["trainable"] == configs["floor_heuristic"]["trainable"] == 0
    assert configs["floor_heuristic"]["hooked_layers"] > 0
    assert configs["full"]["trainable_pct"] == 100.0
    # each LoRA configuration is compared with its own floor
    assert configs["heuristic"]["floor"] == "floor_heuristic"
    assert configs["heuristic_ckpt"]["floor"] == "floor_heuristic_ckpt"
    assert finite(configs["heuristic"]["floor_time_ratio"])
    assert configs["uniform"]["floor"] is None  # floor_uniform is not in the smoke set
    # PEFT and ours wrap exactly the same layers with the same rank
    assert configs["peft"]["trainable"] == configs["ours_peft_set"]["trainable"] > 0
    assert finite(run["ours_vs_peft_time"]) and finite(run["ours_vs_peft_mem"])
    assert {t["config"] for t in result["targets"]} >= {"heuristic", "uniform", "heuristic_ckpt"}
    assert_targets_printed(result, stdout)


@pytest.mark.timeout(60)
def test_inference_smoke(tmp_path):
    result, _ = run_smoke("inference", tmp_path)
    (run,) = result["runs"]
    for name, c in run["configs"].items():
        assert finite(c["time_ratio"]), name
    e = run["exactness"]
    assert e["max_abs_effect_of_adapter"] > 0          # the random adapter does something
    assert e["relative_diff"] < 1e-5                   # merging is exact
    assert run["configs"]["base"]["time_ratio"] == 1.0


@pytest.mark.timeout(60)
def test_size_smoke(tmp_path):
    result, _ = run_smoke("size", tmp_path)
    (run,) = result["runs"]
    c = run["configs"]
    assert run["base"]["bytes"] > run["base"]["bytes_float16"] > 0
    assert 0 < c["uniform_r4"]["bytes"] < c["uniform_r8"]["bytes"] < c["uniform_r16"]["bytes"]
    assert all(finite(v["ratio"]) for v in c.values())
    for dtype in ("float16", "bfloat16"):
        half = c[f"uniform_r8_{dtype}"]
        assert half["params"] == c["uniform_r8"]["params"]
        assert half["safetensors_bytes"] < 0.6 * c["uniform_r8"]["safetensors_bytes"]
        assert 0 < half["error_vs_adapter_effect"] < 0.05, (dtype, half)
    assert c["uniform_r8"].get("max_abs_error") is None   # float32 reloads exactly


@pytest.mark.timeout(240)
def test_run_all_cuda_smoke_on_cpu(tmp_path):
    """`python -m benchmarks.run_all --device cuda --smoke`: the CUDA suite's code path
    (configurations, fp32/bf16/fp16 AMP, SDPA kernel check, JSON, README rows), on CPU
    when no CUDA device is visible, saying so."""
    import torch
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--device", "cuda",
                           "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_step_cuda_smoke.json").read_text())
    assert json.loads((tmp_path / "inference_cuda_smoke.json").read_text())["runs"]
    assert not (tmp_path / "size_smoke.json").exists()  # not part of the CUDA suite
    s = result["settings"]
    assert s["suite"] == "cuda" and s["precisions"] == ["fp32", "bf16", "fp16"]
    assert [r["precision"] for r in result["runs"]] == ["fp32", "bf16", "fp16"]
    assert not result["errors"]
    for run in result["runs"]:
        configs = run["configs"]
        assert {"full", "heuristic", "heuristic_ckpt"} <= set(configs)
        assert all(finite(c["step_s"]) for c in configs.values())
        assert configs["full"]["sdpa"] and configs["heuristic"]["sdpa"]
    assert [t["config"] for t in result["targets"]] == ["heuristic_ckpt"] * 3
    table = (tmp_path / "README_table_smoke.md").read_text()
    assert "GPU train step" in table and "| fp16 |" in table
    if torch.cuda.is_available():
        assert s["device"] == "cuda" and result["machine"]["gpu"]
    else:  # the fallback is announced, and nothing pretends to be a GPU number
        assert s["device"] == "cpu" and "NOT measured" in s["note"]
        assert "NOT measured" in proc.stdout and "NOT measured" in table
        assert all(c["max_allocated_bytes"] is None
                   for r in result["runs"] for c in r["configs"].values())
        assert not any(t["pass"] for t in result["targets"])
        assert result["runs"][0]["configs"]["full"]["sdpa"] == ["flash (CPU)"]


@pytest.mark.timeout(60)
def test_data_loading_smoke(tmp_path):
    result, _ = run_smoke("data_loading", tmp_path)
    assert finite(result["ratio"]) and result["ratio"] > 0
    assert result["loader_batches_per_s"] > 0 and result["train_steps_per_s"] > 0
    assert len(result["rounds"]) == 2
    assert finite(result["repitch_throughput_ratio"]) and result["repitch_throughput_ratio"] > 0


@pytest.mark.timeout(120)
def test_accumulate_smoke(tmp_path):
    result, stdout = run_smoke("accumulate", tmp_path)
    assert not result["errors"] and set(result["configs"]) == {"batch4", "batch1_x4"}
    assert all(c["peak"] > 0 for c in result["configs"].values())
    assert finite(result["memory_ratio"]) and result["memory_ratio"] > 0
    assert f"memory ratio (batch 1 x accumulate 4 / batch 4): {result['memory_ratio']:.2f}" \
        in stdout


def test_cuda_without_a_device_refuses_unless_smoke(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from benchmarks import common
    parser = common.base_parser("x", rounds=3)
    with pytest.raises(SystemExit, match="no CUDA device"):
        common.finish_args(parser.parse_args(["--device", "cuda"]))
    args = common.finish_args(parser.parse_args(["--device", "cuda", "--smoke"]))
    assert (args.suite, args.device, args.cuda_fallback) == ("cuda", "cpu", True)
    assert common.result_name("train_step", args.suite, args.smoke) == "train_step_cuda_smoke"


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


@pytest.mark.slow  # an ONNX export of the tiny model
@pytest.mark.timeout(300)
def test_onnx_runtime_smoke(tmp_path):
    """onnxruntime vs PyTorch separation: finite ratios, stems within 1e-4 on the song."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (make install)")
    result, stdout = run_smoke("onnx_runtime", tmp_path)
    (run,) = result["runs"]
    assert run["arch"] == "tiny" and len(run["times"]["onnxruntime"]) == 2
    assert finite(run["cpu_ratio"]) and finite(run["wall_ratio"]) and run["size_ratio"] > 1
    assert run["max_abs_diff"] < 1e-4 < run["max_abs_output"]
    assert_targets_printed(result, stdout)
