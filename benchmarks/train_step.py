"""Train-step time and peak memory of LoRA vs full fine-tuning, and their floors.

    python -m benchmarks.train_step [--arch released,default] [--rounds 3] [--segment 4]
    python -m benchmarks.train_step --device cuda      # the CUDA suite (see CUDA_SUITE)
    python -m benchmarks.train_step --smoke [--device cuda]

Each configuration lives in its own fresh worker process (peak memory = peak RSS over the
RSS after the model is built; on CUDA max_memory_allocated over the allocated memory
after the build, and max_memory_allocated itself). The parent steps the workers one at
a time, rounds interleaved with the order rotated each round; times are medians of
per-round ratios (to full fine-tuning, and to each configuration's own floor).
One step = forward, L1 loss, backward, grad-norm clip, Adam step (as the solver does),
under autocast for bf16 / fp16 (fp16 with a GradScaler, as the solver does).

Floors (no trainable weight anywhere, no adapter compute):
- ``floor_input``: backward through the whole frozen base (the input requires grad).
- ``floor_X``: backward through the frozen base only as far as LoRA config X needs: the
  output of every layer X adapts requires grad (the inputs of an adapted attention, whose
  q/v projections sit inside it), so the layers below X's lowest adapted layers, and the
  input, need no gradient. This is what X would cost with adapters that cost nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import sys
import threading
import traceback
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from . import common


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    kind: str                          # full | floor_input | floor | lora | peft | ours_peft_set
    mode: tp.Optional[str] = None      # lora: uniform | heuristic; floor: the mode it floors
    ckpt: bool = False                 # activation checkpointing
    drop_targets: tp.Tuple[str, ...] = ()  # groups removed from conf/model's lora_targets
    floor: tp.Optional[str] = None     # lora: the name of its own floor


CONFIGS: tp.Dict[str, Config] = {
    "full": Config("full fine-tune (all params, Adam)", "full"),
    "floor_input": Config("floor: frozen base, backward through everything (input grad)",
                          "floor_input"),
    "floor_uniform": Config("floor of uniform: frozen base, backward down to its layers",
                            "floor", "uniform"),
    "floor_heuristic": Config("floor of heuristic: frozen base, backward down to its layers",
                              "floor", "heuristic"),
    "floor_heuristic_ckpt": Config("floor of heuristic + checkpointing", "floor",
                                   "heuristic", ckpt=True),
    "uniform": Config("LoRA r=8 uniform", "lora", "uniform", floor="floor_uniform"),
    "heuristic": Config("LoRA r=8 heuristic ranks", "lora", "heuristic",
                        floor="floor_heuristic"),
    "heuristic_ckpt": Config("LoRA r=8 heuristic + activation checkpointing", "lora",
                             "heuristic", ckpt=True, floor="floor_heuristic_ckpt"),
    "uniform_no_upsampler": Config("LoRA r=8 uniform without the upsampler group", "lora",
                                   "uniform", drop_targets=("upsampler",),
                                   floor="floor_uniform"),
    "heuristic_no_upsampler": Config("LoRA r=8 heuristic without the upsampler group", "lora",
                                     "heuristic", drop_targets=("upsampler",),
                                     floor="floor_heuristic"),
    "peft": Config("PEFT LoRA r=8 on the layers PEFT handles", "peft"),
    "ours_peft_set": Config("our LoRA r=8 on the same layers as PEFT", "ours_peft_set"),
}
# What each suite runs: the CPU suite measures everything on the released architecture
# and a subset on the second one; the CUDA suite (batch 4 x 7.8 s, three precisions)
# what the 8 GB goal needs, in well under 5 minutes on one GPU.
CPU_CONFIGS = {"released": list(CONFIGS),
               "default": ["full", "floor_input", "floor_uniform", "floor_heuristic",
                           "floor_heuristic_ckpt", "uniform", "heuristic", "heuristic_ckpt"]}
CUDA_CONFIGS = ["full", "floor_input", "floor_uniform", "floor_heuristic",
                "floor_heuristic_ckpt", "uniform", "heuristic", "heuristic_ckpt"]
# --smoke (CI): every code path (hooked floors, checkpointing, PEFT), not every row
SMOKE_CONFIGS = {"cpu": ["full", "floor_input", "floor_heuristic", "floor_heuristic_ckpt",
                         "uniform", "heuristic", "heuristic_ckpt", "peft", "ours_peft_set"],
                 "cuda": ["full", "floor_heuristic", "heuristic", "heuristic_ckpt"]}
PRECISIONS = ("fp32", "bf16", "fp16")
SDPA_CONFIGS = ("full", "heuristic")   # where the attention kernel is looked up
RANK = 8
ALPHA = 16
CPU_SEGMENT = 4.0     # 7.8 s (conf/dset/wav.yaml) takes ~35 s/step on 2 cores
FULL_SEGMENT = 7.8
CUDA_BATCH = 4
GIB = 1024 ** 3
CUDA_GOAL_GIB = 8.0   # LoRA + checkpointing, batch 4 x 7.8 s, released htdemucs


# ----------------------------------------------------------------------------- models
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


def _lora_config(size: str, segment: float, mode: str, drop_targets: tp.Sequence[str] = ()):
    cfg = common.model_config(size, segment, lora_rank=RANK, lora_alpha=ALPHA,
                              lora_rank_mode=mode)
    cfg.htdemucs.lora_targets = [t for t in cfg.htdemucs.lora_targets if t not in drop_targets]
    return cfg


def adapted_layers(size: str, segment: float, mode: str, seed: int = 0) -> tp.List[str]:
    """Module paths LoRA mode `mode` wraps (rank > 0) with the default targets."""
    _, report = common.build(_lora_config(size, segment, mode), seed)
    return sorted(report["ranks"])


def build_config(name: str, size: str, segment: float, seed: int
                 ) -> tp.Tuple[nn.Module, tp.List[str]]:
    """(model of configuration `name`, trainable flags set; layers to hook for a floor)."""
    from demucs_lora.lora.config import LoraLayout
    from demucs_lora.lora.adapt import inject_lora
    from demucs_lora.models.checkpointing import enable_checkpointing
    config = CONFIGS[name]
    hooks: tp.List[str] = []
    if config.kind in ("lora",):
        model, _ = common.build(_lora_config(size, segment, config.mode, config.drop_targets),
                                seed)
    else:
        if config.kind == "floor":
            hooks = adapted_layers(size, segment, config.mode, seed)
        model, _ = common.build(common.model_config(size, segment, lora_rank=0), seed)
        if config.kind in ("floor", "floor_input"):
            model.requires_grad_(False)
        elif config.kind == "peft":
            _inject_peft(model, peft_layer_names(model))
        elif config.kind == "ours_peft_set":
            inject_lora(model, LoraLayout({n: RANK for n in peft_layer_names(model)},
                                           alpha=ALPHA))
    if config.ckpt:
        enable_checkpointing(model)
    return model, hooks


def add_floor_hooks(model: nn.Module, names: tp.Sequence[str], device) -> tp.List[torch.Tensor]:
    """Make the gradient of the frozen `model` reach the layers `names` and stop there.

    A zero scalar leaf (requires_grad) is added to the output of each layer (to the
    inputs of an attention module, whose adapted q/v projections are inside it): autograd
    then back-propagates exactly down to these layers and no further, computing no
    weight gradient. Returns the leaves (their grads are to be dropped after a step).
    """
    leaves = []
    for name in names:
        module = model.get_submodule(name)
        z = torch.zeros((), device=device, requires_grad=True)
        leaves.append(z)
        if isinstance(module, nn.MultiheadAttention):
            def pre(mod, args, kwargs, z=z):
                shifted: tp.Dict[int, torch.Tensor] = {}   # keep query is key is value

                def add(t):
                    if id(t) not in shifted:
                        shifted[id(t)] = t + z
                    return shifted[id(t)]
                args = tuple(add(a) if i < 3 and torch.is_tensor(a) else a
                             for i, a in enumerate(args))
                kwargs = {k: add(v) if k in ("query", "key", "value") else v
                          for k, v in kwargs.items()}
                return args, kwargs
            module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            module.register_forward_hook(lambda mod, args, out, z=z: out + z)
    return leaves


# ----------------------------------------------------------------------------- steps
def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device, dtype=dtype)


def _train_step(model, optimizer, params, stems, input_grad: bool, precision: str,
                scaler, leaves) -> None:
    mix = stems.sum(dim=1)
    if input_grad:
        mix = mix.detach().requires_grad_(True)
    with autocast(stems.device.type, precision):
        estimate = model(mix)
    loss = F.l1_loss(estimate.float(), stems)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for z in leaves:
        z.grad = None
    if optimizer is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        scaler.step(optimizer)
        scaler.update()


SDPA_KERNELS = (("flash_attention_for_cpu", "flash (CPU)"), ("flash_attention", "flash"),
                ("efficient_attention", "memory-efficient"), ("cudnn_attention", "cuDNN"),
                ("attention_math", "math"))


def sdpa_kernels(step: tp.Callable[[], None]) -> tp.List[str]:
    """The SDPA kernels the forward pass of one training step dispatches to.

    A TorchFunctionMode counts the F.scaled_dot_product_attention calls, a TorchDispatchMode
    records the aten kernel each resolves to (_scaled_dot_product_flash_attention, ...
    _efficient_attention, ..._cudnn_attention); calls with none of them ran the math
    fallback (it decomposes into matmuls). Both modes are thread-local, so this works in
    --inprocess threads (the profiler does not).
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    seen: tp.List[str] = []
    calls = [0]

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "scaled_dot_product_attention":
                calls[0] += 1
            return func(*args, **(kwargs or {}))

    class Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "_attention" in name and "backward" not in name:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Calls(), Kernels():
        step()
    found = []
    for op in dict.fromkeys(seen):
        for pattern, kernel in SDPA_KERNELS:
            if pattern in op:
                if kernel not in found:
                    found.append(kernel)
                break
    fused = sum(1 for op in seen if any(p in op for p, _ in SDPA_KERNELS))
    if calls[0] > fused:
        found.append("math")
    return found or ["none (no scaled_dot_product_attention call)"]


