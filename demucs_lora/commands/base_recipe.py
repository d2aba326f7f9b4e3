"""`make base-medium`: pre-train the mid-size base in resumable chunks, with its recipe.

The quality protocol (docs/quality.md) needs a base where LoRA is low-rank:
`conf/model/htdemucs_medium.yaml` (4.08 M parameters, uniform r=8 = 6.7 %). Training it to
a plateau takes many CPU hours, more than one sitting, and `outputs/` (Dora's XP folders,
with their full checkpoints) is not kept between sittings. So the pre-training runs in
**chunks**, each a plain `dora run` of `CHUNK_EPOCHS` epochs (cosine schedule inside the
chunk, i.e. warm restarts), and after each chunk the best model of the chunk is written, in
float16, to `demucs_lora/assets/base_medium_A.th`, with the recipe and the valid nSDR curve
so far in `base_medium_A.json`. Both are small enough to commit (~8 MB).

Resuming: run the same command again. It reads the JSON, and chunk k starts from the
asset with `continue_from=` (fresh Adam state: a warm restart) and `seed=k`. Within a
sitting, a chunk that was killed resumes exactly from its XP's checkpoint.th (same
arguments, same Dora signature). It stops once the valid nSDR stops rising: no gain of
`MIN_GAIN_DB` over the best before the last `PATIENCE` chunks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import exit_on_user_error
from demucs_lora.core.files import atomic_torch_save, atomic_write_text
from demucs_lora.core.paths import ASSETS_DIR, CONF_DIR, REPO_DIR

MEDIUM_ASSET = ASSETS_DIR / "base_medium_A.th"
# Synthetic domain A, 4 stems, as the tiny base but twice the tracks (a 9x larger model).
MEDIUM_ARGS = ["model=htdemucs_medium", "dset.synth.tracks=48", "dset.synth.valid_tracks=4",
               "dset.synth.test_tracks=4", "dset.synth.seconds=8", "batch_size=4",
               "max_batches=40", "optim.lr=1e-3", "optim.warmup_steps=20"]
CHUNK_EPOCHS = 3
PATIENCE = 2          # chunks without a gain of MIN_GAIN_DB: the curve has stopped rising
MIN_GAIN_DB = 0.1
MAX_CHUNKS = 40


def chunk_args(base_args: tp.Sequence[str], chunk: int, asset: Path,
               epochs: int = CHUNK_EPOCHS) -> tp.List[str]:
    """The `dora run` overrides of chunk `chunk` (0: from scratch; k: from the asset)."""
    args = [*base_args, f"epochs={epochs}", f"seed={chunk}"]
    if chunk == 0:
        return args
    try:
        start = asset.relative_to(REPO_DIR)
    except ValueError:
        start = asset
    return [*args, f"continue_from={start}", "test.initial=false"]


def converged(chunks: tp.Sequence[dict], patience: int = PATIENCE,
              min_gain: float = MIN_GAIN_DB) -> bool:
    """True when the best valid nSDR of the last `patience` chunks is not `min_gain` dB
    above the best of the chunks before them."""
    if len(chunks) <= patience:
        return False
    before = max(c["best_valid_nsdr"] for c in chunks[:-patience])
    recent = max(c["best_valid_nsdr"] for c in chunks[-patience:])
    return recent < before + min_gain


def dora_run(args: tp.Sequence[str], workdir: Path = REPO_DIR) -> None:
    """`dora run ARGS` in `workdir` (the repository root), as a user types it; its exit
    status ends this command when it fails."""
    from demucs_lora.training.dora_run import run_dora
    print("$ python -m dora run " + " ".join(args), flush=True)
    code = run_dora(["run", *args], workdir).returncode
    if code != 0:
        print(f"error: base recipe: dora run failed (exit {code})", file=sys.stderr)
        sys.exit(code)


def save_base(xp: Path, asset: Path) -> int:
    """The XP's best.th as a float16 demucs package at `asset`; its parameter count."""
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora.models.load import load_model
    model = load_model(xp / "best.th")
    atomic_torch_save(serialize_model(model, OmegaConf.create({}), half=True), asset)
    return sum(p.numel() for p in model.parameters())


def chunk_record(xp: Path, chunk: int, args: tp.Sequence[str], seconds: float) -> dict:
    """What a finished chunk adds to the recipe: its XP, command and valid curve."""
    history = json.loads((xp / "history.json").read_text())
    curve = [round(h["valid_nsdr"], 3) for h in history if "valid_nsdr" in h]
    record = {"chunk": chunk, "xp": xp.name, "command": "dora run " + " ".join(args),
              "valid_nsdr": curve, "best_valid_nsdr": max(curve),
              "train_seconds": round(sum(h.get("train_seconds", 0.0) for h in history), 1),
              "wall_seconds": round(seconds, 1)}
    initial = history[0].get("valid_initial_nsdr") if history else None
    if initial is not None:
        record["valid_initial_nsdr"] = round(initial, 3)
    return record


