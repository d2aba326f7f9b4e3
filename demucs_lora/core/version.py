"""The package version, in the core so that adapter headers can record it without
importing the public facade (setup.py pins the same number)."""
__version__ = "0.1.0"