def worker(conn, spec: dict) -> None:
    """One configuration in a fresh process: build, then answer commands (tuples):
    ("step", precision) -> (wall s, cpu s); ("reset",) -> restart the peak memory meter;
    ("memory",) -> (peak delta, peak total); ("sdpa", precision) -> kernels; ("stop",)."""
    try:
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        device = spec["device"]
        model, hooks = build_config(spec["name"], spec["size"], spec["segment"], spec["seed"])
        model.to(device).train()
        leaves = add_floor_hooks(model, hooks, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4) if params else None
        scalers = {p: torch.amp.GradScaler(device, enabled=p == "fp16") for p in PRECISIONS}
        gen = torch.Generator().manual_seed(spec["seed"])
        length = int(spec["segment"] * common.SAMPLERATE)
        stems = (0.1 * torch.randn(spec["batch"], len(common.SOURCES), 2, length,
                                   generator=gen)).to(device)
        trainable, total = common.count_params(model)
        input_grad = CONFIGS[spec["name"]].kind == "floor_input"
        meter = common.PeakMemory(device)
        baseline = meter.start()
        conn.send({"ok": True, "trainable": trainable, "total": total, "baseline": baseline,
                   "hooked_layers": len(hooks)})

        def step(precision):
            _train_step(model, optimizer, params, stems, input_grad, precision,
                        scalers[precision], leaves)
        while True:
            cmd = conn.recv()
            if cmd[0] == "step":
                wall, cpu = common.timed(lambda: step(cmd[1]), device)
                common.release_memory()
                conn.send((wall, cpu))
            elif cmd[0] == "reset":
                meter.start()
                conn.send(True)
            elif cmd[0] == "memory":
                conn.send((meter.peak_delta(), meter.peak_total()))
            elif cmd[0] == "sdpa":
                kernels = sdpa_kernels(lambda: step(cmd[1]))
                common.release_memory()
                conn.send(kernels)
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

    def ask(self, name: str, *cmd):
        if name in self.errors:
            return None
        self.conns[name].send(cmd)
        return self._recv(name)

    def _stop(self, name: str) -> None:
        try:
            self.conns[name].send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.procs[name].join(timeout=30)

    def close(self) -> None:
        for name in self.alive():
            self._stop(name)


