"""Train / valid loop with exact resume, Dora history, tensorboard and checkpoints.

Stateful parts (trainable tensors, optimizer, scheduler, EMA, RNG, history, ...) are
registered once (`_register_state`): checkpoint.th, saved at the end of every epoch, the
resume validator and the restore all follow that list, so a run killed at any point
restarts the interrupted epoch from the same state and reproduces the same history.
SIGTERM / SIGUSR1 stop at the next step boundary with a checkpoint that resumes exactly
there (`epoch.EpochProgress`). The NaN policy (docs/safety.md): a non-finite loss or
gradient is skipped up to ``optim.skip_nonfinite`` times per epoch, then the run stops
(`finite.divergence_error`) without overwriting the last finite checkpoint; non-finite
weights stop it too; a non-finite validation score or state is never the best.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F
import tqdm
from dora import distrib, get_xp
from torch import nn

from demucs_lora.config.run_config import RunConfig
from demucs_lora.core.errors import TrainingDiverged
from demucs_lora.core.files import atomic_torch_save
from demucs_lora.core.finite import divergence_error, nonfinite_names
from demucs_lora.core.rng import rng_state, set_rng_state
from demucs_lora.data.stems import augment_batch
from demucs_lora.models.trainable import load_trainable_state, trainable_state
from demucs_lora.training import checkpoint as ckpt
from demucs_lora.training.epoch import (EpochProgress, agree, budget_spent, ddp_wrap,
                                        gather_rng, optimizer_steps, start_epoch)
from demucs_lora.training.optim import (TrainableEMA, autocast, build_optimizer,
                                        build_scheduler)
from demucs_lora.training.profiling import start_profiler
from demucs_lora.training.run_report import RunReport
from demucs_lora.training.state_registry import StateRegistry
from demucs_lora.training.validation import best_candidate, valid_nsdr
from demucs_lora.training.xp_guard import StopSignals, active_stop_signals

logger = logging.getLogger(__name__)
FP16_MAX_SKIPS = 24  # consecutive overflowing fp16 steps (loss scale / 2**24) = diverged


class Solver:
    """One XP's training: epochs of optimizer steps, validation, best and checkpoints."""

    def __init__(self, cfg: RunConfig, model: nn.Module, loaders: dict, augment: nn.Module,
                 device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.loaders = loaders
        self.augment = augment.to(device)
        self.xp = get_xp()
        self.folder = Path(self.xp.folder)
        self.is_master = distrib.is_master()
        self._wrap_ddp()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.accumulate = cfg.optim.accumulate  # micro-batches per step
        self.steps_per_epoch = optimizer_steps(len(loaders["train"]), cfg.max_batches,
                                               self.accumulate)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim,
                                         self.steps_per_epoch * cfg.epochs)
        self.ema = TrainableEMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        # fp16 needs loss scaling (bf16 has float32's range and does not).
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        self.history: tp.List[dict] = []
        self.best_state = None
        self.best_nsdr = -float("inf")
        self.report = RunReport(self.folder, logger, self.is_master)  # log, tensorboard, JSON
        self.sources = list(model.sources)  # the run's (cfg.dset.sources)
        weights = cfg.weights or [1.0] * len(self.sources)
        self.weights = torch.tensor(list(weights), dtype=torch.float32, device=device)
        self.base = ckpt.base_record(self.model, cfg.base)  # checked against checkpoint.th
        self.stop = active_stop_signals() or StopSignals()  # train.main installs one
        self.partial: tp.Optional[EpochProgress] = None  # a stopped epoch to finish
        self.saved = "no epoch had finished, so nothing was saved"  # what checkpoint.th is
        self.adaptation = None  # htdemucs.lora_rank_adaptation (lora/rank_adaptation.py)
        if cfg.lora.lora_rank_adaptation and cfg.lora.lora_rank > 0:
            from demucs_lora.lora.rank_adaptation import RankAdaptation
            self.adaptation = RankAdaptation(self.model, cfg.lora, seed=cfg.seed)
        self.state = StateRegistry(ckpt.CHECKPOINT_FORMAT)  # what checkpoint.th holds
        self._register_state()

    def _wrap_ddp(self) -> None:
        """DDP all-reduces the trainable parameters only (rewrapped when ranks change: the
        old wrapper's gradient hooks are dropped first, with it)."""
        if getattr(self, "dmodel", None) is not None and self.dmodel is not self.model:
            import gc
            self.dmodel = None
            gc.collect()
        self.dmodel = ddp_wrap(self.model, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- state
    def _register_state(self) -> None:
        """Every stateful part, once, in restore order (the base is checked first, the
        adapted ranks come before the tensors of those ranks). A new part is one line."""
        state, path = self.state, self.folder / "checkpoint.th"
        state.register("base", lambda: self.base,
                       lambda v: ckpt.check_same_base(v, self.base, path), ckpt.base_ok)
        state.register("rank_adaptation", lambda: self.adaptation and
                       self.adaptation.state_dict(), self._load_ranks, ckpt.rank_adaptation_ok)
        state.register("model", lambda: trainable_state(self.model),
                       lambda v: load_trainable_state(self.model, v), ckpt.tensor_dict)
        state.register_stateful("optimizer", self.optimizer, ckpt.optimizer_ok)
        state.register_stateful("scheduler", self.scheduler, ckpt.is_dict)
        state.register_stateful("scaler", self.scaler, ckpt.is_dict)
        state.register_stateful("ema", self.ema, ckpt.ema_ok)
        state.register("rng", rng_state, set_rng_state, ckpt.rng_ok)
        state.register("epoch", lambda: len(self.history), None, ckpt.epoch_ok)  # derived
        state.register_attribute(self, "history", ckpt.history_ok)
        state.register_attribute(self, "best_state", ckpt.optional_tensor_dict)
        state.register_attribute(self, "best_nsdr", ckpt.number_ok, float)
        state.register("partial", lambda: self.partial and self.partial.to_state(),
                       lambda v: setattr(self, "partial", v and EpochProgress.from_state(v)),
                       ckpt.partial_ok)

    def _load_ranks(self, state: tp.Optional[dict]) -> None:
        if self.adaptation and state:  # resize the layers, then the tensors load into them
            self.adaptation.load_state_dict(state, self.optimizer, self.ema)
            self._wrap_ddp()

    def restore(self) -> bool:
        """Resume from checkpoint.th (read with weights_only=True, checked, on the same
        base); False when there is none. CheckpointError when it cannot be used."""
        path = self.folder / "checkpoint.th"
        if not ckpt.restore_checkpoint(path, self.state):
            return False
        self.saved = self._describe_saved()
        self.xp.link.update_history(self.history)
        logger.info("Resumed from %s at epoch %d%s", path, len(self.history),
                    f", step {self.partial.step}" if self.partial else "")
        return True

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
        progress, self.partial = start_epoch(self.partial, epoch, self.steps_per_epoch), None
        batches = iter(loader)
        progress.replay(batches, self.accumulate)  # a stopped epoch: from the stop on
        bar = tqdm.tqdm(total=self.steps_per_epoch, initial=progress.step, leave=False,
                        desc=f"train {epoch + 1}", disable=not self.is_master, mininterval=1.0)
        memory = self.cfg.profile_memory  # memory timeline in the trace
        profiler = (start_profiler(self.folder / "profile", self.device, memory)
                    if (self.cfg.enable_profiling or memory) and epoch == 0 and not progress.step
                    else None)
        start = time.time() - progress.seconds
        every = max(1, self.steps_per_epoch // max(1, self.cfg.misc.num_prints))
        while progress.step < self.steps_per_epoch:
            micro = [b for b in (next(batches, None) for _ in range(self.accumulate))
                     if b is not None]
            if len(micro) < self.accumulate:
                break
            stop = self._train_step(micro, progress)
            if profiler is not None:
                profiler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{progress.total / max(1, progress.count):.4f}")
            if self.is_master and progress.step % every == 0:
                logger.info("epoch %d step %d/%d loss %.4f", epoch + 1, progress.step,
                            self.steps_per_epoch, progress.total / max(1, progress.count))
            if stop and progress.step < self.steps_per_epoch:
                progress.seconds = time.time() - start
                self._stop_mid_epoch(progress)
        bar.close()
        if profiler is not None:
            profiler.stop()
        return progress.metrics(self.optimizer.param_groups[0]["lr"], time.time() - start)

    def _backward(self, micro: tp.Sequence[torch.Tensor]) -> float:
        """Gradients of the mean loss over the micro-batches (optim.accumulate); under DDP
        they are all-reduced once, with the last micro-batch's backward."""
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            sync = (self.dmodel.no_sync() if not last and hasattr(self.dmodel, "no_sync")
                    else contextlib.nullcontext())
            batch = augment_batch(self.augment, batch.to(self.device))
            with sync:
                with autocast(self.cfg.mixed_precision, self.device.type):
                    estimate = self.dmodel(batch[:, 0])
                loss, _ = self._loss(estimate, batch[:, 1:])
                self.scaler.scale(loss / len(micro)).backward()
            value += float(loss.item()) / len(micro)
        return value

    def _train_step(self, micro: tp.Sequence[torch.Tensor], progress: EpochProgress) -> bool:
        """One optimizer step over `accumulate` micro-batches (or a skipped non-finite
        one); True when a stop signal reached any rank. Raises TrainingDiverged past the
        non-finite allowance."""
        value = self._backward(micro)
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        bad_loss, bad_grad, stop = agree([not math.isfinite(value),
                                          not math.isfinite(grad_norm), self.stop.requested],
                                         self.device)
        progress.step += 1
        if bad_loss or (bad_grad and not self.scaler.is_enabled()):
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the scale, clears the unscale_ record
            what = (f"the loss is {value}" if bad_loss else f"the gradient norm is {grad_norm}")
            self._skip_nonfinite(progress, what if distrib.world_size() == 1
                                 else f"{what} (on some rank)")
        else:
            self.scaler.step(self.optimizer)  # fp16: skips overflowing grads by itself
            self.scaler.update()
            progress.fp16_skips = progress.fp16_skips + 1 if bad_grad else 0
            if progress.fp16_skips >= FP16_MAX_SKIPS:
                raise self._diverged(progress, f"fp16 gradients overflowed {FP16_MAX_SKIPS} "
                                     "steps in a row")
            if self.ema and not bad_grad:
                self.ema.update(self.model)
            progress.total += value
            progress.count += 1
            progress.grad_norm = grad_norm
        self.scheduler.step()
        return stop

    def validate(self, epoch: int) -> dict:
        """nSDR of the valid tracks, under the EMA weights when there is an EMA."""
        with self.ema.applied(self.model) if self.ema else contextlib.nullcontext():
            return valid_nsdr(self.model, self.loaders["valid"].dataset, self.sources,
                              self.cfg.test, self.device, f"valid {epoch + 1}", self.is_master)

    # ---------------------------------------------------------------- run
    def _adapter_header(self) -> dict:
        lora, init = self.cfg.lora, self.cfg.model.source_init
        return {"targets": list(lora.lora_targets),
                "rank_mode": lora.lora_rank_mode,
                "rank_adaptation": self.adaptation is not None,
                "save_dtype": lora.lora_save_dtype,
                "source_init": dict(init) if init is not None else None,
                "xp": self.xp.sig}

    def _save_adapters(self, is_best: bool) -> None:
        """lora_last (the EMA's weights when there is an EMA); best.th and lora_best."""
        folder, header = self.folder, self._adapter_header()
        state = self.ema.shadow if self.ema else None
        ckpt.save_adapter_with_state(self.model, state, folder / "lora_last", **header)
        if is_best:
            ckpt.save_best_model(self.model, self.best_state, self.cfg.training_args,
                                 folder / "best.th")
            ckpt.save_adapter_with_state(self.model, self.best_state, folder / "lora_best",
                                         **header)

    def _adapt_ranks(self, epoch: int) -> None:
        """Dynamic rank adaptation (every process, same decision); see rank_adaptation.py."""
        from demucs_lora.data.stems import calibration_batches
        batches = calibration_batches(self.loaders["train"], self.augment, self.device)
        self.adaptation.reallocate(batches, lambda est, ref: self._loss(est, ref)[0],
                                   self.optimizer, self.ema, epoch)
        self._wrap_ddp()
        if self.is_master:
            self.adaptation.write_history(self.folder, self.report.writer)

    def _initial_validation(self) -> dict:
        """nSDR of the model before any training step (the base, for an adaptation);
        a torn or foreign epoch_000.json (a disk that filled up) is recomputed."""
        metrics = self.report.saved_initial()
        if metrics is not None:
            return metrics
        metrics = {f"valid_initial_{k}": v for k, v in self.validate(-1).items()}
        if self.is_master:
            self.report.epoch(-1, self.cfg.epochs, metrics)
        return metrics

    def run(self) -> tp.List[dict]:
        owned = not self.stop.installed
        self.stop.install()
        try:
            return self._run()
        finally:
            self.report.close()
            if owned:
                self.stop.restore()

    def _run(self) -> tp.List[dict]:
        if not self.restore() and self.is_master:  # the starting point, to compare with
            ckpt.forget_other_base(self.folder, self.base)
            ckpt.save_adapter_with_state(self.model, None, self.folder / "lora_init",
                                         **self._adapter_header())
        initial = self._initial_validation() if self.cfg.test.initial else {}
        for epoch in range(len(self.history), self.cfg.epochs):
            self._stop_requested()
            if budget_spent(self.history, self.cfg.train_budget_seconds):  # a resumed run too
                logger.info("Stopping before epoch %d: train_budget_seconds=%s spent",
                            epoch + 1, self.cfg.train_budget_seconds)
                break
            metrics = {"epoch": epoch + 1, **(initial if epoch == 0 else {})}
            metrics.update({f"train_{k}" if k != "loss" else "train_loss": v
                            for k, v in self.train_epoch(epoch).items()})
            self._check_finite_weights(epoch)
            validate = (epoch + 1) % self.cfg.test.every == 0 or epoch + 1 == self.cfg.epochs
            if validate:
                metrics.update({f"valid_{k}": v for k, v in self.validate(epoch).items()})
            best = self._best_candidate(epoch, metrics)
            metrics["best_nsdr"] = self.best_nsdr
            self.history.append(metrics)
            if self.is_master:
                self.report.epoch(epoch, self.cfg.epochs, metrics, is_best=best is not None)
                self._save_adapters(best is not None)
            if self.adaptation and self.adaptation.due(epoch, self.cfg.epochs):
                self._adapt_ranks(epoch)  # after the adapters of this epoch, before its checkpoint
            if self.is_master:
                atomic_torch_save(self.state.save(), self.folder / "checkpoint.th")
                self.xp.link.push_metrics(metrics)
            self.saved = self._describe_saved()
            if distrib.world_size() > 1:
                torch.distributed.barrier()
        self._stop_requested()
        if self.history and self.best_state is None:
            raise TrainingDiverged(
                f"no epoch of {len(self.history)} had a finite validation score, so no best.th "
                "was written (the model outputs NaN/inf): retrain with a lower optim.lr or "
                "optim.clip_grad=1.0")
        return self.history

    # ---------------------------------------------------------------- guards
    def _describe_saved(self) -> str:
        where = (f"epoch {self.partial.epoch + 1} step {self.partial.step}" if self.partial
                 else f"end of epoch {len(self.history)}")
        return f"checkpoint.th still holds the last finite state ({where})"

    def _diverged(self, progress: EpochProgress, what: str) -> TrainingDiverged:
        where = f"epoch {progress.epoch + 1}, step {progress.step}/{self.steps_per_epoch}"
        return divergence_error(self.cfg.optim, self.cfg.mixed_precision, where, what, self.saved)

    def _skip_nonfinite(self, progress: EpochProgress, what: str) -> None:
        progress.skipped += 1
        allowed = self.cfg.optim.skip_nonfinite
        if progress.skipped > allowed:
            raise self._diverged(progress, what)
        logger.warning("epoch %d step %d/%d: %s; step skipped (%d of optim.skip_nonfinite=%d "
                       "this epoch)", progress.epoch + 1, progress.step, self.steps_per_epoch,
                       what, progress.skipped, allowed)

    def _stop_mid_epoch(self, progress: EpochProgress) -> tp.NoReturn:
        """A stop signal: checkpoint here (exact resume at this step), then exit."""
        progress.rng = gather_rng(rng_state())
        self.partial = progress  # the epoch a resumed run finishes
        if self.is_master:
            atomic_torch_save(self.state.save(), self.folder / "checkpoint.th")
            logger.warning("Stopped at epoch %d step %d/%d: checkpoint.th saved; the same "
                           "command resumes exactly there", progress.epoch + 1, progress.step,
                           self.steps_per_epoch)
        if distrib.world_size() > 1:
            torch.distributed.barrier()  # nobody leaves before the checkpoint is written
        self.report.close()
        self.stop.exit()

    def _best_candidate(self, epoch: int, metrics: dict) -> tp.Optional[dict]:
        """The new best state after this epoch (kept in best_state), or None."""
        state = self.ema.shadow if self.ema else trainable_state(self.model)
        replace = self.best_state is None or not self.cfg.test.best
        best, self.best_nsdr = best_candidate(state, metrics.get("valid_nsdr"),
                                              self.best_nsdr, replace, epoch)
        self.best_state = self.best_state if best is None else best
        return best

    def _check_finite_weights(self, epoch: int) -> None:
        bad = nonfinite_names(dict(self.model.named_parameters()))
        bad += [f"ema.{n}" for n in nonfinite_names(self.ema.shadow if self.ema else {})]
        if bad:
            where = f"the end of epoch {epoch + 1}"
            raise divergence_error(self.cfg.optim, self.cfg.mixed_precision, where,
                                   f"the weights hold NaN/inf ({bad[:3]})", self.saved)

    def _stop_requested(self) -> None:
        """Between epochs: checkpoint.th is current, so a stop signal just exits."""
        if agree([self.stop.requested], self.device)[0]:
            logger.warning("Stopped after epoch %d: checkpoint.th is up to date; the same "
                           "command resumes from there", len(self.history))
            self.report.close()
            self.stop.exit()
