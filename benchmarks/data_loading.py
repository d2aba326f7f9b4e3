"""Does the data pipeline keep up? Train DataLoader batches/s vs train steps/s.

    python -m benchmarks.data_loading [--rounds 5] [--smoke]

Synthetic stems are generated into a temporary folder (demucs_lora.data.synth), read by
the train StemDataset through the DataLoader as the demo config does (batch 4, segment
2 s + 1 s room for the random shift, num_workers 0), then augmented (shift, flips,
scale, remix); the same again with dset.augment.repitch at demucs' setting (proba 0.2),
which reads 12% longer examples, for its throughput ratio. The consumer is one LoRA r=8 train step of a tiny HTDemucs (channels 16)
on such a batch. Rounds interleave one epoch of the loader with one train step.
"""
from __future__ import annotations

import tempfile
import time
import typing as tp
from pathlib import Path

import torch
from torch.nn import functional as F

from . import common

DEMO = {"tracks": 8, "seconds": 6.0, "segment": 2.0, "shift": 1.0, "batch": 4,
        "channels": 16, "rank": 8}
SMOKE = {"tracks": 2, "seconds": 3.0, "segment": 1.0, "shift": 1.0, "batch": 2,
         "channels": 8, "rank": 8}
AUGMENT = {"shift_same": False, "flip": True, "scale": [0.25, 1.25], "remix": True}
# demucs' repitch setting (proba 0.2, +-2 semitones, tempo N(0, 5%) clipped at 12%)
REPITCH = {**AUGMENT, "repitch": {"proba": 0.2, "max_pitch": 2, "max_tempo": 12.0,
                                  "tempo_std": 5.0}}


def build_loader(root: Path, cache: Path, p: dict, augment: dict = AUGMENT):
    from torch.utils.data import DataLoader
    from demucs_lora.data.settings import DataConfig
    from demucs_lora.data.stems import StemDataset, build_augment, build_metadata, train_segment
    meta = build_metadata(root, common.SOURCES, cache)
    seconds = train_segment(DataConfig.of(segment=p["segment"], shift=p["shift"],
                                          augment=augment))
    dataset = StemDataset(root, "train", common.SOURCES, meta, segment=seconds,
                          shift=p["shift"], samplerate=common.SAMPLERATE, channels=2)
    loader = DataLoader(dataset, batch_size=p["batch"], shuffle=True, drop_last=True,
                        num_workers=0)
    return loader, build_augment(augment, common.SAMPLERATE, p["segment"])


def _augment(augment, batch):
    from demucs_lora.data.stems import augment_batch
    return augment_batch(augment, batch)


def epoch_time(loader, augment) -> tp.Tuple[int, float, float]:
    """(batches, seconds reading, seconds augmenting) of one epoch."""
    n, read, aug = 0, 0.0, 0.0
    start = time.perf_counter()
    for batch in loader:
        mid = time.perf_counter()
        _augment(augment, batch)
        end = time.perf_counter()
        read += mid - start
        aug += end - mid
        n += 1
        start = time.perf_counter()
    return n, read, aug


def build_trainer(p: dict, seed: int):
    model, _ = common.build(common.model_config("tiny", p["segment"], channels=p["channels"],
                                                lora_rank=p["rank"]), seed)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step(batch):
        stems = batch[:, 1:]
        estimate = model(batch[:, 0])
        loss = F.l1_loss(estimate, stems)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optimizer.step()
    return model, step


