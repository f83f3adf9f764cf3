"""Shared fixtures: the tiny models (built once per session from the offline SmolLM2 tokenizer), small prompt files
written in temporary folders, and helpers to run the kit's script as a user would.

Slow tests (PPO runs, subprocesses) are marked `slow`; `pytest -m "not slow"` runs the fast ones.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recipes.model_cache import resolve_model_path
from recipes.tiny_models import DEFAULT_TOKENIZER, build_tiny_models

REPO_ROOT = Path(__file__).resolve().parents[1]
PPO_SCRIPT = REPO_ROOT / "scripts" / "ppo.py"
TINY_RECIPE = REPO_ROOT / "configs" / "tiny" / "ppo.yaml"

# Twelve short prompts: with the default eval_fraction (0.1) the loader holds 2 out and keeps 10 for training,
# more than the 4 episodes each process draws per update in the tiny recipe.
PROMPTS = [
    "The movie was",
    "I think the food at that place",
    "Honestly, the service",
    "My day has been",
    "The weather today is",
    "This book made me",
    "The concert last night",
    "Our new neighbours are",
    "The train ride home was",
    "That restaurant's dessert",
    "The final episode of the show",
    "My coworker said the meeting",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs PPO or starts Python subprocesses (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{'policy': folder, 'reward': folder}: the 2-layer random Llama models with SmolLM2's tokenizer."""
    tokenizer_path = resolve_model_path(DEFAULT_TOKENIZER)
    if not Path(tokenizer_path).is_dir():
        pytest.fail(f"{DEFAULT_TOKENIZER} is not prepared offline: run `make model` (scripts/prepare_model.py) first")
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def two_label_reward_model(tiny_models, tmp_path_factory) -> Path:
    """A tiny sequence classifier with two labels: not a usable PPO reward model."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from recipes.tiny_models import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    folder = tmp_path_factory.mktemp("two_label_reward")
    config = tiny_llama_config(len(tokenizer), num_labels=2, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_prompt_files(folder: Path, prompts: list[str]) -> dict[str, Path]:
    """The same prompts as .jsonl, .csv and .parquet (column `prompt`) and as chat messages (.jsonl, column
    `messages`, one user turn each)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "jsonl": folder / "prompts.jsonl",
        "csv": folder / "prompts.csv",
        "parquet": folder / "prompts.parquet",
        "messages": folder / "messages.jsonl",
    }
    files["jsonl"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    pd.DataFrame({"prompt": prompts}).to_csv(files["csv"], index=False)
    pd.DataFrame({"prompt": prompts}).to_parquet(files["parquet"], index=False)
    files["messages"].write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts)
    )
    return files


@pytest.fixture
def prompt_files(tmp_path) -> dict[str, Path]:
    return write_prompt_files(tmp_path / "data", PROMPTS)


def tiny_recipe_flags(tiny_models: dict[str, Path], dataset: Path, output_dir: Path, *overrides: str) -> list[str]:
    """Command-line flags that run configs/tiny/ppo.yaml on the tiny models and a prompt file, plus `overrides`."""
    return [
        "--config", str(TINY_RECIPE),
        "--model_name_or_path", str(tiny_models["policy"]),
        "--reward_model_name_or_path", str(tiny_models["reward"]),
        "--dataset_name", str(dataset),
        "--output_dir", str(output_dir),
        *overrides,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None):
    """Runs the venv's Python with `args`; returns the CompletedProcess (text output captured)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl: one JSON object per non-empty line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_fields(recipe) -> dict:
    """Every init field of the three parsed dataclasses, as set (not only the ones differing from defaults)."""
    return {
        (type(part).__name__, f.name): getattr(part, f.name)
        for part in (recipe.data, recipe.model, recipe.training)
        for f in dataclasses.fields(part)
        if f.init
    }
