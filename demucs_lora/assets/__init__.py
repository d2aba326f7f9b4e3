"""Shipped files: a tiny HTDemucs pre-trained on synthetic domain A (see base_tiny_A.json)."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
BASE_TINY_A = ASSETS / "base_tiny_A.th"
