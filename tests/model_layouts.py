"""Write a model in every layout users hold demucs models in (nothing is downloaded).

- ``write_repo_th``: ``NAME.th`` in a local repo folder (``demucs --repo``, ``pretrained_repo``);
- ``write_torch_hub``: ``SIG-CHECKSUM.th`` in ``TORCH_HOME/hub/checkpoints`` (legacy demucs);
- ``write_hf_cache``: ``NAME.yaml`` + ``SIG.safetensors`` in an HF hub cache under
  ``HF_HOME/hub`` (``models--NS--REPO/refs/main`` + ``snapshots/REV/``), as demucs 4.1 gets them.
"""
from __future__ import annotations

import hashlib
import typing as tp
from pathlib import Path

import torch
import yaml
from demucs.states import serialize_model
from omegaconf import OmegaConf

from demucs_lora.core.files import atomic_write
from demucs_lora.model_files.packages import safetensors_writer

REV = "0123456789abcdef0123456789abcdef01234567"


def write_repo_th(model, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.th"
    torch.save(serialize_model(model, OmegaConf.create({}), half=False), path)
    return path


def write_torch_hub(model, torch_home: Path, sig: str) -> Path:
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.th"
    torch.save(serialize_model(model, OmegaConf.create({}), half=False), tmp)
    checksum = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    return tmp.rename(folder / f"{sig}-{checksum}.th")


def write_hf_cache(models: tp.Sequence, hf_home: Path, name: str, sigs: tp.Sequence[str],
                   repo: str = "adefossez/HTDemucs", weights=None, segment=None) -> Path:
    """The snapshot folder holding ``name.yaml`` and one ``SIG.safetensors`` per model."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    bag = {"models": list(sigs)}
    if weights is not None:
        bag["weights"] = weights
    if segment is not None:
        bag["segment"] = segment
    (snap / f"{name}.yaml").write_text(yaml.safe_dump(bag))
    for model, sig in zip(models, sigs):
        atomic_write(snap / f"{sig}.safetensors", safetensors_writer(model))
    return snap


def isolate_caches(root: Path, monkeypatch) -> Path:
    """HF and torch hub caches under ``root`` (the machine's own are never seen), cwd root."""
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.chdir(root)
    return root


def run_offline(code: str, hf_home: Path):
    """``python -c code`` with demucs' HF hub loader offline on ``hf_home``'s cache."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
