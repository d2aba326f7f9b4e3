"""`make demo`: the main job end to end, with the same commands a user types.

1. synthetic data: 4-stem domain A and 5-stem domain B [other, kick, vocals, bass, hihat]
2. `python -m tools.verify_dataset` on both
3. the base: the shipped tiny HTDemucs trained on domain A (`--retrain-base` rebuilds it)
4. `dora run continue_from=BASE htdemucs.lora_rank=8 variant=five_stem ...` (LoRA, 4 -> 5 stems)
5. `python -m tools.test_pretrained` before (base + source_init heads) and after adaptation
6. `python -m tools.export SIG --include-lora`, then the stock `demucs` CLI separates a mix
7. a summary: where everything is, and the SDR per source before and after

`make base` (`--make-base`) retrains the shipped base with BASE_ARGS and rewrites
demucs_lora/assets/base_tiny_A.{th,json}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import DemucsLoRAError, exit_on_user_error
from demucs_lora.core.files import atomic_torch_save, atomic_write_text
from demucs_lora.core.paths import ASSETS_DIR, REPO_DIR

REPO = REPO_DIR
ASSET = ASSETS_DIR / "base_tiny_A.th"
ASSET_INFO = ASSET.with_suffix(".json")
# The exact command that made the shipped base (seed 0, synthetic domain A, 4 stems).
BASE_ARGS = ["model=htdemucs_tiny", "dset.synth.tracks=24", "dset.synth.valid_tracks=4",
             "dset.synth.test_tracks=4", "dset.synth.seconds=8", "epochs=12", "batch_size=4",
             "optim.lr=1e-3", "optim.warmup_steps=50", "seed=0"]
# Domain B, 5 stems: what the demo adapts to (a few minutes on 2 CPU cores).
DATA_B = ["dset.synth.tracks=8", "dset.synth.valid_tracks=2", "dset.synth.test_tracks=2",
          "dset.synth.seconds=8", "dset.segment=2"]
ADAPT_ARGS = ["model=htdemucs_tiny", "htdemucs.lora_rank=8", "variant=five_stem", *DATA_B,
              "epochs=6", "batch_size=4", "optim.lr=2e-3", "optim.warmup_steps=10"]


def _step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def _run(*args: str) -> None:
    """Run a CLI as the user would, from the repository root; stop the demo if it fails."""
    print("$ " + " ".join(("python",) + args if args[0] == "-m" else args), flush=True)
    proc = subprocess.run([sys.executable, *args] if args[0] == "-m" else list(args),
                          cwd=REPO)
    _stop_on_failure(proc.returncode)


def _stop_on_failure(code: int) -> None:
    if code != 0:  # the step's own status: 2 config/usage, 1 data/model, ...
        print(f"error: demo: this step failed (exit {code}); see the output above",
              file=sys.stderr)
        sys.exit(code)


def _dora(*args: str) -> Path:
    """``dora run ARGS`` from the repository root; the XP folder it wrote."""
    from demucs_lora.train import xp_folder_in
    from demucs_lora.training.dora_run import run_dora
    print("$ python -m dora -P demucs_lora run " + " ".join(args), flush=True)
    _stop_on_failure(run_dora(["run", *args], REPO).returncode)
    return xp_folder_in(args, REPO)


def make_base() -> Path:
    """Train the base on domain A and write the fp16 asset plus how it was made."""
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora.models.load import load_model
    _step("Training the base on synthetic domain A (dora run " + " ".join(BASE_ARGS) + ")")
    xp = _dora(*BASE_ARGS)
    model = load_model(xp / "best.th")
    atomic_torch_save(serialize_model(model, OmegaConf.create({}), half=True), ASSET)
    history = json.loads((xp / "history.json").read_text())
    best = max(history, key=lambda h: h.get("valid_nsdr", float("-inf")))
    info = {"command": "dora run " + " ".join(BASE_ARGS), "seed": 0, "xp": xp.name,
            "epochs": len(history), "best_epoch": best["epoch"],
            "valid_nsdr": {k[len("valid_nsdr_"):]: round(v, 3) for k, v in best.items()
                           if k.startswith("valid_nsdr_")},
            "valid_nsdr_mean": round(best["valid_nsdr"], 3), "stored": "float16",
            "params": sum(p.numel() for p in model.parameters())}
    atomic_write_text(ASSET_INFO, json.dumps(info, indent=2) + "\n")
    print(f"wrote {ASSET} ({ASSET.stat().st_size / 1e6:.1f} MB) and {ASSET_INFO}")
    return ASSET


def _table(before: dict, after: dict) -> str:
    """nSDR per source (and mean) before and after, from test_pretrained's JSON files."""
    lines = [f"{'source':<10} {'before':>8} {'after':>8} {'gain':>8}   (nSDR, dB, test split)"]
    for name in list(after["sources"]) + ["mean"]:
        key = "nsdr" if name == "mean" else f"nsdr_{name}"
        b, a = before["summary"][key], after["summary"][key]
        lines.append(f"{name:<10} {b:>8.2f} {a:>8.2f} {a - b:>+8.2f}")
    return "\n".join(lines)


