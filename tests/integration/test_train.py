"""`dora run` end to end: full training, LoRA adaptation, the XP folder, -f, dora info."""
import json

import torch
from safetensors import safe_open

from .dora_helpers import (BASE_ASSET, QUICK, assert_same_histories, dora, history,
                           kill_9_when, tool, xps)

XP_FILES = ["config.yaml", "train.log", "history.json", "checkpoint.th", "best.th",
            "lora_best.safetensors", "lora_best.json", "lora_last.safetensors",
            "lora_last.json", "lora_init.safetensors", "ranks.json", "tensorboard", "validation", ".argv.json"]


def test_full_finetune_then_continue_from_sig(tmp_path):
    dora(tmp_path, "run", *QUICK, "test.initial=false")
    (xp,) = xps(tmp_path)
    hist = history(xp)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert not (xp / "ranks.json").exists() and (xp / "best.th").exists()
    # continue_from=SIG picks up that XP's best.th as the base of a LoRA run.
    dora(tmp_path, "run", *QUICK, f"continue_from={xp.name}", "htdemucs.lora_rank=4",
         "epochs=1")
    new = [p for p in xps(tmp_path) if p != xp]
    assert len(new) == 1 and (new[0] / "lora_best.safetensors").exists()
    info = dora(tmp_path, "info", "-f", xp.name)
    assert xp.name in info.stdout + info.stderr


def test_lora_adaptation_to_domain_b_gains_nsdr(tmp_path):
    assert BASE_ASSET.exists(), "the shipped base is part of the repository (make base)"
    dora(tmp_path, "run", *QUICK, f"continue_from={BASE_ASSET}", "htdemucs.lora_rank=8",
         "dset.synth.domain=B", "dset.synth.tracks=4", "epochs=3", "max_batches=6",
         "optim.lr=3e-3", "htdemucs.lora_rank_mode=heuristic",
         "htdemucs.layer_ranks={\"encoder.0.*\":4}")
    (xp,) = xps(tmp_path)
    for name in XP_FILES:
        assert (xp / name).exists(), f"{name} missing from {xp}"
    hist = history(xp)
    before, after = hist[0]["valid_initial_nsdr"], max(h["valid_nsdr"] for h in hist)
    print(f"valid nSDR on domain B: base {before:.3f} dB -> adapted {after:.3f} dB")
    assert after > before + 0.1
    ranks = json.loads((xp / "ranks.json").read_text())
    assert ranks["mode"] == "heuristic"
    assert ranks["ranks"]["encoder.0.conv"] == 4  # the layer_ranks override
    assert "decoder.3.conv_tr" not in ranks["ranks"]  # heuristic: outermost rank 0
    header = json.loads((xp / "lora_best.json").read_text())
    assert header["ranks"] == ranks["ranks"]
    assert sorted((xp / "validation").iterdir())[0].name == "epoch_000.json"
    # The trained XP exports, and the stock demucs CLI separates with the exported model.
    tool(tmp_path, "tools.export", xp.name, "--include-lora", "-o", "release", "--no-eval")
    assert (tmp_path / "release" / f"{xp.name}.th").exists()
    assert (tmp_path / "release" / f"{xp.name}.lora.safetensors").exists()
    mix = sorted(tmp_path.glob("metadata/synth/*/test/*/mixture.wav"))[0]
    tool(tmp_path, "demucs", "--repo", "release", "-n", xp.name, str(mix), "-o", "sep",
         "--shifts", "0")
    stems = sorted(p.name for p in tmp_path.glob(f"sep/{xp.name}/*/*.wav"))
    assert stems == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]


def test_five_stem_variant_from_four_stem_base(tmp_path):
    dora(tmp_path, "run", "variant=five_stem", f"continue_from={BASE_ASSET}",
         "htdemucs.lora_rank=4", "epochs=1", "max_batches=2", "batch_size=2",
         "dset.synth.tracks=2", "dset.synth.valid_tracks=1", "dset.synth.test_tracks=1",
         "dset.synth.seconds=3", "dset.segment=1", "test.initial=false",
         "htdemucs.lora_save_dtype=float16")
    (xp,) = xps(tmp_path)
    header = json.loads((xp / "lora_best.json").read_text())
    assert header["sources"] == ["other", "kick", "vocals", "bass", "hihat"]
    assert header["source_init"] == {"kick": "drums", "hihat": "drums"}
    assert header["save_dtype"] == "float16"
    with safe_open(str(xp / "lora_best.safetensors"), "pt") as f:
        head = f.get_tensor("decoder.3.conv_tr.weight")
        factors = {f.get_tensor(k).dtype for k in f.keys() if ".lora_" in k}
    assert head.shape[1] == 5 * 2 * 2  # 5 sources x 2 channels x complex-as-channels
    assert head.dtype == torch.float32 and factors == {torch.float16}  # heads kept float32
    package = torch.load(xp / "best.th", weights_only=False)
    assert package["kwargs"]["sources"] == header["sources"]
    assert set(history(xp)[0]) >= {f"valid_nsdr_{s}" for s in header["sources"]}


def test_from_sig_starts_from_that_config(tmp_path):
    dora(tmp_path, "run", *QUICK, "epochs=1", "test.initial=false")
    (xp,) = xps(tmp_path)
    dora(tmp_path, "run", "-f", xp.name, "epochs=2")
    new = [p for p in xps(tmp_path) if p != xp]
    assert len(new) == 1
    argv = json.loads((new[0] / ".argv.json").read_text())
    assert "model=htdemucs_tiny" in argv and "epochs=2" in argv
    assert len(history(new[0])) == 2


def test_bad_config_fails_before_compute(tmp_path):
    proc = dora(tmp_path, "run", *QUICK, "htdemucs.lora_rank_mode=magic", check=False)
    assert proc.returncode != 0
    assert "htdemucs.lora_rank_mode" in proc.stderr and "gradient" in proc.stderr
    assert not list(tmp_path.glob("outputs/xps/*/checkpoint.th"))
    assert not (tmp_path / "metadata").exists()  # nothing generated, nothing trained


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    # optim.accumulate=2: checkpoints fall on optimizer-step boundaries only
    args = ["run", *QUICK, "epochs=3", "test.initial=false", "dset.synth.seconds=4",
            "optim.accumulate=2"]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    killed_dir.mkdir()
    dora(ref_dir, *args)
    reference = history(xps(ref_dir)[0])
    xp = kill_9_when(killed_dir, args, lambda folder: len(history(folder)) >= 1 and
                     (folder / "checkpoint.th").exists())  # inside epoch 2
    assert len(history(xp)) < 3
    dora(killed_dir, *args)  # the same command resumes from checkpoint.th
    resumed = history(xp)
    assert len(resumed) == 3
    assert_same_histories(reference, resumed)
    assert "Resumed from" in (xp / "train.log").read_text()


def test_ema_amp_checkpointing_profiling_budget(tmp_path):
    dora(tmp_path, "run", *QUICK, f"continue_from={BASE_ASSET}", "htdemucs.lora_rank=4",
         "optim.ema=0.9", "mixed_precision=bf16", "enable_checkpointing=true",
         "enable_profiling=true", "test.initial=false", "max_batches=5", "epochs=3",
         "train_budget_seconds=0.001")
    (xp,) = xps(tmp_path)
    hist = history(xp)
    assert len(hist) == 1  # the budget stopped it after the first epoch
    assert all(map(lambda v: v == v, (hist[0]["train_loss"], hist[0]["valid_nsdr"])))
    assert list((xp / "profile").iterdir()), "enable_profiling wrote no trace"
    assert "train_budget_seconds" in (xp / "train.log").read_text()
