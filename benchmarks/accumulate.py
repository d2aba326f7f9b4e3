"""Peak memory of one optimizer step at batch 4 against batch 1 x optim.accumulate=4.

    python -m benchmarks.accumulate [--segment 4] [--batch 4] [--device cuda]
    python -m benchmarks.accumulate --smoke

Both configurations see the same 4 examples per optimizer step (the solver's
`optim.accumulate`: each micro-batch's loss / N backpropagated, then one clip + Adam step)
on the released architecture with LoRA r=8 (uniform), each in its own fresh process
(peak memory = peak RSS over the RSS after the model is built; CUDA:
max_memory_allocated over the allocation after the build), side by side in one run.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback
import typing as tp

import torch
from torch.nn import functional as F

from . import common

CONFIGS = {"batch4": (4, 1), "batch1_x4": (1, 4)}   # (micro-batch, accumulate)
SEGMENT = 4.0      # seconds, as the CPU train-step benchmark (7.8 s is ~35 s/step on CPU)


def optimizer_step(model, optimizer, params, stems: torch.Tensor, accumulate: int) -> None:
    """What Solver._backward + _train_step do: N micro-batches, loss / N, one step."""
    optimizer.zero_grad(set_to_none=True)
    for micro in stems.chunk(accumulate):
        estimate = model(micro.sum(dim=1))
        (F.l1_loss(estimate, micro) / accumulate).backward()
    torch.nn.utils.clip_grad_norm_(params, float("inf"))
    optimizer.step()


def worker(conn, spec: dict) -> None:
    """One configuration in a fresh process: (peak delta bytes, step seconds) or an error."""
    try:
        torch.set_num_threads(spec["threads"] or torch.get_num_threads())
        micro, accumulate = CONFIGS[spec["name"]]
        cfg = common.model_config(spec["size"], spec["segment"], lora_rank=8,
                                  lora_rank_mode="uniform")
        model, _ = common.build(cfg, spec["seed"])
        model.to(spec["device"]).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        gen = torch.Generator().manual_seed(spec["seed"])
        length = int(spec["segment"] * common.SAMPLERATE)
        stems = (0.1 * torch.randn(micro * accumulate, len(common.SOURCES), 2, length,
                                   generator=gen)).to(spec["device"])
        meter = common.PeakMemory(spec["device"])
        meter.start()
        seconds = [common.timed(lambda: optimizer_step(model, optimizer, params, stems,
                                                       accumulate), spec["device"])[0]
                   for _ in range(spec["steps"])]
        conn.send({"ok": True, "peak": meter.peak_delta(), "step_s": common.median(seconds)})
    except Exception:  # report to the parent instead of dying silently
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def measure(spec: dict) -> tp.Dict[str, dict]:
    """One fresh process per configuration, one after the other (peaks do not overlap)."""
    common.passive_omp()
    ctx = mp.get_context("spawn")
    out = {}
    for name in CONFIGS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, dict(spec, name=name)), daemon=True)
        proc.start()
        child.close()
        try:
            out[name] = parent.recv()
        except EOFError:
            out[name] = {"ok": False, "error": f"worker {name} died (out of memory?)"}
        proc.join(timeout=60)
        print(f"{name}: {out[name]}", flush=True)
    return out


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=2)
    parser.add_argument("--segment", type=float, default=None,
                        help=f"seconds per example (default {SEGMENT}; smoke: 1)")
    args = common.finish_args(parser.parse_args(argv))
    common.setup_torch(args)
    size = "tiny" if args.smoke else "released"
    segment = args.segment or (1.0 if args.smoke else SEGMENT)
    spec = {"size": size, "segment": segment, "seed": args.seed, "device": args.device,
            "threads": args.threads, "steps": args.rounds}
    machine = common.describe_machine(args.device)
    settings = {"arch": size, "segment_s": segment, "lora": "r=8 uniform",
                "examples_per_step": 4, "steps": args.rounds, "threads": args.threads}
    print(common.header("peak memory: batch 4 vs batch 1 x accumulate 4", machine, settings),
          flush=True)
    raw = measure(spec)
    errors = {n: r["error"] for n, r in raw.items() if not r.get("ok")}
    peaks = {n: r.get("peak") for n, r in raw.items()}
    ratio = (peaks["batch1_x4"] / peaks["batch4"]
             if not errors and peaks["batch4"] else float("nan"))
    rows = [[n, f"{CONFIGS[n][0]} x {CONFIGS[n][1]}",
             f"{r['peak'] / common.MB:.0f}" if r.get("ok") else "failed",
             f"{r['step_s']:.2f}" if r.get("ok") else "-"] for n, r in raw.items()]
    print(common.format_table(["config", "batch x accumulate", "peak MiB", "step s"], rows))
    print(f"memory ratio (batch 1 x accumulate 4 / batch 4): {ratio:.2f}")
    targets = [common.target_row("peak memory, batch 1 x accumulate 4 / batch 4", ratio,
                                 0.6, op="<=")]
    print("targets:\n" + common.format_targets(targets))
    result = {"benchmark": "accumulate", "machine": machine, "settings": settings,
              "configs": raw, "memory_ratio": ratio, "errors": errors, "targets": targets}
    print(f"wrote {common.write_result('accumulate', result, args)}")
    return result


if __name__ == "__main__":
    main()
