"""The tiny recipe as a user launches it on several processes: `accelerate launch --multi_gpu --num_processes 2`,
which on this CPU-only machine must become two data-parallel processes in one gloo group."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PPO_SCRIPT, TINY_RECIPE, free_port, read_metrics

ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.mark.slow
def test_tiny_recipe_on_two_processes(tiny_models, prompt_files, tmp_path):
    output_dir = tmp_path / "run"
    port = free_port()
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(PPO_SCRIPT), "--config", str(TINY_RECIPE),
        "--output_dir", str(output_dir),
        "--model_name_or_path", str(tiny_models["policy"]),
        "--reward_model_name_or_path", str(tiny_models["reward"]),
        "--dataset_name", str(prompt_files["jsonl"]),
    ]  # fmt: skip
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]

    # Printed once (main process only), with both processes in the arithmetic: 4 × 1 × 2 = 8 episodes per update,
    # so the recipe's 8 episodes are one update.
    batch_lines = [line for line in result.stdout.splitlines() if line.startswith("batches: ")]
    assert batch_lines == [
        "batches: 4 per-device episodes × 1 grad-accumulation × 2 processes = 8 episodes per update; "
        "2 mini-batches of 4 episodes; 8 episodes → 1 updates"
    ]
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == 1
    assert metrics[0]["episode"] == 8
    assert (output_dir / "adapter_config.json").is_file()
    assert (output_dir / "value_model" / "model.safetensors").is_file()
