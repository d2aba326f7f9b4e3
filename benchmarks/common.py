"""Shared helpers of the benchmarks: machine description, memory, timing, models, results.

Every benchmark measures its configurations side by side in one run, with rounds
interleaved (the order rotates each round) and reports medians of per-round ratios, so
that load from other processes on a shared machine hits every configuration alike.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import torch

from demucs_lora.core.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONF_DIR = ROOT / "conf"
SOURCES = ["drums", "bass", "other", "vocals"]
SAMPLERATE = 44100
MB = 1024 ** 2


# ----------------------------------------------------------------------------- arguments
def base_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="CI mode: tiny model, 2 steps, results NAME_smoke.json")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds (default {rounds}; smoke: 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: memory is torch.cuda.max_memory_allocated; with --smoke "
                             "and no CUDA device the CUDA suite runs on CPU (and says so)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, see TIME_METRIC_NOTE)")
    parser.add_argument("--time-metric", default="auto", choices=["auto", "cpu", "wall"],
                        help="what the time ratios use (auto: cpu on CPU, wall on CUDA)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {RESULTS_DIR.relative_to(ROOT)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(default_rounds=rounds)
    return parser


TIME_METRIC_NOTE = (
    "on CPU the ratios use process CPU time of a single-threaded step: on a machine shared "
    "with other jobs, wall time swung 2x between rounds of the same configuration while "
    "single-thread CPU time stayed within a few percent; wall-time ratios are reported too")


NO_CUDA_SMOKE = ("--device cuda --smoke: no CUDA device visible to torch, so the CUDA suite "
                 "(its configurations, precisions, SDPA kernel check) runs on CPU; CUDA "
                 "timings and torch.cuda.max_memory_allocated were NOT measured")


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the device. `args.suite` is the device asked for (it names
    the results file); `args.device` the one used: a --smoke run of the CUDA suite on a
    machine without CUDA falls back to CPU (`args.cuda_fallback`), a real run refuses."""
    args.suite = args.device
    args.cuda_fallback = False
    if args.device == "cuda" and not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("--device cuda: no CUDA device visible to torch (the CPU smoke "
                             "of the CUDA suite is --device cuda --smoke)")
        print("note: " + NO_CUDA_SMOKE, flush=True)
        args.device, args.cuda_fallback = "cpu", True
    if args.time_metric == "auto":
        args.time_metric = "wall" if args.device == "cuda" else "cpu"
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.rounds is None:
        args.rounds = 2 if args.smoke else args.default_rounds
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    return args


