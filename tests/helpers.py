"""The tests' one toolkit: tiny HTDemucs models, adapters that change the output, synthetic
stem folders and mixtures, hand-made XP folders.

Each helper has one home here (a test module never imports from another test module);
`solver_helpers` builds a Solver from these, `model_layouts` writes models the way demucs
caches them, `integration.dora_helpers` runs the real CLIs. Imports of the package are
inside the functions, so collecting a test never imports what it does not use.
"""
from __future__ import annotations

import copy
import json
import typing as tp
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
FOUR = ["drums", "bass", "other", "vocals"]
SIX = [*FOUR, "guitar", "piano"]
TARGETS = ["encoder", "decoder", "transformer"]
# Runs on CPU in well under a second. Keep depth 4 (conf/model/htdemucs_tiny.yaml): at
# depth 2 the cross-transformer attends over so many positions that it allocates ~100 GB.
TINY = dict(channels=8, depth=4, t_layers=1, samplerate=44100, segment=1)


def tiny_htdemucs(sources: tp.Sequence[str] = FOUR, seed: int = 0, **kwargs):
    """A seeded tiny HTDemucs (train mode, as HTDemucs builds it); kwargs override TINY."""
    from demucs.htdemucs import HTDemucs
    torch.manual_seed(seed)
    return HTDemucs(sources=list(sources), **dict(TINY, **kwargs))


def tiny_two_layer(sources: tp.Sequence[str] = FOUR, seed: int = 0, **kwargs):
    """`tiny_htdemucs` with two transformer layers: self- and cross-attention both exist,
    so every LoRA target kind (and the transformer globs) has a layer to match."""
    return tiny_htdemucs(sources, seed, **dict(kwargs, t_layers=2))


def forward(model, x):
    """The model's output without autograd."""
    with torch.no_grad():
        return model(x)


def inject_all(model, rank: int = 2, targets: tp.Sequence[str] = TARGETS, **kwargs):
    """LoRA of `rank` on every layer of the target groups, in place (B = 0: identity)."""
    from demucs_lora.lora.config import LoraLayout
    from demucs_lora.lora.adapt import inject_lora
    from demucs_lora.lora.targets import lora_target_names
    inject_lora(model, LoraLayout({n: rank for n in lora_target_names(model, targets)}, **kwargs))
    return model


def randomize_b(module, seed: int = 3, std: float = 0.05):
    """Random lora_B factors (a fresh adapter is the identity): a trained-looking adapter,
    on a whole model or a single LoRA layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def adapted_copy(base, seed: int, rank: int = 2, alpha: float = 16.0):
    """A copy of `base` with LoRA on every target and random B, in eval mode."""
    model = inject_all(copy.deepcopy(base), rank, alpha=alpha)
    return randomize_b(model, seed).eval()


def synth_stems(folder: Path, seconds: float = 0.6, **kwargs) -> Path:
    """A synthetic stem folder (train/valid/test, one track each unless `splits` says),
    generated once: a second call on the same folder reuses it."""
    from demucs_lora.data.synth import generate_dataset
    folder = Path(folder)
    if not (folder / "synth.json").exists():
        kwargs.setdefault("splits", {"train": 1, "valid": 1, "test": 1})
        generate_dataset(folder, seconds=seconds, **kwargs)
    return folder


def write_mix(path, seconds=0.6, seed=0, samplerate=44100, channels=2):
    """A float wav of small band-limited noise (stays well inside [-1, 1])."""
    import soundfile as sf
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(channels, int(seconds * samplerate), generator=gen)
    wav = torch.nn.functional.avg_pool1d(wav[None], 5, 1, 2)[0] * 0.1
    sf.write(str(path), wav.T.numpy(), samplerate, subtype="FLOAT")
    return wav


def our_stems(model, path):
    """The stems our inference path separates from the wav at `path`."""
    from demucs_lora.inference.separation import read_audio, separate_tensor
    wav = read_audio(path, model.samplerate, model.audio_channels)
    return separate_tensor(model, wav, shifts=0)


def xp_config(root: Path, base_path: Path, data: Path):
    """The composed config of a tiny LoRA XP on the stem folder `data`."""
    from demucs_lora.config.compose import compose
    return compose(["model=htdemucs_tiny", "variant=debug", "htdemucs.t_layers=1",
                    "htdemucs.lora_rank=2", f"dset.wav={data}",
                    f"dset.metadata={root / 'metadata'}", f"continue_from={base_path}"])


def make_xp(root, seed: int = 1, sig: tp.Optional[str] = None) -> SimpleNamespace:
    """outputs/xps/SIG/{config.yaml, best.th, lora_best.*, lora_last.*, history.json,
    ranks.json} under `root`, laid out as the solver does (nothing trained: LoRA with random
    B on a tiny base), with its base at root/base.th and data at root/data."""
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    from demucs_lora.lora.inject import lora_config
    from demucs_lora.lora.state import save_adapter
    from demucs_lora.training.checkpoint import save_best_model
    root = Path(root)
    sig = sig or uuid.uuid4().hex[:8]
    base_path = root / "base.th"
    base = tiny_htdemucs().eval()
    data = synth_stems(root / "data")
    cfg = xp_config(root, base_path, data)
    if not base_path.exists():
        torch.save(serialize_model(base, cfg, half=False), base_path)
    folder = root / "outputs" / "xps" / sig
    folder.mkdir(parents=True)
    model = adapted_copy(base, seed)
    save_best_model(model, None, cfg, folder / "best.th")
    save_adapter(model, folder / "lora_best", xp=sig, source_init=None)
    save_adapter(adapted_copy(base, seed + 100), folder / "lora_last", xp=sig, source_init=None)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / "history.json").write_text(json.dumps([{"epoch": 1, "valid_nsdr": 0.0}]))
    (folder / "ranks.json").write_text(json.dumps({"ranks": lora_config(model)["ranks"]}))
    return SimpleNamespace(sig=sig, folder=folder, base_path=base_path, data=data, cfg=cfg,
                           root=root)


def finite(x) -> bool:
    """A real number (not a bool, NaN or inf): what a benchmark ratio must be."""
    import math
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def assert_targets_printed(result: dict, stdout: str):
    """A benchmark printed one verdict line per target of its JSON, the verdict it recorded."""
    assert result["targets"], "no targets recorded"
    for row in result["targets"]:
        assert f"[{'PASS' if row['pass'] else 'MISS'}] {row['name']}:" in stdout, row["name"]


def parse_table(text):
    """{row: {column: float or None}} from the printed table (header line 'source ...')."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["source"])
    header = lines[start].split()[1:]
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(header) + 1:
            break
        rows[cells[0]] = {h: (None if c == "-" else float(c)) for h, c in zip(header, cells[1:])}
    return rows


def check_table_matches_json(printed, results):
    """The table tools.test_pretrained printed holds the numbers of its JSON results."""
    table = parse_table(printed)
    assert list(table) == [*results["sources"], "mean"]
    summary = results["summary"]
    for metric in results["metrics"]:
        for source in results["sources"]:
            assert table[source][metric] == summary[f"{metric}_{source}"], (metric, source)
        assert table["mean"][metric] == summary[metric], metric
    return table
