"""Separation time on CPU: onnxruntime (tools.export --format onnx) vs PyTorch, and parity.

    python -m benchmarks.onnx_runtime [--arch released] [--rounds 3] [--seconds 7.8]
                                      [--song 30] [--smoke]

One HTDemucs (random weights, the released architecture; segment = --seconds) exported
with ``commands.export_onnx.export_graph``; both separate the same synthetic song of
--song seconds through ``inference.separation.separate_tensor`` (demucs' chunked
overlap-add, shifts 0): PyTorch on the model, onnxruntime through
``inference.onnx_model``. Interleaved rounds (the order alternates), the ratio is the median
of per-round ratios onnx / PyTorch (process CPU time, single thread: see common's note;
wall ratios too). Also: max abs difference of the stems on the whole song (target 1e-4)
and the .onnx size vs the float32 weights.
"""
from __future__ import annotations

import tempfile
import typing as tp
from pathlib import Path

import torch

from . import common


def measure(args, size: str) -> dict:
    from demucs_lora.commands.export_onnx import export_graph
    from demucs_lora.inference.onnx_model import load_onnx_model
    from demucs_lora.inference.separation import separate_tensor
    model, _ = common.build(common.model_config(size, args.seconds, lora_rank=0), args.seed)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_graph(model, str(path))
        size_bytes = path.stat().st_size
        onnx = load_onnx_model(path)
        gen = torch.Generator().manual_seed(args.seed)
        song = 0.1 * torch.randn(2, int(args.song * common.SAMPLERATE), generator=gen)
        runs = {"pytorch": model, "onnxruntime": onnx}
        outputs = {name: separate_tensor(m, song, shifts=0) for name, m in runs.items()}
        times: tp.Dict[str, list] = {name: [] for name in runs}
        cpu: tp.Dict[str, list] = {name: [] for name in runs}
        for i in range(args.rounds):
            for name in common.rotated(list(runs), i):
                wall, cpu_s = common.timed(lambda: separate_tensor(runs[name], song, shifts=0))
                times[name].append(wall)
                cpu[name].append(cpu_s)
            print(f"[{size}] round {i + 1}/{args.rounds} (wall/cpu s): " + ", ".join(
                f"{n} {times[n][-1]:.2f}/{cpu[n][-1]:.2f}" for n in runs), flush=True)
    weights = sum(v.numel() * 4 for v in model.state_dict().values())
    diff = (outputs["pytorch"] - outputs["onnxruntime"]).abs().max().item()
    return {"arch": size, "arch_label": common.ARCHS[size][2], "times": times, "cpu": cpu,
            "max_abs_diff": diff, "max_abs_output": outputs["pytorch"].abs().max().item(),
            "onnx_bytes": size_bytes, "weights_bytes": weights,
            "size_ratio": size_bytes / weights,
            "cpu_ratio": common.round_ratios(cpu, "pytorch")["onnxruntime"],
            "wall_ratio": common.round_ratios(times, "pytorch")["onnxruntime"]}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=3)
    parser.add_argument("--seconds", type=float, default=None,
                        help="model segment (default 7.8, the released one; smoke 1)")
    parser.add_argument("--song", type=float, default=None,
                        help="song length in seconds (default 30; smoke 2.5)")
    common.add_arch_argument(parser)
    args = common.finish_args(parser.parse_args(argv))
    common.setup_torch(args)
    args.seconds = args.seconds or (1.0 if args.smoke else 7.8)
    args.song = args.song or (2.5 if args.smoke else 30.0)
    sizes = common.archs(args) if args.arch or args.smoke else ["released"]
    settings = {"archs": sizes, "segment_s": args.seconds, "song_s": args.song,
                "rounds": args.rounds, "threads": args.threads, "shifts": 0}
    machine = common.describe_machine("cpu")
    print(common.header("onnx_runtime: onnxruntime vs PyTorch separation", machine, settings),
          flush=True)
    runs = [measure(args, size) for size in sizes]
    first = runs[0]
    targets = [common.target_row("stems max abs diff onnxruntime vs PyTorch",
                                 first["max_abs_diff"], 1e-4),
               common.target_row(".onnx size / float32 weights", first["size_ratio"], 1.1)]
    for run in runs:
        print(f"-- {run['arch']}: onnxruntime/PyTorch cpu {run['cpu_ratio']:.3f}x, wall "
              f"{run['wall_ratio']:.3f}x; max abs diff {run['max_abs_diff']:.3g} (output "
              f"{run['max_abs_output']:.3g}); .onnx {run['onnx_bytes']:,} bytes = "
              f"{run['size_ratio']:.3f}x the float32 weights")
    print("targets:\n" + common.format_targets(targets), flush=True)
    result = {"benchmark": "onnx_runtime", "machine": machine, "settings": settings,
              "runs": runs, "targets": targets}
    common.write_result("onnx_runtime", result, args)
    return result


if __name__ == "__main__":
    main()