def passive_omp() -> str:
    """OMP_WAIT_POLICY=PASSIVE for processes started from now on (unless already set).

    On a CPU shared with other jobs, OpenMP threads that spin while waiting made a step
    5-20x slower and its time erratic (measured: tiny HTDemucs 0.4 s -> 1.7-11 s);
    sleeping threads keep the ratios meaningful. Returns the policy in effect.
    """
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def setup_torch(args: argparse.Namespace) -> None:
    passive_omp()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> tp.Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe_machine(device: str = "cpu") -> dict:
    """What the numbers were measured on (goes into every results JSON)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    desc = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round((_mem_total() or 0) / 1024 ** 3, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(0)
        desc["cuda"] = torch.version.cuda
    return desc


def format_machine(desc: dict) -> str:
    threads = desc["torch_threads"]
    text = (f"{desc['cpu']}, {desc['cores']} cores ({threads} torch "
            f"thread{'s' if threads != 1 else ''}), "
            f"{desc['ram_gb']} GB RAM, torch {desc['torch']}, python {desc['python']}, "
            f"load avg {desc['load_avg_1m']}")
    if desc.get("gpu"):
        text += f"; GPU {desc['gpu']} (CUDA {desc['cuda']})"
    return text


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_memory() -> None:
    """Give freed heap memory back to the OS (so idle workers do not hold RAM), and the
    CUDA allocator's cached blocks back to the device (so idle workers hold no more GPU
    memory than their tensors)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory over a baseline taken after the model is built.

    CPU: delta of peak RSS (ru_maxrss) over the RSS at `start()`; measure each
    configuration in its own fresh process. CUDA: torch.cuda.max_memory_allocated over
    memory_allocated at `start()`.
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0

    def start(self) -> int:
        release_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()
        return self.baseline

    def peak_delta(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return peak_rss_bytes() - self.baseline

    def peak_total(self) -> tp.Optional[int]:
        """CUDA: torch.cuda.max_memory_allocated itself (weights, optimizer state and
        activations: what has to fit on the card). CPU: None (RSS includes the runtime)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return None


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: tp.Callable[[], tp.Any], device: str = "cpu") -> tp.Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: tp.Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def rotated(items: tp.Sequence, round_index: int) -> list:
    """`items` rotated by the round index: each configuration takes each position."""
    k = round_index % max(1, len(items))
    return list(items[k:]) + list(items[:k])


def round_ratios(times: tp.Mapping[str, tp.Sequence[float]], reference: str
                 ) -> tp.Dict[str, float]:
    """Median over rounds of time[config][i] / time[reference][i]."""
    ref = times[reference]
    return {name: median([a / b for a, b in zip(values, ref) if b > 0])
            for name, values in times.items()}


# ----------------------------------------------------------------------------- models
# Architectures the benchmarks run on: name -> (conf/model file, overrides, label).
# "released" is the htdemucs users fine-tune (conf/model/htdemucs.yaml: dconv_mode=3,
# bottom_channels=512, 41.98M params); "default" the HTDemucs() constructor defaults
# (26.9M params, what every benchmark measured before; kept as a second row).
ARCHS: tp.Dict[str, tp.Tuple[str, dict, str]] = {
    "released": ("htdemucs.yaml", {}, "released htdemucs architecture, 41.98M params"),
    "default": ("htdemucs.yaml", {"dconv_mode": 1, "bottom_channels": 0, "t_dropout": 0.0},
                "HTDemucs() constructor defaults, 26.9M params"),
    "tiny": ("htdemucs_tiny.yaml", {}, "tiny HTDemucs (smoke)"),
}


def add_arch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=None,
                        help="comma-separated architectures (the first is the one targets are "
                             f"checked on): {', '.join(a for a in ARCHS if a != 'tiny')}; "
                             "default released,default (CUDA suite: released); --smoke: tiny")


def archs(args: argparse.Namespace) -> tp.List[str]:
    if args.smoke:
        return ["tiny"]
    if args.arch is None:
        return ["released"] if getattr(args, "suite", "cpu") == "cuda" else ["released",
                                                                             "default"]
    names = [a for a in args.arch.split(",") if a]
    bad = [a for a in names if a not in ARCHS]
    if bad or not names:
        raise SystemExit(f"--arch {args.arch}: choose from {list(ARCHS)}")
    return names


def model_config(size: str = "released", segment: float = 4.0,
                 channels: tp.Optional[int] = None, sources: tp.Sequence[str] = SOURCES,
                 **htdemucs: tp.Any):
    """A run config for `demucs_lora.models.build.build_model`: random base, conf/model values.

    size: an ARCHS name ("released", "default", "tiny"); `htdemucs` overrides keys of the
    model node (lora_rank, lora_rank_mode, ...).
    """
    from omegaconf import OmegaConf
    from demucs_lora.config.schema import load_group_file  # follows the defaults lists
    name, arch_overrides, _ = ARCHS[size]
    node = OmegaConf.create(load_group_file(CONF_DIR / "model" / name)["htdemucs"])
    for key, value in arch_overrides.items():
        node[key] = value
    if channels is not None:
        node.channels = int(channels)
    for key, value in htdemucs.items():
        node[key] = value
    return OmegaConf.create({
        "continue_from": None, "pretrained_repo": None, "trust_remote_code": False,
        "source_init": None, "residual_source": None, "train_heads": None, "htdemucs": node,
        "dset": {"sources": list(sources), "samplerate": SAMPLERATE, "channels": 2,
                 "segment": float(segment)}})


def build(cfg, seed: int = 0):
    """(model, report) of `build_model` with a fixed seed (same base weights)."""
    from demucs_lora.config.run_config import model_spec
    from demucs_lora.models.build import build_model
    torch.manual_seed(seed)
    return build_model(model_spec(cfg))


def count_params(model: torch.nn.Module) -> tp.Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ----------------------------------------------------------------------------- results
def check(value: float, target: float, op: str = "<=") -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value <= target if op == "<=" else value >= target


def target_row(name: str, value: float, target: float, op: str = "<=") -> dict:
    return {"name": name, "value": value, "target": target, "op": op,
            "pass": check(value, target, op)}


def verdict(row: dict) -> str:
    return "PASS" if row["pass"] else "MISS"


def format_targets(targets: tp.Sequence[dict]) -> str:
    lines = []
    for row in targets:
        lines.append(f"  [{verdict(row)}] {row['name']}: {row['value']:.3f} "
                     f"(target {row['op']} {row['target']})")
    return "\n".join(lines)


def format_table(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def results_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else RESULTS_DIR


def result_name(name: str, suite: str = "cpu", smoke: bool = False) -> str:
    """NAME (CPU suite), NAME_cuda (CUDA suite), + _smoke in smoke mode."""
    return f"{name}{'_cuda' if suite == 'cuda' else ''}{'_smoke' if smoke else ''}"


def result_path(name: str, args: argparse.Namespace) -> Path:
    """Where `write_result(name, ..., args)` writes."""
    stem = result_name(name, getattr(args, "suite", "cpu"), args.smoke)
    return results_dir(args) / f"{stem}.json"


def write_result(name: str, data: dict, args: argparse.Namespace) -> Path:
    """benchmarks/results/NAME.json (NAME_cuda.json for the CUDA suite, + _smoke in smoke
    mode), written atomically."""
    path = result_path(name, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def header(title: str, machine: dict, settings: dict) -> str:
    lines = [f"== {title}", f"machine: {format_machine(machine)}"]
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(lines)
