"""Shared fixtures and markers (the shared functions are in tests/helpers.py)."""

import pytest
import torch
from slurm_fixture import slurm_cluster  # noqa: F401  (a fixture for every test module)


@pytest.fixture(scope="module")
def mix():
    """One second of seeded stereo noise at 44.1 kHz, batch 1."""
    return torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def xp(tmp_path_factory):
    """A hand-built XP folder (helpers.make_xp: tiny base, LoRA with random B), per module."""
    from helpers import make_xp
    return make_xp(tmp_path_factory.mktemp("xp"))


# Files that start subprocesses (dora runs, a local Slurm) or run benchmarks; single slow
# tests elsewhere carry @pytest.mark.slow with their reason. `pytest -m "not slow"` is the
# quick developer loop (docs/development.md); CI runs everything.
# A test using the slurm_cluster fixture is marked slurm (and slow): `-m "not slurm"`.
SLOW = ("tests/integration/", "tests/bench/")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocess / end-to-end test (CI runs it)")
    config.addinivalue_line("markers", "slurm: needs a local Slurm (tools/slurm_local.sh)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        if any(part in path for part in SLOW) or {"slow", "slurm"} & set(item.keywords):
            item.add_marker(pytest.mark.slow)
