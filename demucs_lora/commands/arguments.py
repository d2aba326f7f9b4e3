"""Argument types the commands share: a bad number is refused by the parser (exit status
2, one line naming the option) instead of failing deep inside demucs or evaluating nothing.
"""
from __future__ import annotations

import argparse


def non_negative_int(text: str) -> int:
    """An integer >= 0 (``--shifts``: 0 = no random shift)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: an integer >= 0")
    return int(text)


def positive_int(text: str) -> int:
    """An integer >= 1 (a number of tracks)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer >= 1")
    return int(text)


def fraction(text: str) -> float:
    """A number in [0, 1) (``--overlap`` between chunks)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number in [0, 1)")
    return value
