"""Every random number generator's state (torch, CUDA, numpy, Python) as tensors and plain
values, so that it is saved in checkpoint.th and read back with ``weights_only=True``: a
resumed run draws the same numbers as one that never stopped."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every RNG as tensors and plain values (what weights_only=True can read back)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(py_state,
                                                                      dtype=torch.int64),
                       "gauss": py_gauss},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`; ValueError/TypeError/KeyError on a malformed state."""
    np_state, py = state["numpy"], state["python"]
    keys = np_state["keys"]
    if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (624,):
        raise ValueError("numpy RNG state: expected 624 keys")
    if not isinstance(py["state"], torch.Tensor) or py["state"].numel() != 625:
        raise ValueError("python RNG state: expected 625 words")
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["gauss"])))
    gauss = py["gauss"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()),
                     None if gauss is None else float(gauss)))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
