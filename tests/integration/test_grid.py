"""`dora grid rank_modes` on a real local Slurm, plus what changes a signature."""
import json
import time

from .dora_helpers import BASE_ASSET, dora, xps

# Seconds per XP: one short epoch of the tiny base on synthetic domain B.
GRID_ARGS = (f"model=htdemucs_tiny variant=debug continue_from={BASE_ASSET} "
             "dset.synth.domain=B epochs=1 max_batches=2 test.initial=false "
             "slurm.partition=local slurm.mem_per_gpu=2 slurm.time=20")
MODES = ["full", "uniform", "heuristic", "gradient"]


def _grid(cwd, *args, extra_env=None, timeout=900):
    return dora(cwd, "grid", "rank_modes", *args, timeout=timeout, check=False,
                extra_env={"DEMUCS_LORA_GRID_ARGS": GRID_ARGS, **(extra_env or {})})


def test_signatures_follow_semantic_keys_only():
    from demucs_lora.train import main
    base = ["model=htdemucs_tiny", "htdemucs.lora_rank=8"]
    sig = main.get_xp(base).sig
    for same in (["misc.num_workers=4"], ["misc.num_prints=10"], ["slurm.gpus=2"],
                 ["dset.metadata=/elsewhere"], ["device=cpu"]):
        assert main.get_xp(base + same).sig == sig, same
    others = [["htdemucs.lora_rank=4"], ["htdemucs.lora_rank_mode=gradient"],
              ["optim.lr=1e-3"], ["dset.wav=/data/stems"], ["variant=five_stem"],
              ['htdemucs.layer_ranks={"encoder.0.*":4}']]
    sigs = {main.get_xp(base + other).sig for other in others}
    assert sig not in sigs and len(sigs) == len(others)
    # The dict keys users fill on the command line (null defaults, not {}).
    xp = main.get_xp(base + ["sources=[other,kick,vocals,bass,hihat]",
                             "source_init={kick:drums,hihat:drums}",
                             "htdemucs.layer_ranks={encoder.0.*:4,transformer.*:16}"])
    assert dict(xp.cfg.source_init) == {"kick": "drums", "hihat": "drums"}
    assert dict(xp.cfg.htdemucs.layer_ranks) == {"encoder.0.*": 4, "transformer.*": 16}
    # JSON-style and Hydra-style dict overrides are the same experiment.
    assert main.get_xp(base + ["htdemucs.layer_ranks={encoder.0.*:4}"]).sig == \
        main.get_xp(base + ['htdemucs.layer_ranks={"encoder.0.*":4}']).sig


def test_grid_dry_run_and_init_without_slurm(tmp_path):
    proc = _grid(tmp_path, "--dry_run", "--init", extra_env={"SLURM_CONF": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6" in proc.stdout or len(xps(tmp_path)) == 6
    assert len(xps(tmp_path)) == 6  # --init made the XP folders, nothing was launched
    assert not list(tmp_path.glob("outputs/xps/*/history.json"))


def test_grid_on_local_slurm(tmp_path, slurm_cluster):
    # Only this test's jobs: the cluster's accounting keeps earlier sessions' jobs, and
    # the same grid signs its XPs alike (a killed earlier run would show FAILED).
    since = ("-S", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1)))
    proc = _grid(tmp_path, "-i", "0.05", extra_env=slurm_cluster.env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    folders = xps(tmp_path)
    assert len(folders) == 6, text[-4000:]
    for xp in folders:
        log = xp / "train.log"
        assert (xp / "history.json").exists(), (log.read_text()[-3000:] if log.exists()
                                                else text[-3000:])
        assert json.loads((xp / "history.json").read_text())[-1]["epoch"] == 1
        argv = json.loads((xp / ".argv.json").read_text())
        if "htdemucs.lora_rank=0" not in argv:
            assert (xp / "lora_best.safetensors").exists()
    grid_dir = tmp_path / "outputs" / "grids" / "rank_modes"
    assert len(list(grid_dir.iterdir())) >= 6
    for mode in MODES:
        assert mode in proc.stdout, proc.stdout[-3000:]
    jobs = slurm_cluster.run("sacct", "-X", "-n", "-P", *since, "-o", "JobName,State")
    states = [line.split("|")[1] for line in jobs.strip().splitlines()
              if line.split("|")[0] in {f"demucs_lora_{f.name}" for f in folders}]
    assert states and all(s == "COMPLETED" for s in states), jobs
    # Re-running the grid does not launch finished XPs again.
    again = _grid(tmp_path, "-i", "0.05", extra_env=slurm_cluster.env)
    assert again.returncode == 0
    jobs_after = slurm_cluster.run("sacct", "-X", "-n", "-P", *since, "-o", "JobName")
    assert len(jobs_after.strip().splitlines()) == len(jobs.strip().splitlines())
    (tmp_path / "grid_table.txt").write_text(proc.stdout)
    print(proc.stdout[-4000:])
