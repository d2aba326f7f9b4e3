"""A real Solver on a tiny LoRA model and a few random tensors, without Dora or data files.

`make_solver(folder, ...)` builds what `demucs_lora.train.run` hands the Solver (config,
model, loaders, augment) in well under a second and fakes the Dora XP (folder + link), so
checkpoint, resume, divergence and signal behaviour is tested at unit level.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path
from types import SimpleNamespace

import torch
from helpers import TARGETS, inject_all, tiny_htdemucs

BASE_OVERRIDES = ["model=htdemucs_tiny", "variant=debug", "htdemucs.t_layers=1",
                  "htdemucs.lora_rank=2", "max_batches=3", "batch_size=2",
                  "dset.segment=0.25", "dset.shift=0.25", "test.initial=false",
                  "misc.num_prints=1"]
SR = 8000


class FakeLink:
    def __init__(self):
        self.history: tp.List[dict] = []

    def update_history(self, history):
        self.history[:] = list(history)

    def push_metrics(self, metrics):
        self.history.append(metrics)


def config(*overrides: str):
    from demucs_lora.config.compose import compose
    return compose([*BASE_OVERRIDES, f"dset.samplerate={SR}", *overrides])


def tiny_base(seed: int = 0):
    """The tiny HTDemucs at the solver tests' rate and segment."""
    return tiny_htdemucs(seed=seed, samplerate=SR, segment=0.25, nfft=1024)


def lora(base, rank: int = 2):
    """LoRA on the encoder and decoder (B = 0), in place."""
    return inject_all(base, rank, TARGETS[:2])


def _examples(count: int, seconds: float, seed: int) -> tp.List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        stems = 0.1 * torch.randn(4, 2, int(seconds * SR), generator=gen)
        out.append(torch.cat([stems.sum(0, keepdim=True), stems]))
    return out


def loaders(cfg, seed: int = 0, train_examples: int = 8, num_workers: int = 0) -> dict:
    from torch.utils.data import DataLoader
    from demucs_lora.data.stems import train_segment
    train = _examples(train_examples, train_segment(cfg.dset), seed)  # cfg: a RunConfig
    valid = _examples(1, 0.5, seed + 1)
    return {"train": DataLoader(train, batch_size=cfg.batch_size, shuffle=True,
                                drop_last=True, num_workers=num_workers),
            "valid": DataLoader(valid, batch_size=1), "test": DataLoader(valid, batch_size=1)}


def fake_xp(monkeypatch, folder: Path, sig: str = "testxp"):
    xp = SimpleNamespace(folder=Path(folder), sig=sig, link=FakeLink())
    Path(folder).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr("demucs_lora.training.solver.get_xp", lambda: xp)
    return xp


def make_solver(monkeypatch, folder: Path, *overrides: str, model=None, base_seed: int = 0,
                num_workers: int = 0):
    from demucs_lora.data.stems import build_augment
    from demucs_lora.training.solver import Solver
    from demucs_lora.config.run_config import run_config
    cfg = run_config(config(*overrides))
    fake_xp(monkeypatch, folder)
    model = model if model is not None else lora(tiny_base(base_seed))
    torch.manual_seed(cfg.seed)
    augment = build_augment(dict(cfg.dset.augment), SR, cfg.dset.segment)
    return Solver(cfg, model, loaders(cfg, num_workers=num_workers),
                  augment, torch.device("cpu"))


def trainable(solver) -> tp.Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in solver.model.named_parameters()
            if p.requires_grad}


def one_thread():
    """Generator for an autouse fixture: tiny models run much faster on one thread than on
    oversubscribed cores (measured 20x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
