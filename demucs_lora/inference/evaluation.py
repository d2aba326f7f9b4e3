"""Score a model on a dataset split: the numbers ``tools.test_pretrained`` prints and
writes, and the float-vs-int8 check of ``tools.export --quantize 8``.

Why the mixture is normalized here and not by the dataset: ``StemDataset`` can normalize
by the whole-track statistics of its metadata (what training uses); for testing we read raw
audio (``normalize=False``) and normalize each mixture exactly like the demucs CLI and
``demucs.evaluate`` (``separation.separate_tensor``), so metrics are on the original scale
and comparable with demucs'. ``shifts`` draws random offsets: Python's ``random`` is
seeded with ``seed`` so reruns agree. Values are rounded to ``DECIMALS`` in the results and
the table is formatted from that dict, so the printed and the JSON numbers always agree.
"""
from __future__ import annotations

import math
import random
import typing as tp

from demucs_lora.core.errors import DatasetError

if tp.TYPE_CHECKING:  # pragma: no cover
    from demucs_lora.data.settings import DataConfig
    from torch import nn

DECIMALS = 4


# ----------------------------------------------------------------------------- data
def build_dataset(data: "DataConfig", split: str, samplerate: int, channels: int,
                  progress: bool = True):
    """Whole-track, un-normalized StemDataset of ``split`` for ``data.sources`` (the
    model's stems: `DataConfig.with_sources`), read at the model's rate and channels."""
    from demucs_lora.data.stems import StemDataset, config_metadata, dataset_root
    sources = list(data.sources)
    meta = config_metadata(data, progress=progress)
    dataset = StemDataset(None, split, sources, meta, segment=None,
                          samplerate=samplerate, channels=channels, normalize=False,
                          residual_source=data.residual_source)
    if len(dataset) == 0:
        root = dataset_root(data, progress=False)
        raise DatasetError(f"{root}: no tracks in {split}/ (expected {root / split}/TRACK/"
                           f"{{mixture,{','.join(sources)}}}.wav); use --split valid or "
                           "another dset.wav")
    return dataset


def evaluate_model(model: "nn.Module", dataset, shifts: int = 0, overlap: float = 0.25,
                   split: bool = True, metrics: tp.Sequence[str] = (),
                   max_tracks: tp.Optional[int] = None, device: str = "cpu",
                   progress: bool = True, seed: int = 0, label: str = "the model") -> dict:
    """``{"tracks": {name: {source: {metric: v}}}, "summary": {metric_source, metric}}``,
    values rounded to DECIMALS; every track separated with ``separate_tensor``. A NaN/inf
    stem is a ModelLoadError naming `label` (the model and adapter) and the track."""
    import torch
    import tqdm
    from demucs_lora.metrics import METRICS, summarize, track_metrics
    from demucs_lora.core.finite import check_finite_output
    from demucs_lora.inference.separation import check_audio, separate_tensor
    metrics = tuple(metrics or METRICS)
    names = list(dataset.metadata)
    count = len(names) if max_tracks is None else min(max_tracks, len(names))
    random.seed(seed)
    torch.manual_seed(seed)
    model = model.to(device).eval()
    tracks = {}
    for index in tqdm.tqdm(range(count), desc="test", unit="track", disable=not progress):
        item = dataset[index]
        mix, ref = check_audio(item[0], f"{dataset.metadata[names[index]].get('folder', names[index])} (mixture)"), item[1:]
        est = separate_tensor(model, mix.to(device), shifts=shifts, overlap=overlap,
                              split=split, device=device).cpu()
        check_finite_output(est, list(model.sources), f"{label} on {names[index]}")
        tracks[names[index]] = track_metrics(est, ref, list(model.sources), metrics,
                                             samplerate=model.samplerate, mix=mix)
    summary = summarize(list(tracks.values()))
    return {"tracks": _round(tracks), "summary": _round(summary)}


def _round(value: tp.Any) -> tp.Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, DECIMALS)
    return value


# ----------------------------------------------------------------------------- table
def format_table(results: dict) -> str:
    """Rows: the sources then ``mean``; columns: the metrics (keys as in the JSON).
    Built from ``results["summary"]`` only, so it shows exactly the JSON numbers."""
    summary = results["summary"]
    sources, metrics = results["sources"], results["metrics"]
    width = max(8, *(len(s) for s in sources))
    cols = [max(10, len(m) + 1) for m in metrics]

    def cell(value: tp.Optional[float], w: int) -> str:
        return f"{'-' if value is None else f'{value:.{DECIMALS}f}':>{w}}"

    lines = [f"{'source':<{width}}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, cols))]
    for source in sources:
        lines.append(f"{source:<{width}}" + "".join(
            cell(summary.get(f"{m}_{source}"), w) for m, w in zip(metrics, cols)))
    lines.append(f"{'mean':<{width}}" + "".join(cell(summary.get(m), w)
                                               for m, w in zip(metrics, cols)))
    return "\n".join(lines)
