"""Check a stem folder: `python -m tools.verify_dataset [PATH] [--strict] [overrides]`.

Thin entry point; the logic (and `--help`) lives in demucs_lora.commands.verify_dataset.
"""
from demucs_lora.commands.verify_dataset import main

if __name__ == "__main__":
    main()