# ----------------------------------------------------------------------------- measure
def measure(args, size: str, names: tp.Sequence[str], precisions: tp.Sequence[str]
            ) -> tp.Dict[str, dict]:
    """{precision: raw series} for the configurations `names` on architecture `size`."""
    spec = {"size": size, "segment": args.segment, "batch": args.batch, "seed": args.seed,
            "device": args.device, "threads": args.threads}
    workers = Workers(names, spec, inprocess=args.inprocess)
    out = {}
    try:
        for precision in precisions:
            wall = {n: [] for n in names}
            cpu = {n: [] for n in names}
            for name in workers.alive():
                workers.ask(name, "reset")
            for i in range(args.warmup):
                for name in common.rotated(workers.alive(), i):
                    workers.ask(name, "step", precision)
            for i in range(args.rounds):
                for name in common.rotated(workers.alive(), i):
                    reply = workers.ask(name, "step", precision)
                    if reply is not None:
                        wall[name].append(reply[0])
                        cpu[name].append(reply[1])
                print(f"[{size} {precision}] round {i + 1}/{args.rounds} (wall/cpu s): " +
                      ", ".join(f"{n} {wall[n][-1]:.2f}/{cpu[n][-1]:.2f}"
                                for n in names if wall[n]), flush=True)
            memory = {n: workers.ask(n, "memory") for n in workers.alive()}
            sdpa = {n: workers.ask(n, "sdpa", precision)
                    for n in SDPA_CONFIGS if n in workers.alive()} if args.sdpa else {}
            out[precision] = {"wall": wall, "cpu": cpu, "memory": memory, "sdpa": sdpa,
                              "info": workers.info, "errors": dict(workers.errors)}
    finally:
        workers.close()
    for precision in precisions:  # a worker that failed later fails every precision
        if precision in out:
            out[precision]["errors"] = dict(workers.errors)
    return out


