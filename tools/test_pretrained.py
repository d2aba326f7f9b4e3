"""Evaluate a model: `python -m tools.test_pretrained -n NAME_OR_SIG [options] [overrides]`.

Thin entry point; the logic (and `--help`) lives in demucs_lora.commands.score_model.
"""
from demucs_lora.commands.score_model import main

if __name__ == "__main__":
    main()
