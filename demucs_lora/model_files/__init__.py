"""Finding and reading the demucs models users already have.

`packages` reads and writes one model file in either layout demucs uses (`.th` pickles
opened with an allowlist, demucs 4.1 `.safetensors` with JSON metadata); `caches` knows
where demucs puts downloaded models (the Hugging Face hub cache, torch hub's checkpoints);
`resolve` turns the name a user types into files, with one precedence for training and
serving alike; `bags` builds demucs bags of models from those files.
"""
