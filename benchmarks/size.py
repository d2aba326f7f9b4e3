"""Adapter size on disk vs the base checkpoint, and what float16/bfloat16 storage costs.

    python -m benchmarks.size [--arch released,default] [--smoke]

Adapter = `save_adapter` output (safetensors + JSON header); base = the demucs
`serialize_model` package saved with torch.save in float32 (half=False), and in float16
(half=True: the format of the released files, e.g. htdemucs 955717e8 is 84 MB). Uniform
ranks 4, 8, 16 on the default targets (conf/model), the heuristic table at r=8, and uniform r=8 stored
with `htdemucs.lora_save_dtype` float16 / bfloat16: their output error is measured by
reloading the file onto the base and separating a few seconds of noise (adapters with
random non-zero B factors, as in the inference benchmark).
"""
from __future__ import annotations

import tempfile
import typing as tp
from pathlib import Path

import torch

from demucs_lora.core.files import atomic_torch_save

from . import common

CONFIGS = {  # name -> (rank, mode, save dtype)
    "uniform_r4": (4, "uniform", "float32"),
    "uniform_r8": (8, "uniform", "float32"),
    "uniform_r16": (16, "uniform", "float32"),
    "heuristic_r8": (8, "heuristic", "float32"),
    "uniform_r8_float16": (8, "uniform", "float16"),
    "uniform_r8_bfloat16": (8, "uniform", "bfloat16"),
}
SECONDS = 2.0   # audio for the output-error check (and the model segment)


def base_bytes(model: torch.nn.Module, folder: Path, half: bool = False) -> int:
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    path = folder / f"base{'_half' if half else ''}.th"
    atomic_torch_save(serialize_model(model, OmegaConf.create({}), half=half), path)
    return path.stat().st_size


def adapter_bytes(model: torch.nn.Module, folder: Path, name: str,
                  save_dtype: str = "float32") -> tp.Tuple[int, int]:
    """(safetensors bytes, json bytes) of the adapter of `model`."""
    from demucs_lora.lora.state import save_adapter
    tensors, header = save_adapter(model, folder / name, save_dtype=save_dtype)
    return tensors.stat().st_size, header.stat().st_size


def _separate(model: torch.nn.Module, mix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(mix).double()


def output_error(size: str, folder: Path, name: str, reference: torch.Tensor,
                 plain: torch.Tensor, mix: torch.Tensor, seed: int) -> dict:
    """Output of the base + reloaded adapter `name` vs the float32 adapter's output."""
    from demucs_lora.models.guide_methods import load_lora_weights
    base, _ = common.build(common.model_config(size, SECONDS, lora_rank=0), seed)
    out = _separate(load_lora_weights(base, folder / name), mix)
    diff = (out - reference).abs().max().item()
    return {"max_abs_error": diff,
            "error_vs_output_peak": diff / reference.abs().max().item(),
            "error_vs_adapter_effect": diff / (reference - plain).abs().max().item()}


def measure_arch(size: str, seed: int) -> dict:
    from .inference import randomize_adapters
    out = {}
    gen = torch.Generator().manual_seed(seed)
    mix = 0.1 * torch.randn(1, 2, int(SECONDS * common.SAMPLERATE), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, _ = common.build(common.model_config(size, SECONDS, lora_rank=0), seed)
        out["base"] = {"bytes": base_bytes(base, folder),
                       "bytes_float16": base_bytes(base, folder, half=True),
                       "params": sum(p.numel() for p in base.parameters())}
        plain = _separate(base, mix)
        del base
        reference = None
        for name, (rank, mode, dtype) in CONFIGS.items():
            model, _ = common.build(common.model_config(size, SECONDS, lora_rank=rank,
                                                        lora_rank_mode=mode), seed)
            if (rank, mode) == (8, "uniform"):
                randomize_adapters(model, seed + 1)
                if reference is None:
                    reference = _separate(model, mix)
            tensors, header = adapter_bytes(model, folder, name, dtype)
            out[name] = {"rank": rank, "mode": mode, "save_dtype": dtype,
                         "safetensors_bytes": tensors, "json_bytes": header,
                         "bytes": tensors + header, "params": common.count_params(model)[0]}
            if dtype != "float32":
                out[name].update(output_error(size, folder, name, reference, plain, mix, seed))
    return out


def summarize_arch(raw: dict) -> dict:
    base, base16 = raw["base"]["bytes"], raw["base"]["bytes_float16"]
    configs = {}
    for name in CONFIGS:
        row = dict(raw[name])
        row["ratio"] = row["bytes"] / base
        row["percent"] = 100.0 * row["ratio"]
        row["percent_of_float16_base"] = 100.0 * row["bytes"] / base16
        configs[name] = row
    return {"base": raw["base"], "configs": configs}


def targets_for(run: dict) -> tp.List[dict]:
    c = run["configs"]
    return [
        common.target_row("adapter / base bytes at r=8 uniform, both float32 (%)",
                          c["uniform_r8"]["percent"], 3.0),
        common.target_row("float16 adapter / float16 base (the released format) at r=8 "
                          "uniform (%)", c["uniform_r8_float16"]["percent_of_float16_base"],
                          3.0),
        common.target_row("bfloat16 adapter output error (of the adapter's effect)",
                          c["uniform_r8_bfloat16"]["error_vs_adapter_effect"], 0.01),
    ]


def report(runs: tp.Sequence[dict], targets: tp.List[dict]) -> str:
    blocks = []
    for run in runs:
        base = run["base"]
        rows = [["base checkpoint (serialize_model, float32)", f"{base['params']:,}",
                 f"{base['bytes'] / common.MB:.2f}", "100.00", "-"],
                ["base checkpoint (float16, the released format)", f"{base['params']:,}",
                 f"{base['bytes_float16'] / common.MB:.2f}",
                 f"{100 * base['bytes_float16'] / base['bytes']:.2f}", "-"]]
        for name, c in run["configs"].items():
            err = f"{c['error_vs_output_peak']:.1e} / {c['error_vs_adapter_effect']:.1e}" \
                if "max_abs_error" in c else "-"
            rows.append([f"{name} adapter (safetensors + json)", f"{c['params']:,}",
                         f"{c['bytes'] / common.MB:.3f}", f"{c['percent']:.2f}", err])
        blocks.append(f"-- {run['arch']} ({run['arch_label']})\n" + common.format_table(
            ["file", "params", "MB", "% of fp32 base", "error (of peak / of effect)"], rows))
    return "\n\n".join(blocks) + "\ntargets:\n" + common.format_targets(targets)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=1)
    common.add_arch_argument(parser)
    args = common.finish_args(parser.parse_args(argv))
    args.suite = "cpu"   # device-independent: one results file
    common.setup_torch(args)
    machine = common.describe_machine("cpu")
    sizes = common.archs(args)
    targets = ", ".join(common.model_config(sizes[0]).htdemucs.lora_targets)
    settings = {"archs": sizes, "targets": f"{targets} (conf/model default)",
                "error_check_seconds": SECONDS}
    print(common.header("size: adapter vs base checkpoint", machine, settings), flush=True)
    runs = [{"arch": s, "arch_label": common.ARCHS[s][2],
             **summarize_arch(measure_arch(s, args.seed))} for s in sizes]
    targets = targets_for(runs[0])
    print(report(runs, targets))
    result = {"benchmark": "size", "machine": machine, "settings": settings, "runs": runs,
              "targets": targets}
    path = common.write_result("size", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
