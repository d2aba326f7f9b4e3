"""Export XPs as demucs model files: `python -m tools.export SIG [SIG ...] [options]`.

Thin entry point; the logic (and `--help`) lives in demucs_lora.commands.export.
"""
from demucs_lora.commands.export import main

if __name__ == "__main__":
    main()
