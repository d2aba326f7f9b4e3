"""Export XPs as demucs model files: `python -m tools.export SIG [SIG ...] [options]`.

Thin entry point; the logic (and `--help`) lives in demucs_lora.export.
"""
from demucs_lora.export import main

if __name__ == "__main__":
    main()
