"""What keeps a run safe, mixed into the Solver: divergence, preemption, best selection,
and which base an XP was started on.

The NaN policy (docs/safety.md): a non-finite loss or gradient is skipped up to
``optim.skip_nonfinite`` times per epoch, then the run stops with `TrainingDiverged`
naming the step, without overwriting checkpoint.th; non-finite weights stop it too; a
non-finite validation score or state is never the best. A stop signal ends the run at a
step boundary with a checkpoint that resumes exactly there.
"""
from __future__ import annotations

import json
import logging
import typing as tp

import torch
from dora import distrib

from demucs_lora.training import checkpoint as ckpt
from demucs_lora.training.epoch import EpochProgress, agree, gather_rng
from demucs_lora.core.errors import TrainingDiverged
from demucs_lora.core.files import atomic_torch_save
from demucs_lora.core.finite import divergence_error, is_finite_number, nonfinite_names
from demucs_lora.models.trainable import trainable_state

logger = logging.getLogger("demucs_lora.training.solver")


class SolverGuards:
    """Methods of `demucs_lora.training.solver.Solver` (they use its attributes: cfg, model, ema,
    history, partial, saved, best_*, stop, folder, base, steps_per_epoch, device)."""

    # ---------------------------------------------------------------- checkpoint.th

    def _describe_saved(self) -> str:
        where = (f"epoch {self.partial.epoch + 1} step {self.partial.step}" if self.partial
                 else f"end of epoch {len(self.history)}")
        return f"checkpoint.th still holds the last finite state ({where})"

    # ---------------------------------------------------------------- divergence
    def _diverged(self, progress: EpochProgress, what: str) -> TrainingDiverged:
        where = f"epoch {progress.epoch + 1}, step {progress.step}/{self.steps_per_epoch}"
        return divergence_error(self.cfg.optim, self.cfg.mixed_precision, where, what,
                                self.saved)

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
        progress.rng = gather_rng(ckpt.rng_state())
        if self.is_master:
            atomic_torch_save(self._state(partial=progress.to_state()),
                              self.folder / "checkpoint.th")
            logger.warning("Stopped at epoch %d step %d/%d: checkpoint.th saved; the same "
                           "command resumes exactly there", progress.epoch + 1, progress.step,
                           self.steps_per_epoch)
        if distrib.world_size() > 1:
            torch.distributed.barrier()  # nobody leaves before the checkpoint is written
        self._close()
        self.stop.exit()

    def _forget_other_base(self) -> None:
        """No checkpoint yet, but an earlier start of this XP (lora_init) was on another
        base: nothing was trained, so start over, dropping its initial validation."""
        header = self.folder / "lora_init.json"
        try:
            saved = json.loads(header.read_text()).get("base_fingerprint")
            other = not ckpt.fingerprints_match(saved, self.base["fingerprint"])
        except Exception:  # no, unreadable or foreign header: it is rewritten below
            return
        if other:
            logger.warning("%s was made on another base than this run's (%s): no epoch was "
                           "finished, starting over on this base", header,
                           self.base["continue_from"])
            (self.folder / "validation" / "epoch_000.json").unlink(missing_ok=True)

    def _best_candidate(self, epoch: int, metrics: dict) -> tp.Optional[dict]:
        """The state to keep as best after this epoch, or None: never a non-finite one."""
        state = self.ema.shadow if self.ema else trainable_state(self.model)
        score = metrics.get("valid_nsdr")
        if score is not None and not is_finite_number(score):
            logger.warning("epoch %d: validation nSDR is %s: not a candidate for best.th",
                           epoch + 1, score)
            return None
        if nonfinite_names(state):
            return None
        score = -float("inf") if score is None else score
        if score > self.best_nsdr or self.best_state is None or not self.cfg.test.best:
            self.best_nsdr = max(score, self.best_nsdr)
            return {k: v.detach().cpu().clone() for k, v in state.items()}
        return None

    def _check_finite_weights(self, epoch: int) -> None:
        bad = nonfinite_names(dict(self.model.named_parameters()))
        if self.ema:
            bad += [f"ema.{n}" for n in nonfinite_names(self.ema.shadow)]
        if bad:
            where = f"the end of epoch {epoch + 1}"
            raise divergence_error(self.cfg.optim, self.cfg.mixed_precision, where,
                                   f"the weights hold NaN/inf ({bad[:3]})",
                                   self.saved)

    def _over_budget(self) -> bool:
        """Equal wall-clock comparisons: stop once the train time spent exceeds the budget."""
        budget = self.cfg.train_budget_seconds
        return budget is not None and sum(h.get("train_seconds", 0.0)
                                          for h in self.history) >= budget

    def _stop_requested(self) -> None:
        """Between epochs: checkpoint.th is current, so a stop signal just exits."""
        if agree([self.stop.requested], self.device)[0]:
            logger.warning("Stopped after epoch %d: checkpoint.th is up to date; the same "
                           "command resumes from there", len(self.history))
            self._close()
            self.stop.exit()
