"""The README's promises: its Quickstart commands exist as make targets, every recipe parses strictly, and every
file a README command names exists."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from wandb_records import read_wandb_records, summary

from recipes import REPO_ROOT, parse_recipe

README = (REPO_ROOT / "README.md").read_text()


def test_quickstart_commands_are_make_targets_and_ci_runs_make_test():
    assert "make demo" in README and "make test" in README
    for target in ("demo", "test"):
        dry_run = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True)
        assert dry_run.returncode == 0, dry_run.stderr
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob("configs/*/ppo.yaml")))
def test_every_ppo_recipe_parses_strictly(recipe):
    parsed = parse_recipe(["--config", str(REPO_ROOT / recipe)])
    assert parsed.model.model_name_or_path and parsed.training.output_dir


def test_files_named_in_readme_commands_exist():
    named = set(re.findall(r"\b((?:scripts|configs)/[\w./-]+\.(?:py|yaml))\b", README))
    assert named, "the README names no scripts or configs"
    missing = [path for path in named if "<" not in path and not (REPO_ROOT / path).is_file()]
    assert not missing, f"README names missing files: {missing}"


@pytest.mark.slow
def test_make_demo_runs_the_default_pipeline_end_to_end(tmp_path):
    """`make demo` itself, on SmolLM2 with a small budget: preference pairs → reward model → PPO (with its held-out
    evaluation) → evaluation, whose before/after summary is printed and is in its W&B offline run."""
    budget = {
        "DEMO_OUT": str(tmp_path / "demo"),
        "PREFERENCE_FLAGS": "--max_train_prompts 12 --max_test_prompts 6 --max_new_tokens 16 --min_score_gap 0",
        "REWARD_FLAGS": "--num_train_epochs 1 --report_to none",
        "PPO_FLAGS": "--total_episodes 8 --response_length 16 --num_ppo_epochs 1 --max_eval_prompts 4 --report_to none",
        "EVAL_FLAGS": "--max_eval_prompts 6 --response_length 16",
    }
    result = subprocess.run(
        ["make", "demo", *(f"{key}={value}" for key, value in budget.items())],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    demo = tmp_path / "demo"
    assert (demo / "reward_model" / "config.json").is_file()
    assert (demo / "ppo" / "adapter_model.safetensors").is_file()
    results = json.loads((demo / "eval" / "eval_results.json").read_text())
    assert {"reward/sentiment/mean", "win_rate/reward_model", "kl/k1/mean", "perplexity/policy"} <= results.keys()
    assert "evaluation of" in result.stdout
    # The PPO run's held-out evaluation after its one update.
    (last_update,) = [json.loads(line) for line in (demo / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/reward/sentiment/mean", "eval/kl/k1/mean", "eval/win_rate/reward_model"} <= last_update.keys()
    # The before/after summary in the evaluation's W&B offline run.
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    final = summary(read_wandb_records(run_file))
    for key in ("reward/sentiment/mean", "reference/reward/sentiment/mean", "reward/reward_model/mean",
                "reference/reward/reward_model/mean", "kl/k1/mean", "perplexity/policy", "win_rate/sentiment"):
        assert final[key] == pytest.approx(results[key]), key
