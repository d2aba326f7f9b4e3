"""Check a stem folder: `python -m tools.verify_dataset [PATH] [--strict] [overrides]`."""
from demucs_lora.data.verify import main

if __name__ == "__main__":
    main()
