"""Stand-ins for what the guide's users have: demucs model files and a stem folder.

`make_repo(root)` writes a demucs repo folder (as `demucs --repo` reads it) with tiny
HTDemucs models under the released names: `htdemucs.yaml` -> `955717e8-CHECKSUM.th`
(4 sources) and `htdemucs_6s.yaml` -> `5c90dfd2-CHECKSUM.th` (6 sources; their own sha256), serialized with
demucs.states.serialize_model. `make_data(root, stems)` writes a tiny synthetic dataset.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from helpers import FOUR, SIX, synth_stems, tiny_htdemucs

MODELS = {"htdemucs": ("955717e8", "8726e21a", FOUR),
          "htdemucs_6s": ("5c90dfd2", "34c22ccb", SIX)}


def make_repo(root: Path) -> Path:
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    repo = Path(root) / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for i, (name, (sig, checksum, sources)) in enumerate(MODELS.items()):
        model = tiny_htdemucs(sources, seed=i, t_heads=4)
        package = serialize_model(model, OmegaConf.create({}), half=False)
        tmp = repo / f"{sig}.tmp"
        torch.save(package, tmp)  # named SIG-CHECKSUM.th with its real checksum, as demucs
        real = hashlib.sha256(tmp.read_bytes()).hexdigest()[:len(checksum)]  # checks it
        tmp.rename(repo / f"{sig}-{real}.th")
        (repo / f"{name}.yaml").write_text(f"models: ['{sig}']\n")
    return repo


def make_data(root: Path, stems: int = 5, tracks: int = 2, seconds: float = 3.0) -> Path:
    return synth_stems(Path(root) / f"data{stems}", seconds=seconds, stems=stems,
                       splits={"train": tracks, "valid": 1, "test": 1})
