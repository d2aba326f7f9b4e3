"""demucs-lora: LoRA adaptation of HTDemucs with Hydra + Dora."""
from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="demucs-lora",
    version="0.1.0",
    description="LoRA fine-tuning of HTDemucs (Hybrid Transformer Demucs)",
    # conf/ is read next to the package (demucs_lora/core/paths.py CONF_DIR, train.py's
    # config_path="../conf"), so a wheel installs it there too; the assets are the demo's
    # base model and its metadata.
    packages=(find_packages(include=["demucs_lora", "demucs_lora.*"])
              + find_namespace_packages(include=["conf", "conf.*"])),
    package_data={"conf": ["*.yaml", "*/*.yaml"], "demucs_lora.assets": ["*.th", "*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # 2.6: torch.serialization.get_unsafe_globals_in_checkpoint / safe_globals (model_files/
        # safe_load.py). Tested with 2.13.0, the exact pin the Makefile installs for CI.
        "torch>=2.6,<3",
        "demucs>=4.0",
        "dora-search>=0.1.12",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "einops",
        "julius",
        "soundfile",
        "safetensors",
        "tensorboard",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # museval, auraloss (+ librosa for its mel scale) give the reference values of the
        # sdr / aura_* metrics in tests; torch-log-wmse is installed with --no-deps by the
        # Makefile (its torchaudio has no build for torch 2.13; only its filter file is read)
        "test": ["pytest>=7", "pytest-timeout", "peft>=0.13", "matplotlib", "scipy",
                 "museval", "auraloss", "librosa", "onnx", "onnxruntime"],
        # tools.export --format onnx (onnx) and separate -n FILE.onnx (onnxruntime); the
        # Makefile adds audio-separator[cpu] (with the torch constraint) and ffmpeg for tests
        "onnx": ["onnx", "onnxruntime"],
        # tools.test_pretrained --metrics aura_mrstft (scipy); neg_log_wmse also needs
        # `pip install --no-deps torch-log-wmse`
        "metrics": ["scipy"],
        "audio": ["torchaudio"],
        "xformers": ["xformers"],
    },
    entry_points={
        "console_scripts": [
            "demucs-lora=demucs_lora.commands.separate:main",
            "demucs-lora-export=demucs_lora.commands.export:main",
            "demucs-lora-verify=demucs_lora.commands.verify_dataset:main",
            "demucs-lora-prepare=demucs_lora.commands.prepare_dataset:main",
            "demucs-lora-test=demucs_lora.commands.score_model:main",
        ],
    },
)
