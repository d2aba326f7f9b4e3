"""The hub room's fixtures."""
import pytest
from model_layouts import isolate_caches


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF and torch hub caches under tmp_path (the machine's own are never seen)."""
    return isolate_caches(tmp_path, monkeypatch)
