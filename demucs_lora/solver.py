"""Train / valid loop with exact resume, Dora history, tensorboard and checkpoints.

Stateful parts (trainable tensors, optimizer, scheduler, EMA, RNG, history) are saved
together in checkpoint.th at the end of every epoch, so a run killed at any point
restarts the interrupted epoch from the same state and reproduces the same history.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F
import tqdm
from demucs.apply import apply_model
from dora import distrib, get_xp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint as ckpt
from .data.stems import augment_batch
from .metrics import nsdr
from .optim import TrainableEMA, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


class Solver:
    def __init__(self, cfg: DictConfig, model: nn.Module, report: dict, loaders: dict,
                 augment: nn.Module, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.report = report
        self.loaders = loaders
        self.augment = augment.to(device)
        self.xp = get_xp()
        self.folder = Path(self.xp.folder)
        self.is_master = distrib.is_master()
        self.dmodel = self.model
        if distrib.world_size() > 1:  # DDP all-reduces the trainable parameters only
            from torch.nn.parallel import DistributedDataParallel
            ids = [device.index or 0] if device.type == "cuda" else None
            self.dmodel = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        steps = len(loaders["train"])
        self.steps_per_epoch = steps if cfg.max_batches is None else min(steps, cfg.max_batches)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim,
                                         self.steps_per_epoch * cfg.epochs)
        self.ema = TrainableEMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        # fp16 needs loss scaling (bf16 has float32's range and does not).
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        self.history: tp.List[dict] = []
        self.best_state = None
        self.best_nsdr = -float("inf")
        self.writer = None
        if self.is_master:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder / "tensorboard"))
        weights = cfg.weights or [1.0] * len(cfg.dset.sources)
        self.weights = torch.tensor(list(weights), dtype=torch.float32, device=device)

    # ---------------------------------------------------------------- state
    def _state(self) -> dict:
        return {"model": ckpt.trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "rng": ckpt.rng_state(), "epoch": len(self.history),
                "history": self.history, "best_state": self.best_state,
                "best_nsdr": self.best_nsdr}

    def restore(self) -> bool:
        path = self.folder / "checkpoint.th"
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        ckpt.load_trainable_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        self.history = state["history"]
        self.best_state, self.best_nsdr = state["best_state"], state["best_nsdr"]
        self.xp.link.update_history(self.history)
        logger.info("Resumed from %s at epoch %d", path, len(self.history))
        return True

    # ---------------------------------------------------------------- loops
    def _autocast(self):
        mp = self.cfg.mixed_precision
        if not mp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loss(self, estimate: torch.Tensor, sources: torch.Tensor) -> tp.Tuple[torch.Tensor,
                                                                                torch.Tensor]:
        fn = F.l1_loss if self.cfg.optim.loss == "l1" else F.mse_loss
        per_source = fn(estimate.float(), sources, reduction="none").mean(dim=(0, 2, 3))
        return (per_source * self.weights).sum() / self.weights.sum(), per_source

    def train_epoch(self, epoch: int) -> dict:
        self.dmodel.train()
        # Per epoch and rank: a resumed epoch replays exactly, in every process.
        torch.manual_seed(self.cfg.seed + 1000 * (epoch + 1) + distrib.rank())
        loader = self.loaders["train"]
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        total, count, grad_norm = 0.0, 0, 0.0
        bar = tqdm.tqdm(loader, total=self.steps_per_epoch, desc=f"train {epoch + 1}",
                        leave=False, disable=not self.is_master, mininterval=1.0)
        profiling = self.cfg.enable_profiling or self.cfg.get("profile_memory")
        profiler = self._profiler() if profiling and epoch == 0 else None
        start = time.time()
        for idx, batch in enumerate(bar):
            if idx >= self.steps_per_epoch:
                break
            batch = augment_batch(self.augment, batch.to(self.device))
            mix, stems = batch[:, 0], batch[:, 1:]
            with self._autocast():
                estimate = self.dmodel(mix)
            loss, _ = self._loss(estimate, stems)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            clip = self.cfg.optim.clip_grad or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema:
                self.ema.update(self.model)
            if profiler is not None:
                profiler.step()
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}",
                            it_s=f"{count / (time.time() - start):.2f}")
            if self.is_master and (idx + 1) % max(1, self.steps_per_epoch //
                                                  max(1, self.cfg.misc.num_prints)) == 0:
                logger.info("epoch %d step %d/%d loss %.4f", epoch + 1, idx + 1,
                            self.steps_per_epoch, total / count)
        if profiler is not None:
            profiler.stop()
        loss = torch.tensor([total, count], dtype=torch.float64)
        if distrib.world_size() > 1:
            torch.distributed.all_reduce(loss)
        return {"loss": float(loss[0] / max(loss[1], 1)), "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": time.time() - start}

    def _profiler(self):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if self.device.type == "cuda" else [])
        memory = bool(self.cfg.get("profile_memory"))  # memory timeline in the trace
        prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3),
                       on_trace_ready=tensorboard_trace_handler(str(self.folder / "profile")),
                       profile_memory=memory, record_shapes=memory, with_stack=False)
        prof.start()
        return prof

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """Separate whole valid tracks with apply_model; nSDR per source and mean."""
        model = self.model
        swap = None
        if self.ema:
            swap = ckpt.trainable_state(model)
            ckpt.load_trainable_state(model, self.ema.shadow)
        model.eval()
        dataset = self.loaders["valid"].dataset
        indices = list(range(distrib.rank(), len(dataset), distrib.world_size()))
        sums = torch.zeros(len(self.cfg.dset.sources) + 1, dtype=torch.float64)
        for index in tqdm.tqdm(indices, desc=f"valid {epoch + 1}", leave=False,
                               disable=not self.is_master):
            track = dataset[index].to(self.device)
            mix, ref = track[0], track[1:]
            est = apply_model(model, mix[None], shifts=self.cfg.test.shifts,
                              split=self.cfg.test.split, overlap=self.cfg.test.overlap,
                              progress=False, num_workers=0)[0]
            sums[:-1] += nsdr(est.cpu()[None], ref.cpu()[None])[0].double()
            sums[-1] += 1
        if distrib.world_size() > 1:
            torch.distributed.all_reduce(sums)
        if swap is not None:
            ckpt.load_trainable_state(model, swap)
        per_source = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        metrics = {f"nsdr_{name}": value for name, value in zip(self.cfg.dset.sources, per_source)}
        metrics["nsdr"] = sum(per_source) / len(per_source)
        return metrics

    # ---------------------------------------------------------------- run
    def _log_epoch(self, epoch: int, metrics: dict) -> None:
        if self.writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
            self.writer.flush()
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        logger.info("Epoch %d/%d: %s", epoch + 1, self.cfg.epochs, text)

    def _adapter_header(self) -> dict:
        return {"targets": list(self.cfg.htdemucs.lora_targets),
                "rank_mode": self.cfg.htdemucs.lora_rank_mode,
                "source_init": OmegaConf.to_container(self.cfg.source_init)
                if self.cfg.source_init is not None else None,
                "xp": self.xp.sig}

    def _save_epoch(self, epoch: int, metrics: dict) -> None:
        folder = self.folder
        (folder / "validation").mkdir(exist_ok=True)
        (folder / "validation" / f"epoch_{epoch + 1:03d}.json").write_text(
            json.dumps(metrics, indent=2))
        header = self._adapter_header()
        state = self.ema.shadow if self.ema else None
        ckpt.save_adapter_with_state(self.model, state, folder / "lora_last", **header)
        if metrics.get("is_best"):
            ckpt.save_best_model(self.model, self.best_state, self.cfg, folder / "best.th")
            ckpt.save_adapter_with_state(self.model, self.best_state, folder / "lora_best",
                                         **header)
        ckpt.atomic_torch_save(self._state(), folder / "checkpoint.th")

    def _initial_validation(self) -> dict:
        """nSDR of the model before any training step (the base, for an adaptation)."""
        path = self.folder / "validation" / "epoch_000.json"
        if path.exists():
            return json.loads(path.read_text())
        metrics = {f"valid_initial_{k}": v for k, v in self.validate(-1).items()}
        if self.is_master:
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(metrics, indent=2))
            self._log_epoch(-1, metrics)
        return metrics

    def _over_budget(self) -> bool:
        """Equal wall-clock comparisons: stop once the train time spent exceeds the budget."""
        budget = self.cfg.train_budget_seconds
        return budget is not None and sum(h.get("train_seconds", 0.0)
                                          for h in self.history) >= budget

    def run(self) -> tp.List[dict]:
        if not self.restore() and self.is_master:  # the starting point, to compare with
            ckpt.save_adapter_with_state(self.model, None, self.folder / "lora_init",
                                         **self._adapter_header())
        initial = self._initial_validation() if self.cfg.test.initial else {}
        for epoch in range(len(self.history), self.cfg.epochs):
            if self._over_budget():  # checked first, so a resumed run stops at once too
                logger.info("Stopping before epoch %d: train_budget_seconds=%s spent",
                            epoch + 1, self.cfg.train_budget_seconds)
                break
            metrics = {"epoch": epoch + 1, **(initial if epoch == 0 else {})}
            metrics.update({f"train_{k}" if k != "loss" else "train_loss": v
                            for k, v in self.train_epoch(epoch).items()})
            validate = (epoch + 1) % self.cfg.test.every == 0 or epoch + 1 == self.cfg.epochs
            if validate:
                metrics.update({f"valid_{k}": v for k, v in self.validate(epoch).items()})
            score = metrics.get("valid_nsdr", -float("inf"))
            is_best = score > self.best_nsdr or self.best_state is None or not self.cfg.test.best
            if is_best:
                self.best_nsdr = max(score, self.best_nsdr)
                self.best_state = {k: v.clone() for k, v in
                                   (self.ema.shadow if self.ema else
                                    ckpt.trainable_state(self.model)).items()}
            metrics["best_nsdr"] = self.best_nsdr
            self.history.append(metrics)
            if self.is_master:
                self._log_epoch(epoch, metrics)
                self._save_epoch(epoch, dict(metrics, is_best=is_best))
                self.xp.link.push_metrics(metrics)
            if distrib.world_size() > 1:
                torch.distributed.barrier()
        if self.writer:
            self.writer.close()
        return self.history