def _ratio(a, b) -> float:
    return a / b if a is not None and b else float("nan")


def _ratios(series: dict, reference: str) -> dict:
    complete = {n: v for n, v in series.items() if v}
    return common.round_ratios(complete, reference) if reference in complete else {}


def summarize_run(raw: dict, metric: str) -> dict:
    """Ratios of one (architecture, precision) run: vs full FT and vs each own floor."""
    series = raw["cpu"] if metric == "cpu" else raw["wall"]
    wall_ratio, cpu_ratio = _ratios(raw["wall"], "full"), _ratios(raw["cpu"], "full")
    time_ratio = cpu_ratio if metric == "cpu" else wall_ratio
    memory = {n: (m[0] if m else None) for n, m in raw["memory"].items()}
    totals = {n: (m[1] if m else None) for n, m in raw["memory"].items()}
    ref_mem = memory.get("full")
    nan = float("nan")
    configs = {}
    for name in raw["wall"]:
        info = raw["info"].get(name, {})
        config = CONFIGS[name]
        mem = memory.get(name)
        floor = config.floor if config.floor in raw["wall"] else None
        floor_time = _ratios({name: series[name], floor: series[floor]}, floor).get(name, nan) \
            if floor and series[name] and series[floor] else nan
        configs[name] = {
            "label": config.label, "kind": config.kind, "trainable": info.get("trainable"),
            "total": info.get("total"), "hooked_layers": info.get("hooked_layers"),
            "trainable_pct": (100.0 * info["trainable"] / info["total"]) if info else None,
            "step_s": common.median(raw["wall"][name]), "step_s_rounds": raw["wall"][name],
            "cpu_s": common.median(raw["cpu"][name]), "cpu_s_rounds": raw["cpu"][name],
            "time_ratio": time_ratio.get(name, nan), "wall_ratio": wall_ratio.get(name, nan),
            "cpu_ratio": cpu_ratio.get(name, nan),
            "peak_mem_bytes": mem, "mem_ratio": _ratio(mem, ref_mem),
            "max_allocated_bytes": totals.get(name),
            "floor": floor, "floor_time_ratio": floor_time,
            "floor_mem_ratio": _ratio(mem, memory.get(floor)) if floor else nan,
            "sdpa": raw["sdpa"].get(name), "error": raw["errors"].get(name)}
    peft_time = _ratios({n: series[n] for n in ("peft", "ours_peft_set") if n in series},
                        "peft").get("ours_peft_set", nan)
    peft_mem = _ratio(memory.get("ours_peft_set"), memory.get("peft"))
    return {"configs": configs, "ours_vs_peft_time": peft_time, "ours_vs_peft_mem": peft_mem}


