"""Shipped files: a tiny HTDemucs pre-trained on synthetic domain A (see base_tiny_A.json)."""