def measure(args, p: dict) -> dict:
    from demucs_lora.data.synth import generate_dataset
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        start = time.perf_counter()
        generate_dataset(root, tracks=p["tracks"], seconds=p["seconds"], seed=args.seed)
        generate_s = time.perf_counter() - start
        loader, augment = build_loader(root, Path(tmp) / "metadata", p)
        repitched = build_loader(root, Path(tmp) / "metadata", p, REPITCH)
        model, step = build_trainer(p, args.seed)
        batch = _augment(augment, next(iter(loader)))
        epoch_time(loader, augment)  # warmup: file cache, first allocations
        epoch_time(*repitched)
        step(batch)
        rows = []
        for i in range(args.rounds):
            order = ["data", "repitch", "train"] if i % 2 == 0 else ["train", "repitch", "data"]
            row = {}
            for what in order:
                if what == "data":
                    row["batches"], row["read_s"], row["augment_s"] = epoch_time(loader, augment)
                elif what == "repitch":
                    batches, read_s, augment_s = epoch_time(*repitched)
                    row["repitch_batch_s"] = (read_s + augment_s) / max(1, batches)
                else:
                    row["step_s"], _ = common.timed(lambda: step(batch))
            row["data_batch_s"] = (row["read_s"] + row["augment_s"]) / max(1, row["batches"])
            row["read_batch_s"] = row["read_s"] / max(1, row["batches"])
            row["ratio"] = row["step_s"] / row["data_batch_s"]
            row["ratio_read_only"] = row["step_s"] / row["read_batch_s"]
            row["repitch_cost"] = row["repitch_batch_s"] / row["data_batch_s"]
            rows.append(row)
            print(f"round {i + 1}/{args.rounds}: {row['batches']} batches in "
                  f"{row['read_s'] + row['augment_s']:.3f}s, step {row['step_s']:.3f}s, "
                  f"ratio {row['ratio']:.1f}x", flush=True)
    return {"rounds": rows, "generate_s": generate_s,
            "examples": len(loader.dataset), "batches_per_epoch": len(loader)}


def summarize(raw: dict) -> tp.Tuple[dict, tp.List[dict]]:
    rows = raw["rounds"]
    med = {k: common.median([r[k] for r in rows])
           for k in ("data_batch_s", "read_batch_s", "step_s", "ratio", "ratio_read_only",
                     "repitch_batch_s", "repitch_cost")}
    summary = {
        "loader_batches_per_s": 1.0 / med["data_batch_s"],
        "loader_batches_per_s_read_only": 1.0 / med["read_batch_s"],
        "train_steps_per_s": 1.0 / med["step_s"],
        "ratio": med["ratio"], "ratio_read_only": med["ratio_read_only"],
        "loader_batches_per_s_repitch": 1.0 / med["repitch_batch_s"],
        "repitch_throughput_ratio": 1.0 / med["repitch_cost"],
        "rounds": rows, "examples": raw["examples"],
        "batches_per_epoch": raw["batches_per_epoch"], "generate_s": raw["generate_s"]}
    targets = [common.target_row("loader (read + augment) batches/s / train steps/s",
                                 med["ratio"], 10.0, op=">=")]
    return summary, targets


def report(summary: dict, targets: tp.List[dict]) -> str:
    rows = [["train DataLoader + augment", f"{summary['loader_batches_per_s']:.1f}"],
            ["train DataLoader (read only)", f"{summary['loader_batches_per_s_read_only']:.1f}"],
            ["train DataLoader + augment + repitch (proba 0.2)",
             f"{summary['loader_batches_per_s_repitch']:.1f}"],
            ["LoRA train step (consumer)", f"{summary['train_steps_per_s']:.2f}"]]
    text = common.format_table(["pipeline stage", "batches/s"], rows)
    text += (f"\nratio (loader / step): {summary['ratio']:.1f}x with augmentation, "
             f"{summary['ratio_read_only']:.1f}x read only"
             f"\nrepitch: the loader delivers {summary['repitch_throughput_ratio']:.2f}x the "
             "batches/s it delivers without it")
    return text + "\ntargets:\n" + common.format_targets(targets)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=5)
    # the consumer step runs as training would, on all cores (a faster step is the
    # conservative side for this ratio); both sides are timed in wall-clock seconds
    parser.set_defaults(threads=torch.get_num_threads())
    args = common.finish_args(parser.parse_args(argv))
    common.setup_torch(args)
    p = SMOKE if args.smoke else DEMO
    machine = common.describe_machine("cpu")
    settings = {"tracks": p["tracks"], "track_seconds": p["seconds"], "batch": p["batch"],
                "segment_s": p["segment"], "num_workers": 0, "rounds": args.rounds,
                "threads": args.threads, "time_metric": "wall",
                "consumer": f"tiny HTDemucs channels={p['channels']} LoRA r={p['rank']}"}
    print(common.header("data loading vs train step", machine, settings), flush=True)
    summary, targets = summarize(measure(args, p))
    print(report(summary, targets))
    result = {"benchmark": "data_loading", "machine": machine, "settings": settings,
              **summary, "targets": targets}
    path = common.write_result("data_loading", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