def _get(run: dict, name: str, key: str) -> float:
    return run["configs"].get(name, {}).get(key, float("nan"))


def cpu_targets(run: dict) -> tp.List[dict]:
    """The issue's CPU targets, on the first architecture (the released one)."""
    rows = [
        ("heuristic step time vs its own floor", "heuristic", "floor_time_ratio", 1.05),
        ("heuristic peak memory vs full FT", "heuristic", "mem_ratio", 0.72),
        ("heuristic+checkpointing peak memory vs full FT", "heuristic_ckpt", "mem_ratio", 0.40),
        ("uniform step time vs full FT", "uniform", "time_ratio", 0.85),
        ("uniform peak memory vs full FT", "uniform", "mem_ratio", 0.95),
    ]
    out = [dict(common.target_row(t, _get(run, n, k), v), config=n) for t, n, k, v in rows]
    out.append(dict(common.target_row("ours / PEFT step time, same layers",
                                      run["ours_vs_peft_time"], 1.05), config="ours_peft_set"))
    return out


def cuda_targets(runs: tp.Sequence[dict]) -> tp.List[dict]:
    """The GPU goal: LoRA + checkpointing at batch 4 x 7.8 s within 8 GB, per precision."""
    return [dict(common.target_row(
        f"heuristic+checkpointing max_memory_allocated, {run['precision']} (GiB)",
        (_get(run, "heuristic_ckpt", "max_allocated_bytes") or float("nan")) / GIB,
        CUDA_GOAL_GIB), config="heuristic_ckpt", precision=run["precision"]) for run in runs]