def read_recipe(asset: Path) -> dict:
    info = asset.with_suffix(".json")
    return json.loads(info.read_text()) if info.exists() else {}


def train_base(asset: Path = MEDIUM_ASSET, base_args: tp.Sequence[str] = tuple(MEDIUM_ARGS),
               epochs: int = CHUNK_EPOCHS, max_chunks: int = MAX_CHUNKS,
               stop_after: tp.Optional[int] = None, workdir: Path = REPO_DIR) -> dict:
    """Run chunks until the curve stops rising (or `max_chunks`, or `stop_after` chunks in
    this call); the recipe JSON is rewritten after every chunk."""
    from demucs_lora.train import xp_folder_in
    recipe = read_recipe(asset)
    chunks = list(recipe.get("chunks", []))
    done_now = 0
    while not converged(chunks) and len(chunks) < max_chunks and \
            (stop_after is None or done_now < stop_after):
        k = len(chunks)
        args = chunk_args(base_args, k, asset, epochs)
        start = time.time()
        dora_run(args, workdir)
        xp = xp_folder_in(args, workdir)
        params = save_base(xp, asset)
        chunks.append(chunk_record(xp, k, args, time.time() - start))
        recipe = _recipe(base_args, epochs, chunks, params)
        atomic_write_text(asset.with_suffix(".json"), json.dumps(recipe, indent=2) + "\n")
        print(f"chunk {k}: best valid nSDR {chunks[-1]['best_valid_nsdr']:.3f} dB; "
              f"wrote {asset} and its .json", flush=True)
        done_now += 1
    return ship_best_chunk(asset, workdir) if converged(chunks) else recipe


def ship_best_chunk(asset: Path, workdir: Path = REPO_DIR) -> dict:
    """Once converged, the asset is the best chunk's model (each chunk wrote its own best,
    and a later chunk may have ended lower): rewritten from that chunk's XP when it is
    still there, and the JSON says which chunk and valid nSDR the shipped file has."""
    from omegaconf import OmegaConf
    recipe = read_recipe(asset)
    chunks = recipe["chunks"]
    best = max(chunks, key=lambda c: c["best_valid_nsdr"])
    if recipe.get("asset", {}).get("chunk") == best["chunk"]:
        return recipe
    if best is not chunks[-1]:
        xp = Path(workdir) / OmegaConf.load(CONF_DIR / "config.yaml").dora.dir / "xps" / \
            best["xp"]
        if not (xp / "best.th").is_file():
            print(f"note: chunk {best['chunk']}'s XP {xp} is gone: the asset stays chunk "
                  f"{chunks[-1]['chunk']}'s model", file=sys.stderr)
            best = chunks[-1]
        else:
            save_base(xp, asset)
    recipe["asset"] = {"chunk": best["chunk"], "xp": best["xp"],
                       "valid_nsdr": best["best_valid_nsdr"]}
    atomic_write_text(asset.with_suffix(".json"), json.dumps(recipe, indent=2) + "\n")
    print(f"converged: {asset} is chunk {best['chunk']}'s model (valid nSDR "
          f"{best['best_valid_nsdr']:.3f} dB)", flush=True)
    return recipe


def _recipe(base_args: tp.Sequence[str], epochs: int, chunks: tp.List[dict], params: int
            ) -> dict:
    curve = [v for c in chunks for v in c["valid_nsdr"]]
    initial = chunks[0].get("valid_initial_nsdr") if chunks else None
    return {"command": "make base-medium  (python -m demucs_lora.commands.base_recipe)",
            "base_args": list(base_args), "chunk_epochs": epochs, "seed": "chunk index",
            "params": params, "stored": "float16",
            "status": "converged" if converged(chunks) else "training",
            "epochs": len(curve), "valid_initial_nsdr": initial,
            "valid_nsdr_curve": curve,
            "best_valid_nsdr": max(curve),
            "train_hours": round(sum(c["train_seconds"] for c in chunks) / 3600, 2),
            "wall_hours": round(sum(c["wall_seconds"] for c in chunks) / 3600, 2),
            "chunks": chunks}


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demucs_lora.commands.base_recipe",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=None,
                        help="stop after this many chunks in this call (default: until the "
                             "valid nSDR stops rising)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        recipe = train_base(stop_after=args.chunks)
        print(json.dumps({k: v for k, v in recipe.items() if k != "chunks"}, indent=2))


if __name__ == "__main__":
    main()
