"""Inference time of the base model vs LoRA unmerged vs merged, and merge exactness.

    python -m benchmarks.inference [--arch released,default] [--rounds 5] [--seconds 4]
                                   [--device cpu|cuda] [--smoke]

HTDemucs (the released architecture, then the constructor-default one) in eval mode
under no_grad, one input of a few seconds (the model's segment, so nothing is padded). The adapters get random non-zero B factors (B starts at
zero, which would make merged == base trivially). `base_again` times the base model a
second time per round: its ratio is the noise level of the measurement.
"Unmerged" keeps the adapters apart from the base weights (hot-swappable); under no_grad
the Linear/Conv/ConvTranspose wrappers fold their delta into the weight per call
(LoRALayer._fold), attention keeps its low-rank path.
"""
from __future__ import annotations

import copy
import typing as tp

import torch

from . import common

RANK = 8
CONFIGS = {
    "base": "base HTDemucs",
    "base_again": "base HTDemucs, timed again (noise level)",
    "unmerged": "LoRA r=8 uniform, unmerged",
    "unmerged_heuristic": "LoRA r=8 heuristic, unmerged",
    "merged": "LoRA r=8 uniform, merged (merge_lora)",
}


def randomize_adapters(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Non-zero lora_B* factors, so that the adapter changes the output."""
    from demucs_lora.lora.inject import iter_lora_layers
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name, param in layer.lora_named_parameters():
                if name.startswith("lora_B"):
                    param.copy_(std * torch.randn(param.shape, generator=gen))


def build_models(size: str, seconds: float, seed: int, device: str) -> tp.Dict[str, torch.nn.Module]:
    from demucs_lora.lora.inject import merge_lora
    base, _ = common.build(common.model_config(size, seconds, lora_rank=0), seed)
    models = {"base": base}
    for name, mode in (("unmerged", "uniform"), ("unmerged_heuristic", "heuristic")):
        model, _ = common.build(common.model_config(size, seconds, lora_rank=RANK,
                                                    lora_rank_mode=mode), seed)
        randomize_adapters(model, seed + 1)
        models[name] = model
    models["merged"] = merge_lora(copy.deepcopy(models["unmerged"]))
    for model in models.values():
        model.to(device).eval()
    return models


def _forward(model, mix):
    with torch.no_grad():
        return model(mix)


def measure(args, size: str) -> dict:
    models = build_models(size, args.seconds, args.seed, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    mix = (0.1 * torch.randn(1, 2, int(args.seconds * common.SAMPLERATE), generator=gen))
    mix = mix.to(args.device)
    outputs = {name: _forward(model, mix) for name, model in models.items()}  # warmup
    times = {name: [] for name in CONFIGS}
    cpu = {name: [] for name in CONFIGS}
    for i in range(args.rounds):
        for name in common.rotated(list(CONFIGS), i):
            model = models["base" if name == "base_again" else name]
            wall, cpu_s = common.timed(lambda: _forward(model, mix), args.device)
            times[name].append(wall)
            cpu[name].append(cpu_s)
        print(f"[{size}] round {i + 1}/{args.rounds} (wall/cpu s): " + ", ".join(
            f"{n} {times[n][-1]:.2f}/{cpu[n][-1]:.2f}" for n in CONFIGS), flush=True)
    unmerged, merged = outputs["unmerged"].double(), outputs["merged"].double()
    scale = unmerged.abs().max().item()
    diff = (merged - unmerged).abs().max().item()
    effect = (unmerged - outputs["base"].double()).abs().max().item()
    trainable = {n: common.count_params(m)[0] for n, m in models.items()}
    return {"times": times, "cpu": cpu, "scale": scale, "diff": diff, "effect": effect,
            "trainable": trainable}


def summarize(raw: dict, metric: str) -> tp.Tuple[dict, tp.List[dict]]:
    wall = common.round_ratios(raw["times"], "base")
    cpu = common.round_ratios(raw["cpu"], "base")
    ratios = cpu if metric == "cpu" else wall
    configs = {name: {"label": label, "time_s": common.median(raw["times"][name]),
                      "time_s_rounds": raw["times"][name],
                      "cpu_s": common.median(raw["cpu"][name]),
                      "cpu_s_rounds": raw["cpu"][name], "time_ratio": ratios[name],
                      "wall_ratio": wall[name], "cpu_ratio": cpu[name],
                      "adapter_params": raw["trainable"].get(name)}
               for name, label in CONFIGS.items()}
    rel = raw["diff"] / raw["scale"] if raw["scale"] > 0 else float("nan")
    noise = abs(ratios["base_again"] - 1.0)
    merged_limit = 1.0 + max(0.03, 2 * noise)
    exactness = {"max_abs_diff_merged_vs_unmerged": raw["diff"],
                 "max_abs_output": raw["scale"], "relative_diff": rel,
                 "max_abs_effect_of_adapter": raw["effect"], "noise": noise}
    targets = [
        common.target_row("merged time vs base (1.00x within noise)", ratios["merged"],
                          round(merged_limit, 3)),
        common.target_row("merged vs unmerged max abs diff (relative)", rel, 1e-5),
        common.target_row("unmerged (uniform) time vs base", ratios["unmerged"], 1.15),
    ]
    return {"configs": configs, "exactness": exactness}, targets


def report(runs: tp.Sequence[dict], targets: tp.List[dict]) -> str:
    blocks = []
    for run in runs:
        rows = [[f"{n}: {c['label']}", f"{c['time_s']:.3f}", f"{c['cpu_s']:.3f}",
                 f"{c['time_ratio']:.3f}", f"{c['wall_ratio']:.3f}"]
                for n, c in run["configs"].items()]
        text = f"-- {run['arch']} ({run['arch_label']})\n" + common.format_table(
            ["configuration", "wall s", "cpu s", "time x", "wall x"], rows)
        e = run["exactness"]
        text += (f"\nmerged vs unmerged: max abs diff "
                 f"{e['max_abs_diff_merged_vs_unmerged']:.3g} (relative "
                 f"{e['relative_diff']:.3g}); adapter effect on the output "
                 f"{e['max_abs_effect_of_adapter']:.3g}; timing noise (base vs base) "
                 f"{e['noise']:.3f}")
        blocks.append(text)
    return "\n\n".join(blocks) + "\ntargets:\n" + common.format_targets(targets)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=5)
    parser.add_argument("--seconds", type=float, default=None,
                        help="audio length and model segment (default 4, CUDA suite 7.8; "
                             "smoke 1)")
    common.add_arch_argument(parser)
    args = common.finish_args(parser.parse_args(argv))
    common.setup_torch(args)
    if args.seconds is None:
        args.seconds = 1.0 if args.smoke else (7.8 if args.suite == "cuda" else 4.0)
    machine = common.describe_machine(args.device)
    sizes = common.archs(args)
    settings = {"suite": args.suite, "device": args.device, "archs": sizes,
                "seconds": args.seconds, "batch": 1, "rounds": args.rounds, "rank": RANK,
                "mode": "eval, no_grad", "threads": args.threads,
                "time_metric": args.time_metric,
                "note": common.NO_CUDA_SMOKE if args.cuda_fallback else None}
    print(common.header("inference: base vs LoRA unmerged vs merged", machine, settings),
          flush=True)
    runs, targets = [], None
    for size in sizes:
        summary, arch_targets = summarize(measure(args, size), args.time_metric)
        runs.append({"arch": size, "arch_label": common.ARCHS[size][2], **summary})
        targets = arch_targets if targets is None else targets  # on the first architecture
    print(report(runs, targets))
    if args.time_metric == "cpu":
        print("time x = " + common.TIME_METRIC_NOTE)
    result = {"benchmark": "inference", "machine": machine, "settings": settings,
              "reference": "base", "runs": runs, "targets": targets}
    path = common.write_result("inference", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
