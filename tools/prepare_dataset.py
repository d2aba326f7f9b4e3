"""Exports to the training layout: `python -m tools.prepare_dataset SRC OUT [--force]`.

Thin entry point; the logic (and `--help`) lives in demucs_lora.commands.prepare_dataset.
"""
from demucs_lora.commands.prepare_dataset import main

if __name__ == "__main__":
    main()
