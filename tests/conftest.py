"""Shared fixtures: tiny models that run on CPU in well under a second."""
import pytest
import torch


@pytest.fixture
def tiny_htdemucs():
    """A seeded tiny HTDemucs (depth 4, like conf/model/htdemucs_tiny.yaml)."""
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    return HTDemucs(sources=["drums", "bass", "other", "vocals"], channels=8,
                    t_layers=2, depth=4, samplerate=44100, segment=1)


# Tests that start subprocesses (dora runs, the stock demucs CLI, a local Slurm) or run
# benchmarks: `pytest -m "not slow"` is the quick developer loop; CI runs everything.
SLOW = ("tests/integration/", "tests/test_slurm_local.py", "tests/test_benchmark")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocess / end-to-end test (CI runs it)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if any(part in path for part in SLOW) or "slow" in item.keywords:
            item.add_marker(pytest.mark.slow)
