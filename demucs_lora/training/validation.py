"""Validation of a run: nSDR of whole valid tracks, separated as the demucs CLI separates
(``apply_model`` with the run's ``test.shifts/split/overlap``), each rank scoring its
share of the tracks and the sums all-reduced, so every rank gets the same numbers; and
which state is the best so far (never a non-finite one: docs/safety.md)."""
from __future__ import annotations

import logging
import typing as tp

import torch
import tqdm
from demucs.apply import apply_model
from dora import distrib
from torch import nn

from demucs_lora.config.run_config import TestConfig
from demucs_lora.core.finite import is_finite_number, nonfinite_names
from demucs_lora.metrics import nsdr

logger = logging.getLogger(__name__)


@torch.no_grad()
def valid_nsdr(model: nn.Module, dataset, sources: tp.Sequence[str], test: TestConfig,
               device: torch.device, desc: str = "valid",
               progress: bool = True) -> tp.Dict[str, float]:
    """``{"nsdr_SOURCE": mean over tracks, ..., "nsdr": mean over sources}``."""
    model.eval()
    indices = list(range(distrib.rank(), len(dataset), distrib.world_size()))
    sums = torch.zeros(len(sources) + 1, dtype=torch.float64)  # the track count last
    for index in tqdm.tqdm(indices, desc=desc, leave=False, disable=not progress):
        track = dataset[index].to(device)
        mix, ref = track[0], track[1:]
        est = apply_model(model, mix[None], shifts=test.shifts, split=test.split,
                          overlap=test.overlap, progress=False, num_workers=0)[0]
        sums[:-1] += nsdr(est.cpu()[None], ref.cpu()[None])[0].double()
        sums[-1] += 1
    if distrib.world_size() > 1:
        torch.distributed.all_reduce(sums)
    per_source = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
    metrics = {f"nsdr_{name}": value for name, value in zip(sources, per_source)}
    metrics["nsdr"] = sum(per_source) / len(per_source)
    return metrics


def best_candidate(state: tp.Mapping[str, torch.Tensor], score: tp.Optional[float],
                   best_nsdr: float, replace: bool, epoch: int
                   ) -> tp.Tuple[tp.Optional[tp.Dict[str, torch.Tensor]], float]:
    """(a CPU copy of `state` to keep as the best, or None; the best score after this
    epoch). Never a non-finite score or state; `replace`: keep it whatever its score
    (no best yet, or ``test.best=false``); no score (no validation) counts as -inf."""
    if score is not None and not is_finite_number(score):
        logger.warning("epoch %d: validation nSDR is %s: not a candidate for best.th",
                       epoch + 1, score)
        return None, best_nsdr
    if nonfinite_names(state):
        return None, best_nsdr
    score = -float("inf") if score is None else score
    if score > best_nsdr or replace:
        return {k: v.detach().cpu().clone() for k, v in state.items()}, max(score, best_nsdr)
    return None, best_nsdr
