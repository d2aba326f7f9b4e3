"""`dora run` with htdemucs.lora_rank_adaptation=true: ranks move at the end of epoch 1,
and a run killed with SIGKILL in epoch 2 resumes exactly (layers rebuilt at the
checkpoint's ranks before any state is loaded)."""
import json

from safetensors.torch import load_file

from .dora_helpers import (BASE_ASSET, QUICK, assert_same_histories, dora, history,
                           kill_9_when, xps)

ARGS = ["run", *QUICK, f"continue_from={BASE_ASSET}", "htdemucs.lora_rank=4",
        "htdemucs.lora_rank_adaptation=true", "htdemucs.lora_gradient_batches=1",
        "epochs=2", "test.initial=false", "dset.synth.seconds=4"]


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

    def reallocated(folder):  # kill inside epoch 2, after the reallocation's checkpoint
        return ((folder / "rank_history.json").exists() and (folder / "checkpoint.th").exists()
                and len(history(folder)) >= 1)
    xp = kill_9_when(killed_dir, ARGS, reallocated)
    assert len(history(xp)) < 2
    dora(killed_dir, *ARGS)  # resumes from checkpoint.th, at the adapted ranks
    assert "Resumed from" in (xp / "train.log").read_text()
    assert_same_histories(history(ref), history(xp))
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
