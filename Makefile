# Two commands on a fresh machine: `make demo` (end-to-end job) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo base base-medium bench bench-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py Makefile
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps torch-log-wmse  # its filter only (neg_log_wmse)
	# the real clients of tools.export --format uvr (audio-separator, which depends on
	# torch: pinned by a constraints file) and of demucs' --flac / audio-separator (ffmpeg)
	printf 'torch==2.13.0\n' > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt 'audio-separator[cpu]==0.47.1'
	# its torchvision (a CUDA-era wheel) does not import beside the CPU torch and breaks
	# transformers, hence peft (the tests' numerical reference); audio-separator's demucs
	# path runs without it (tests/commands/test_export_formats.py)
	$(BIN)/pip uninstall -y -q torchvision
	command -v ffmpeg >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m demucs_lora.commands.demo

base: $(STAMP)
	$(BIN)/python -m demucs_lora.commands.demo --make-base

# The quality protocol's mid-size base (docs/quality.md): resumable, run it again to go on
base-medium: $(STAMP)
	$(BIN)/python -m demucs_lora.commands.base_recipe

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# On a CUDA machine: train step + inference, batch 4 x 7.8 s, released htdemucs, fp32/bf16/fp16
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --device cuda

clean:
	rm -rf $(VENV) outputs/xps outputs/grids metadata release_models