def _test_mixture(xp: Path) -> tp.Optional[Path]:
    """A mixture of the test split the XP was trained on (for the stock CLI)."""
    from omegaconf import OmegaConf
    from demucs_lora.config.run_config import data_config
    from demucs_lora.data.stems import dataset_root
    cfg = OmegaConf.load(xp / "config.yaml")
    mixes = sorted(dataset_root(data_config(cfg), progress=False).glob(
        "test/*/mixture.wav"))
    return mixes[0] if mixes else None


def demo(out: Path, retrain_base: bool) -> None:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    _step("1-2. Synthetic datasets (generated on first use) and verify_dataset on both")
    _run("-m", "tools.verify_dataset", "model=htdemucs_tiny", "--no-progress")
    _run("-m", "tools.verify_dataset", "variant=five_stem", *DATA_B, "--no-progress")
    _step("3. The base model")
    base = make_base() if retrain_base or not ASSET.exists() else ASSET
    print(f"using {base.relative_to(REPO)}: " + ASSET_INFO.read_text().strip()
          if ASSET_INFO.exists() else "")
    _step("4. LoRA adaptation to domain B, 4 -> 5 stems (kick and hi-hat from the drums head)")
    args = [f"continue_from={base.relative_to(REPO)}", *ADAPT_ARGS]
    xp = _dora(*args)
    _step("5. Test split: before (base + source_init heads) and after adaptation")
    _run("-m", "tools.test_pretrained", "-n", str(base), "--adapter", str(xp / "lora_init"),
         "--json", str(out / "before.json"), "--no-progress")
    _run("-m", "tools.test_pretrained", "-n", xp.name, "--json", str(out / "after.json"),
         "--no-progress")
    _step("6. Export (merged model + adapter) and separation with the stock demucs CLI")
    release = out / "release_models"
    _run("-m", "tools.export", xp.name, "--include-lora", "-o", str(release), "--force",
         "--no-eval")
    mix = _test_mixture(xp)
    separated = out / "separated"
    if mix is not None:
        _run("-m", "demucs", "--repo", str(release), "-n", xp.name, str(mix),
             "-o", str(separated))
    _step("7. Summary")
    before = json.loads((out / "before.json").read_text())
    after = json.loads((out / "after.json").read_text())
    print(_table(before, after))
    stems = sorted(separated.glob(f"{xp.name}/*/*.wav")) if mix is not None else []
    print(f"""
XP folder       {xp}  (history.json, train.log, lora_best.*, ranks.json, best.th)
tensorboard     tensorboard --logdir {xp / 'tensorboard'}
exported        {release}/{xp.name}.th (+ .lora.safetensors/.json)
stems           {stems[0].parent if stems else '(no mixture found)'}
base            {base} ({ASSET_INFO.name} says how it was made)
elapsed         {time.time() - start:.0f} s""")
    atomic_write_text(out / "summary.json", json.dumps(
        {"xp": xp.name, "nsdr_before": before["summary"]["nsdr"],
         "nsdr_after": after["summary"]["nsdr"]}, indent=2))


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demucs_lora.commands.demo",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-base", action="store_true", help="only retrain the base")
    parser.add_argument("--retrain-base", action="store_true",
                        help="retrain the base before the demo instead of the shipped one")
    parser.add_argument("-o", "--out", type=Path, default=REPO / "demo_out")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.make_base:
            make_base()
            return
        if shutil.which("dora") is None and not (Path(sys.executable).parent / "dora").exists():
            raise DemucsLoRAError("dora is not installed: run `make demo` (it installs "
                                  "everything)")
        demo(args.out, args.retrain_base)


if __name__ == "__main__":
    main()
