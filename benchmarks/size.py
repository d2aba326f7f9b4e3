"""Adapter size on disk vs the base checkpoint, full-size HTDemucs.

    python -m benchmarks.size [--smoke]

Adapter = `save_adapter` output (safetensors + JSON header); base = the demucs
`serialize_model` package saved with torch.save in float32 (half=False), what the stock
demucs CLI loads. Uniform ranks 4, 8, 16 on encoder+decoder+transformer, and the
heuristic table at r=8 for comparison.
"""
from __future__ import annotations

import tempfile
import typing as tp
from pathlib import Path

import torch

from . import common

CONFIGS = {  # name -> (rank, mode)
    "uniform_r4": (4, "uniform"),
    "uniform_r8": (8, "uniform"),
    "uniform_r16": (16, "uniform"),
    "heuristic_r8": (8, "heuristic"),
}


def base_bytes(model: torch.nn.Module, folder: Path) -> int:
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    path = folder / "base.th"
    torch.save(serialize_model(model, OmegaConf.create({}), half=False), path)
    return path.stat().st_size


def adapter_bytes(model: torch.nn.Module, folder: Path, name: str) -> tp.Tuple[int, int]:
    """(safetensors bytes, json bytes) of the adapter of `model`."""
    from demucs_lora.lora.state import save_adapter
    tensors, header = save_adapter(model, folder / name)
    return tensors.stat().st_size, header.stat().st_size


def measure(args) -> dict:
    size = "tiny" if args.smoke else "full"
    segment = 1.0 if args.smoke else 4.0
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, _ = common.build(common.model_config(size, segment, lora_rank=0), args.seed)
        out["base"] = {"bytes": base_bytes(base, folder),
                       "params": sum(p.numel() for p in base.parameters())}
        for name, (rank, mode) in CONFIGS.items():
            model, _ = common.build(common.model_config(size, segment, lora_rank=rank,
                                                        lora_rank_mode=mode), args.seed)
            tensors, header = adapter_bytes(model, folder, name)
            out[name] = {"rank": rank, "mode": mode, "safetensors_bytes": tensors,
                         "json_bytes": header, "bytes": tensors + header,
                         "params": common.count_params(model)[0]}
    return out


def summarize(raw: dict) -> tp.Tuple[dict, tp.List[dict]]:
    base = raw["base"]["bytes"]
    configs = {}
    for name in CONFIGS:
        row = dict(raw[name])
        row["ratio"] = row["bytes"] / base
        row["percent"] = 100.0 * row["ratio"]
        configs[name] = row
    targets = [common.target_row("adapter / base bytes at r=8 uniform (%)",
                                 configs["uniform_r8"]["percent"], 3.0)]
    return {"base": raw["base"], "configs": configs}, targets


def report(summary: dict, targets: tp.List[dict]) -> str:
    base = summary["base"]
    rows = [["base checkpoint (serialize_model, float32)", f"{base['params']:,}",
             f"{base['bytes'] / common.MB:.2f}", "100.00"]]
    for name, c in summary["configs"].items():
        rows.append([f"{name} adapter (safetensors + json)", f"{c['params']:,}",
                     f"{c['bytes'] / common.MB:.3f}", f"{c['percent']:.2f}"])
    text = common.format_table(["file", "params", "MB", "% of base"], rows)
    return text + "\ntargets:\n" + common.format_targets(targets)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=1)
    args = common.finish_args(parser.parse_args(argv))
    common.setup_torch(args)
    machine = common.describe_machine("cpu")
    settings = {"model": "tiny HTDemucs (smoke)" if args.smoke else "HTDemucs (full size)",
                "targets": "encoder, decoder, transformer"}
    print(common.header("size: adapter vs base checkpoint", machine, settings), flush=True)
    summary, targets = summarize(measure(args))
    print(report(summary, targets))
    result = {"benchmark": "size", "machine": machine, "settings": settings, **summary,
              "targets": targets}
    path = common.write_result("size", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
