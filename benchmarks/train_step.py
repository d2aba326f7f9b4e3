"""Train-step time and peak memory of LoRA vs full fine-tuning, full-size HTDemucs.

    python -m benchmarks.train_step [--rounds 3] [--segment 4] [--device cpu|cuda] [--smoke]

Each configuration lives in its own fresh worker process (peak memory = peak RSS over the
RSS after the model is built; on CUDA max_memory_allocated over the allocated memory
after the build). The parent steps the workers one at a time, rounds interleaved with the
order rotated each round; times are medians of per-round ratios to full fine-tuning.
One step = forward, L1 loss, backward, grad-norm clip, Adam step (as the solver does).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import traceback
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from . import common

# name -> description; "full" is the reference (1.00)
CONFIGS: tp.Dict[str, str] = {
    "full": "full fine-tune (all params, Adam)",
    "floor": "frozen base, backward through everything (input grad)",
    "uniform": "LoRA r=8 uniform (encoder+decoder+transformer)",
    "heuristic": "LoRA r=8 heuristic ranks",
    "heuristic_ckpt": "LoRA heuristic + activation checkpointing",
    "peft": "PEFT LoRA r=8 on the layers PEFT handles",
    "ours_peft_set": "our LoRA r=8 on the same layers as PEFT",
}
RANK = 8
ALPHA = 16
CPU_SEGMENT = 4.0     # 7.8 s (conf/dset/wav.yaml) takes ~35 s/step on 2 cores
FULL_SEGMENT = 7.8


def peft_layer_names(model: nn.Module) -> tp.List[str]:
    """Our targets that PEFT 0.21 can wrap: Linear and non-dilated Conv1d/Conv2d.

    Left out: ConvTranspose (no PEFT support), dilated DConv convs (PEFT drops the
    dilation in lora_A) and MultiheadAttention (with its out_proj).
    """
    from demucs_lora.lora.targets import lora_target_names
    keep = []
    for name in lora_target_names(model, ["encoder", "decoder", "transformer"]):
        module = model.get_submodule(name)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if all(d == 1 for d in module.dilation):
                keep.append(name)
        elif isinstance(module, nn.Linear):
            keep.append(name)
    return keep


def _inject_peft(model: nn.Module, names: tp.Sequence[str]) -> None:
    import re
    from peft import LoraConfig, inject_adapter_in_model
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=pattern)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def build_config(name: str, size: str, segment: float, seed: int) -> nn.Module:
    """The model of configuration `name` (see CONFIGS), trainable flags set."""
    from demucs_lora.lora.inject import inject_lora
    from demucs_lora.train import enable_checkpointing
    if name in ("full", "floor", "peft", "ours_peft_set"):
        model, _ = common.build(common.model_config(size, segment, lora_rank=0), seed)
        if name == "floor":
            model.requires_grad_(False)
        elif name == "peft":
            _inject_peft(model, peft_layer_names(model))
        elif name == "ours_peft_set":
            inject_lora(model, {n: RANK for n in peft_layer_names(model)}, alpha=ALPHA)
        return model
    mode = "uniform" if name == "uniform" else "heuristic"
    model, _ = common.build(common.model_config(size, segment, lora_rank=RANK,
                                                lora_alpha=ALPHA, lora_rank_mode=mode), seed)
    if name == "heuristic_ckpt":
        enable_checkpointing(model)
    return model


def _train_step(model, optimizer, params, stems, floor: bool) -> None:
    mix = stems.sum(dim=1)
    if floor:
        mix = mix.detach().requires_grad_(True)
    estimate = model(mix)
    loss = F.l1_loss(estimate, stems)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optimizer.step()


def worker(conn, spec: dict) -> None:
    """One configuration in a fresh process: build, then answer step/memory/stop."""
    try:
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        device = spec["device"]
        model = build_config(spec["name"], spec["size"], spec["segment"], spec["seed"])
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4) if params else None
        gen = torch.Generator().manual_seed(spec["seed"])
        length = int(spec["segment"] * common.SAMPLERATE)
        stems = (0.1 * torch.randn(spec["batch"], len(common.SOURCES), 2, length,
                                   generator=gen)).to(device)
        trainable, total = common.count_params(model)
        meter = common.PeakMemory(device)
        baseline = meter.start()
        conn.send({"ok": True, "trainable": trainable, "total": total, "baseline": baseline})
        floor = spec["name"] == "floor"
        while True:
            cmd = conn.recv()
            if cmd == "step":
                wall, cpu = common.timed(
                    lambda: _train_step(model, optimizer, params, stems, floor), device)
                common.release_memory()
                conn.send((wall, cpu))
            elif cmd == "memory":
                conn.send(meter.peak_delta())
            else:
                break
    except Exception:  # report to the parent instead of dying silently
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


class Workers:
    """One worker process per configuration, stepped one at a time by the parent.

    `inprocess` runs the workers as threads of this process instead (smoke mode: no
    interpreter start-ups, but peak memory is then shared and not a per-config figure).
    """

    def __init__(self, names: tp.Sequence[str], spec: dict, inprocess: bool = False):
        common.passive_omp()
        ctx = mp.get_context("spawn")
        self.procs, self.conns, self.info, self.errors = {}, {}, {}, {}
        for name in names:
            parent, child = ctx.Pipe()
            args = (child, dict(spec, name=name))
            if inprocess:
                proc = threading.Thread(target=worker, args=args, daemon=True)
            else:
                proc = ctx.Process(target=worker, args=args, daemon=True)
            proc.start()
            if not inprocess:
                child.close()
            self.procs[name], self.conns[name] = proc, parent
        for name in names:
            reply = self._recv(name)
            if reply is not None:
                self.info[name] = reply

    def _recv(self, name: str):
        try:
            reply = self.conns[name].recv()
        except EOFError:
            reply = {"ok": False, "error": f"worker {name} died (out of memory?)"}
        if isinstance(reply, dict) and not reply.get("ok", True):
            self.errors[name] = reply["error"]
            print(f"!! {name} failed:\n{reply['error']}", file=sys.stderr)
            self._stop(name)
            return None
        return reply

    def alive(self) -> tp.List[str]:
        return [n for n in self.conns if n not in self.errors]

    def ask(self, name: str, cmd: str):
        if name in self.errors:
            return None
        self.conns[name].send(cmd)
        return self._recv(name)

    def _stop(self, name: str) -> None:
        try:
            self.conns[name].send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.procs[name].join(timeout=30)

    def close(self) -> None:
        for name in self.alive():
            self._stop(name)


def measure(args) -> dict:
    names = list(args.configs)
    size = "tiny" if args.smoke else "full"
    spec = {"size": size, "segment": args.segment, "batch": args.batch, "seed": args.seed,
            "device": args.device, "threads": args.threads}
    workers = Workers(names, spec, inprocess=args.inprocess)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    try:
        for i in range(args.warmup):
            for name in common.rotated(workers.alive(), i):
                workers.ask(name, "step")
        for i in range(args.rounds):
            for name in common.rotated(workers.alive(), i):
                reply = workers.ask(name, "step")
                if reply is not None:
                    wall[name].append(reply[0])
                    cpu[name].append(reply[1])
            print(f"round {i + 1}/{args.rounds} (wall/cpu s): " + ", ".join(
                f"{n} {wall[n][-1]:.1f}/{cpu[n][-1]:.1f}" for n in names if wall[n]), flush=True)
        memory = {n: workers.ask(n, "memory") for n in workers.alive()}
    finally:
        workers.close()
    return {"wall": wall, "cpu": cpu, "memory": memory, "info": workers.info,
            "errors": workers.errors}


def _ratio(a, b) -> float:
    return a / b if a is not None and b else float("nan")


def _ratios(series: dict, reference: str) -> dict:
    complete = {n: v for n, v in series.items() if v}
    return common.round_ratios(complete, reference) if reference in complete else {}


def summarize(raw: dict, metric: str) -> tp.Tuple[dict, tp.List[dict]]:
    wall_ratio, cpu_ratio = _ratios(raw["wall"], "full"), _ratios(raw["cpu"], "full")
    time_ratio = cpu_ratio if metric == "cpu" else wall_ratio
    ref_mem = raw["memory"].get("full")
    nan = float("nan")
    configs = {}
    for name in raw["wall"]:
        info = raw["info"].get(name, {})
        mem = raw["memory"].get(name)
        configs[name] = {
            "label": CONFIGS[name], "trainable": info.get("trainable"),
            "total": info.get("total"),
            "trainable_pct": (100.0 * info["trainable"] / info["total"]) if info else None,
            "step_s": common.median(raw["wall"][name]), "step_s_rounds": raw["wall"][name],
            "cpu_s": common.median(raw["cpu"][name]), "cpu_s_rounds": raw["cpu"][name],
            "time_ratio": time_ratio.get(name, nan), "wall_ratio": wall_ratio.get(name, nan),
            "cpu_ratio": cpu_ratio.get(name, nan),
            "peak_mem_bytes": mem, "mem_ratio": _ratio(mem, ref_mem),
            "error": raw["errors"].get(name)}
    peft_series = raw["cpu"] if metric == "cpu" else raw["wall"]
    peft_time = _ratios(peft_series, "peft").get("ours_peft_set", nan)
    peft_mem = _ratio(raw["memory"].get("ours_peft_set"), raw["memory"].get("peft"))
    empty = {"time_ratio": nan, "mem_ratio": nan}
    c = {name: configs.get(name, empty) for name in CONFIGS}
    targets = [
        common.target_row("heuristic step time vs full FT", c["heuristic"]["time_ratio"], 0.70),
        common.target_row("heuristic peak memory vs full FT", c["heuristic"]["mem_ratio"], 0.72),
        common.target_row("heuristic+checkpointing peak memory vs full FT",
                          c["heuristic_ckpt"]["mem_ratio"], 0.40),
        common.target_row("uniform step time vs full FT", c["uniform"]["time_ratio"], 0.85),
        common.target_row("uniform peak memory vs full FT", c["uniform"]["mem_ratio"], 0.95),
        common.target_row("ours / PEFT step time, same layers", peft_time, 1.05),
    ]
    extra = {"ours_vs_peft_time": peft_time, "ours_vs_peft_mem": peft_mem}
    return {"configs": configs, **extra}, targets


def report(summary: dict, targets: tp.List[dict]) -> str:
    verdicts = {}
    for row, cfg in zip(targets, ["heuristic", "heuristic", "heuristic_ckpt", "uniform",
                                  "uniform", "ours_peft_set"]):
        verdicts.setdefault(cfg, []).append(common.verdict(row))
    header = ["configuration", "trainable", "%", "wall s", "cpu s", "time x", "wall x",
              "peak MB", "mem x", "targets"]
    rows = []
    for name, c in summary["configs"].items():
        rows.append([
            f"{name}: {c['label']}", f"{c['trainable'] or 0:,}",
            f"{c['trainable_pct']:.2f}" if c["trainable_pct"] is not None else "-",
            f"{c['step_s']:.2f}", f"{c['cpu_s']:.2f}", f"{c['time_ratio']:.2f}",
            f"{c['wall_ratio']:.2f}",
            f"{(c['peak_mem_bytes'] or 0) / common.MB:.0f}", f"{c['mem_ratio']:.2f}",
            "/".join(verdicts.get(name, []))])
    text = common.format_table(header, rows)
    text += (f"\nours vs PEFT on the same layers: time {summary['ours_vs_peft_time']:.3f}x, "
             f"peak memory {summary['ours_vs_peft_mem']:.3f}x")
    return text + "\ntargets:\n" + common.format_targets(targets)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=3)
    parser.add_argument("--segment", type=float, default=None,
                        help=f"seconds per example (default {CPU_SEGMENT} on CPU, "
                             f"{FULL_SEGMENT} on CUDA; smoke 1.0)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    parser.add_argument("--inprocess", action="store_true", default=None,
                        help="workers as threads of one process (default in smoke mode; "
                             "peak memory is then not per configuration)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ",".join(CONFIGS))
    args = common.finish_args(parser.parse_args(argv))
    args.configs = [n for n in CONFIGS if n in args.configs.split(",")]
    if "full" not in args.configs:
        parser.error("--configs must include full (the reference)")
    common.setup_torch(args)
    if args.segment is None:
        args.segment = 1.0 if args.smoke else (FULL_SEGMENT if args.device == "cuda"
                                                else CPU_SEGMENT)
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 1
    if args.inprocess is None:
        args.inprocess = args.smoke
    if args.device == "cpu":
        common.passive_omp()
    machine = common.describe_machine(args.device)
    note = None
    if args.segment != FULL_SEGMENT and not args.smoke:
        note = (f"segment {args.segment} s instead of the {FULL_SEGMENT} s of conf/dset/wav.yaml:"
                f" a full-size step at {FULL_SEGMENT} s takes ~35 s on 2 CPU cores")
    settings = {"model": "tiny HTDemucs (smoke)" if args.smoke else "HTDemucs (full size)",
                "batch": args.batch, "segment_s": args.segment, "rounds": args.rounds,
                "warmup": args.warmup, "rank": RANK, "alpha": ALPHA, "threads": args.threads,
                "time_metric": args.time_metric, "inprocess": args.inprocess, "note": note}
    print(common.header("train step: LoRA vs full fine-tune", machine, settings), flush=True)
    raw = measure(args)
    summary, targets = summarize(raw, args.time_metric)
    print(report(summary, targets))
    if args.time_metric == "cpu":
        print("time x = " + common.TIME_METRIC_NOTE)
    result = {"benchmark": "train_step", "machine": machine, "settings": settings,
              "reference": "full", **summary, "targets": targets,
              "errors": raw["errors"] or None}
    path = common.write_result("train_step", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