def report(runs: tp.Sequence[dict], targets: tp.List[dict]) -> str:
    header = ["configuration", "trainable", "%", "wall s", "cpu s", "time x", "peak MB",
              "mem x", "alloc GiB", "own floor", "time/floor", "mem/floor"]
    blocks = []
    for run in runs:
        rows = []
        for name, c in run["configs"].items():
            total = c["max_allocated_bytes"]
            rows.append([
                name, f"{c['trainable'] or 0:,}",
                f"{c['trainable_pct']:.2f}" if c["trainable_pct"] is not None else "-",
                f"{c['step_s']:.2f}", f"{c['cpu_s']:.2f}", f"{c['time_ratio']:.2f}",
                f"{(c['peak_mem_bytes'] or 0) / common.MB:.0f}", f"{c['mem_ratio']:.2f}",
                f"{total / GIB:.2f}" if total else "-", c["floor"] or "-",
                f"{c['floor_time_ratio']:.2f}" if c["floor"] else "-",
                f"{c['floor_mem_ratio']:.2f}" if c["floor"] else "-"])
        text = f"-- {run['arch']} ({run['arch_label']}), {run['precision']}\n"
        text += common.format_table(header, rows)
        if "peft" in run["configs"]:
            text += (f"\nours vs PEFT on the same layers: time {run['ours_vs_peft_time']:.3f}x,"
                     f" peak memory {run['ours_vs_peft_mem']:.3f}x")
        kernels = {n: c["sdpa"] for n, c in run["configs"].items() if c.get("sdpa")}
        if kernels:
            text += "\nSDPA kernels: " + "; ".join(f"{n}: {', '.join(k)}"
                                                    for n, k in kernels.items())
        blocks.append(text)
    return "\n\n".join(blocks) + "\ntargets:\n" + common.format_targets(targets)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0], rounds=3)
    common.add_arch_argument(parser)
    parser.add_argument("--segment", type=float, default=None,
                        help=f"seconds per example (default {CPU_SEGMENT} on CPU, "
                             f"{FULL_SEGMENT} on CUDA; smoke 1.0)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"examples per step (default 1 on CPU, {CUDA_BATCH} on CUDA)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32 on CPU, "
                             "all three for the CUDA suite)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    parser.add_argument("--inprocess", action="store_true", default=None,
                        help="workers as threads of one process (default in smoke mode; "
                             "peak memory is then not per configuration)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of " + ",".join(CONFIGS))
    args = common.finish_args(parser.parse_args(argv))
    cuda_suite = args.suite == "cuda"
    sizes = common.archs(args)
    precisions = args.precisions.split(",") if args.precisions else \
        (list(PRECISIONS) if cuda_suite else ["fp32"])
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions: choose from {PRECISIONS}")
    if args.device == "cpu" and "fp16" in precisions and not args.smoke and not cuda_suite:
        print("note: fp16 autocast on CPU is slow and not what the solver uses on CPU")
    common.setup_torch(args)
    if args.segment is None:
        args.segment = 1.0 if args.smoke else (FULL_SEGMENT if cuda_suite else CPU_SEGMENT)
    if args.batch is None:
        args.batch = CUDA_BATCH if cuda_suite and not args.smoke else 1
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 1
    if args.cuda_fallback and "--rounds" not in (argv if argv is not None else sys.argv):
        args.rounds = 1  # fp16 autocast on CPU is slow: one round shows the path works
    if args.inprocess is None:
        args.inprocess = args.smoke
    args.sdpa = cuda_suite
    machine = common.describe_machine(args.device)
    notes = []
    if args.cuda_fallback:
        notes.append(common.NO_CUDA_SMOKE)
    if not cuda_suite and args.segment != FULL_SEGMENT and not args.smoke:
        notes.append(f"segment {args.segment} s instead of the {FULL_SEGMENT} s of "
                     f"conf/dset/wav.yaml, to keep a run of every configuration short on 2 "
                     "shared CPU cores")
    settings = {"suite": args.suite, "device": args.device, "archs": sizes,
                "batch": args.batch, "segment_s": args.segment, "rounds": args.rounds,
                "warmup": args.warmup, "precisions": precisions, "rank": RANK,
                "alpha": ALPHA, "threads": args.threads, "time_metric": args.time_metric,
                "inprocess": args.inprocess, "note": "; ".join(notes) or None}
    print(common.header("train step: LoRA vs full fine-tune", machine, settings), flush=True)
    runs, errors = [], {}
    for size in sizes:
        names = SMOKE_CONFIGS[args.suite] if args.smoke else \
            CUDA_CONFIGS if cuda_suite else CPU_CONFIGS[size]
        if args.configs:
            names = [n for n in names if n in args.configs.split(",")]
        if "full" not in names:
            parser.error("--configs must include full (the reference)")
        raw = measure(args, size, names, precisions)
        for precision, series in raw.items():
            run = {"arch": size, "arch_label": common.ARCHS[size][2], "precision": precision,
                   **summarize_run(series, args.time_metric)}
            runs.append(run)
            errors.update({f"{size}/{precision}/{k}": v for k, v in series["errors"].items()})
    targets = cuda_targets(runs) if cuda_suite else cpu_targets(runs[0])
    print(report(runs, targets))
    if args.time_metric == "cpu":
        print("time x = " + common.TIME_METRIC_NOTE)
    result = {"benchmark": "train_step", "machine": machine, "settings": settings,
              "reference": "full", "runs": runs, "targets": targets, "errors": errors or None}
    path = common.write_result("train_step", result, args)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
