"""The training room's fixtures: every test here drives a tiny Solver (solver_helpers)."""
import pytest
import solver_helpers

# Tiny models run much faster on one thread than on oversubscribed cores.
_threads = pytest.fixture(autouse=True)(solver_helpers.one_thread)
