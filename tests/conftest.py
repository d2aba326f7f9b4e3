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
