"""Where a train epoch stands, so that it can stop at any step and resume exactly there.

An epoch is replayed from its seed (`Solver.train_epoch` seeds torch per epoch and rank):
the data order is the same, so resuming at step k means drawing k batches' indices
without training on them (`skip_batches`), then putting the RNG back as it was at the
stop (`EpochProgress.rng`). Everything is plain values and tensors: it is saved in
checkpoint.th as ``partial`` and read back with weights_only=True.
"""
from __future__ import annotations

import dataclasses
import logging
import typing as tp

import torch
from dora import distrib

from demucs_lora.core.errors import DatasetError
from demucs_lora.core.rng import set_rng_state

logger = logging.getLogger(__name__)
FIELDS = {"epoch": int, "step": int, "total": float, "count": int, "grad_norm": float,
          "seconds": float, "skipped": int, "fp16_skips": int}


@dataclasses.dataclass
class EpochProgress:
    epoch: int
    step: int = 0             # optimizer steps taken (trained or skipped as non-finite),
                              # each `optim.accumulate` batches
    total: float = 0.0        # sum of the finite losses
    count: int = 0            # finite steps
    grad_norm: float = 0.0
    seconds: float = 0.0      # train time spent before the stop
    skipped: int = 0          # non-finite steps skipped (optim.skip_nonfinite)
    fp16_skips: int = 0       # consecutive steps the fp16 scaler skipped
    rng: tp.Optional[list] = None   # per rank: core.rng.rng_state() at the stop

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: tp.Mapping) -> "EpochProgress":
        return cls(**{k: FIELDS[k](state[k]) for k in FIELDS}, rng=state.get("rng"))

    def replay(self, batches: tp.Iterator, accumulate: int) -> None:
        """A stopped epoch, started again: draw the batches of the steps already taken
        (same order), then put back the RNG this rank had at the stop."""
        if not self.step:
            return
        skip_batches(batches, self.step * accumulate)
        rngs = self.rng or []
        set_rng_state(rngs[distrib.rank()] if len(rngs) == distrib.world_size() else rngs[0])

    def metrics(self, lr: float, seconds: float) -> dict:
        """The epoch's train metrics; the loss is the mean over every rank's finite steps."""
        loss = torch.tensor([self.total, self.count], dtype=torch.float64)
        if distrib.world_size() > 1:
            torch.distributed.all_reduce(loss)
        out = {"loss": float(loss[0] / max(loss[1], 1)), "grad_norm": self.grad_norm,
               "lr": lr, "seconds": seconds, "batches": self.count}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def start_epoch(partial: tp.Optional[EpochProgress], epoch: int, steps: int) -> EpochProgress:
    """Where `epoch` starts: at the stop of `partial` (a stopped epoch resumed) when it is
    this epoch, else at step 0."""
    if partial is not None and partial.epoch == epoch:
        logger.info("Resuming epoch %d at step %d/%d", epoch + 1, partial.step, steps)
        return partial
    return EpochProgress(epoch)


def partial_problem(state: tp.Any, epoch: int) -> tp.Optional[str]:
    """What is wrong with a saved ``partial`` entry (None: fine)."""
    if state is None:
        return None
    if not isinstance(state, dict) or any(k not in state for k in FIELDS):
        return "partial epoch entry without its fields"
    if any(not isinstance(state[k], (int, float)) or isinstance(state[k], bool)
           for k in FIELDS):
        return "partial epoch entry with non-numeric fields"
    if state["epoch"] != epoch or state["step"] < 0:
        return f"partial epoch {state['epoch']} after {epoch} finished epochs"
    rng = state.get("rng")
    if not isinstance(rng, list) or not all(isinstance(r, dict) for r in rng):
        return "partial epoch entry without RNG states"
    return None


def optimizer_steps(batches: int, max_batches: tp.Optional[int], accumulate: int) -> int:
    """Optimizer steps per epoch: `accumulate` loader batches each (`max_batches` caps the
    batches), so `step` in EpochProgress, the scheduler, EMA and rank adaptation all count
    optimizer steps; DatasetError when not even one step fits."""
    batches = batches if max_batches is None else min(batches, max_batches)
    if batches < accumulate:
        raise DatasetError(f"optim.accumulate={accumulate} needs {accumulate} train batches "
                           f"per step, an epoch has {batches}. Fix: lower optim.accumulate "
                           "or batch_size, or add tracks")
    return batches // accumulate


def budget_spent(history: tp.Sequence[tp.Mapping], budget: tp.Optional[float]) -> bool:
    """Equal wall-clock comparisons (``train_budget_seconds``): the train time of the
    finished epochs reached the budget."""
    return budget is not None and sum(h.get("train_seconds", 0.0) for h in history) >= budget


def skip_batches(batches: tp.Iterator, count: int) -> None:
    """Advance a DataLoader iterator by `count` batches; in-process loaders only draw the
    indices (nothing is read), worker loaders have to fetch them."""
    next_index = getattr(batches, "_next_index", None)
    in_process = type(batches).__name__ == "_SingleProcessDataLoaderIter"
    for _ in range(count):
        if in_process and next_index is not None:
            next_index()
        else:
            next(batches)


def agree(flags: tp.Sequence[bool], device: torch.device) -> tp.List[bool]:
    """Each flag true on any rank is true on every rank (one tiny all_reduce under DDP)."""
    if distrib.world_size() <= 1:
        return [bool(f) for f in flags]
    tensor = torch.tensor([float(bool(f)) for f in flags], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def ddp_wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel when there are several processes (it
    all-reduces the parameters that require grad only), else `model` itself."""
    if distrib.world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gather_rng(state: dict) -> list:
    """Every rank's RNG state (rank order), so a resumed rank continues its own stream."""
    if distrib.world_size() <= 1:
        return [state]
    out: tp.List[tp.Any] = [None] * distrib.world_size()
    torch.distributed.all_gather_object(out, state)
    return out
