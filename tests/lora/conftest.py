"""The lora room's fixtures."""
import pytest
from helpers import tiny_two_layer


@pytest.fixture(scope="module")
def model():
    """A two-layer stand-in for HTDemucs' layer kinds (helpers.tiny_two_layer)."""
    return tiny_two_layer()
