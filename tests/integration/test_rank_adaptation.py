"""`dora run` with htdemucs.lora_rank_adaptation=true: ranks move at the end of epoch 1,
and a run killed with SIGKILL in epoch 2 resumes exactly (layers rebuilt at the
checkpoint's ranks before any state is loaded)."""
import json
import os
import signal
import time

import pytest
from safetensors.torch import load_file

from .dora_helpers import BASE_ASSET, QUICK, dora, history, xps

ARGS = ["run", *QUICK, f"continue_from={BASE_ASSET}", "htdemucs.lora_rank=4",
        "htdemucs.lora_rank_adaptation=true", "htdemucs.lora_gradient_batches=1",
        "epochs=2", "test.initial=false", "dset.synth.seconds=4"]


def _comparable(hist):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in hist]


def test_rank_adaptation_moves_ranks_and_resumes_exactly_after_kill_9(tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    killed_dir.mkdir()
    dora(ref_dir, *ARGS)
    (ref,) = xps(ref_dir)
    ranks = json.loads((ref / "rank_history.json").read_text())
    assert [e["epoch"] for e in ranks] == [0, 1]
    start, moved = ranks[0]["ranks"], ranks[1]["ranks"]
    assert start != moved and ranks[1]["grown"] and ranks[1]["shrunk"]
    assert 0.95 * ranks[0]["params"] <= ranks[1]["params"] <= ranks[0]["params"]
    header = json.loads((ref / "lora_last.json").read_text())
    assert header["ranks"] == moved and header["rank_adaptation"] is True
    assert "Rank adaptation after epoch 1" in (ref / "train.log").read_text()
    assert list((ref / "tensorboard").iterdir()) and (ref / "rank_history.png").exists()

    proc = dora(killed_dir, *ARGS, popen=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        folders = xps(killed_dir)
        if folders and (folders[0] / "rank_history.json").exists() and \
                (folders[0] / "checkpoint.th").exists() and len(history(folders[0])) >= 1:
            time.sleep(1.0)  # inside epoch 2, after the reallocation's checkpoint
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (xp,) = xps(killed_dir)
    assert len(history(xp)) < 2
    dora(killed_dir, *ARGS)  # resumes from checkpoint.th, at the adapted ranks
    assert "Resumed from" in (xp / "train.log").read_text()
    for a, b in zip(_comparable(history(ref)), _comparable(history(xp))):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert json.loads((xp / "rank_history.json").read_text()) == ranks
    want, got = load_file(ref / "lora_last.safetensors"), load_file(xp / "lora_last.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] - got[key]).abs().max() <= 1e-5, key


def test_rank_adaptation_under_ddp_takes_one_decision(tmp_path):
    """Two gloo processes reallocate identically (gradients all-reduced before scoring)
    and train on through the re-wrapped DDP model."""
    args = [a for a in ARGS[1:] if not a.startswith(("dset.synth.seconds", "batch_size"))]
    dora(tmp_path, "run", "-d", "--ddp_workers=2", *args, "batch_size=4",
         "dset.synth.tracks=2", "dset.synth.seconds=3")
    (xp,) = xps(tmp_path)

    def decision(log):
        text = (xp / log).read_text()
        start = text.index("Rank adaptation after epoch 1")
        return [line.strip() for line in text[start:].splitlines()[1:]
                if "->" in line and ":" in line and "[" not in line]
    assert decision("train.log") and decision("train.log") == decision("worker_1.log")
    assert len(history(xp)) == 2
    header = json.loads((xp / "lora_last.json").read_text())
    assert header["ranks"] == json.loads((xp / "rank_history.json").read_text())[-1]["ranks"]
