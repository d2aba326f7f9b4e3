"""`enable_profiling` / `profile_memory`: a torch profiler over a few steps of the first
epoch, its trace written for tensorboard's profiler plugin."""
from __future__ import annotations

from pathlib import Path

import torch


def start_profiler(folder: Path, device: torch.device, memory: bool = False):
    """A started profiler (wait 1, warmup 1, 3 active steps; call ``.step()`` after every
    train step and ``.stop()`` at the end); `memory` adds the memory timeline and shapes."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3),
                   on_trace_ready=tensorboard_trace_handler(str(folder)),
                   profile_memory=memory, record_shapes=memory, with_stack=False)
    prof.start()
    return prof
