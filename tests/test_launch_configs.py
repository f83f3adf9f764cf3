"""Every launch config runs for real: the tiny recipe through the very files users launch with
(configs/accelerate/{multi_cpu,fsdp,deepspeed_zero2,deepspeed_zero3}.yaml), two CPU processes each, overriding only
what a CPU needs (`--mixed_precision no`). For PPO: it trains on the backend it names, gives the same numbers as
plain data parallelism, saves a policy and value model that reload and generate, and a run stopped after a
checkpoint resumes to the same weights and metrics as an uninterrupted one. For reward-model training: it trains,
gathers and saves a model that loads. DeepSpeed also with reward functions and a reward model read through its own
tokenizer.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from recipes.evaluation import load_policy_for_eval
from tests.conftest import REPO_ROOT, TINY_RECIPE, free_port, read_metrics, write_prompt_files

pytestmark = pytest.mark.slow

ACCELERATE = Path(sys.executable).parent / "accelerate"
BACKENDS = {
    "multi_cpu": "DDP",
    "fsdp": "FSDP 2 (5 units)",  # the root and each transformer block of the policy (2) and the critic (2)
    "deepspeed_zero2": "DeepSpeed ZeRO-2",
    "deepspeed_zero3": "DeepSpeed ZeRO-3",
}
UPDATES = 3
# 4 episodes per process × 2 processes = 8 per update; a checkpoint after each of the first two updates.
RUN_FLAGS = ("--total_episodes", str(8 * UPDATES), "--save_steps", "1", "--save_total_limit", "3")
NOT_COMPARED = ("eps", "time/", "memory/")  # wall time and memory differ between runs and backends
# Numbers agree between backends to fp32 rounding: ZeRO-3 gathers weights into new buffers, FSDP reduces
# gradients in another order.
BACKEND_TOLERANCE = {"rel": 1e-3, "abs": 1e-5}

PROMPTS = [f"Tell me about the {subject}." for subject in (
    "movie", "book", "concert", "train ride", "dinner", "museum", "hike", "game", "album", "play", "garden", "beach",
)]  # fmt: skip


def launch(config: str, script: str, *flags: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2` as a user runs it."""
    command = [
        str(ACCELERATE), "launch", "--config_file", f"configs/accelerate/{config}.yaml", "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()), script, *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{config}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    return result


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)} for row in metrics]


def assert_same_metrics(actual: list[dict], expected: list[dict], **tolerance) -> None:
    assert [row["step"] for row in actual] == [row["step"] for row in expected]
    for ours, theirs in zip(comparable(actual), comparable(expected)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], **tolerance), (ours["step"], key)


def trained_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    policy = load_file(output_dir / "adapter_model.safetensors")
    value = load_file(output_dir / "value_model" / "model.safetensors")
    return {**{f"policy.{k}": v for k, v in policy.items()}, **{f"value.{k}": v for k, v in value.items()}}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompt_files(tmp_path_factory.mktemp("launch_data"), PROMPTS)["jsonl"]


@pytest.fixture(scope="module")
def ppo_runs(tiny_models, prompts, tmp_path_factory):
    """{backend: (output folder, launch result)} of uninterrupted runs, made on first use."""
    root, runs = tmp_path_factory.mktemp("ppo_runs"), {}

    def run(backend: str):
        if backend not in runs:
            output_dir = root / backend
            result = launch(backend, "scripts/ppo.py", *ppo_flags(tiny_models, prompts, output_dir))
            runs[backend] = output_dir, result
        return runs[backend]

    return run


def ppo_flags(tiny_models, prompts: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_models["policy"]),
        "--reward_model_name_or_path", str(tiny_models["reward"]), "--dataset_name", str(prompts),
        "--output_dir", str(output_dir), *RUN_FLAGS, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ppo_trains_on_the_backend_it_names_and_saves_models_that_load(backend, ppo_runs, tiny_models):
    output_dir, result = ppo_runs(backend)
    assert f"backend: {BACKENDS[backend]} on 2 processes (cpu)" in result.stdout
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert [row["episode"] for row in metrics] == [8, 16, 24]
    if backend != "multi_cpu":
        # Sharding changes where the numbers are computed, not what they are.
        assert_same_metrics(metrics, read_metrics(ppo_runs("multi_cpu")[0] / "metrics.jsonl"), **BACKEND_TOLERANCE)

    # The saved policy is whole (a ZeRO-3 or FSDP shard would be empty or partial) and generates.
    policy = load_policy_for_eval(str(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    prompt = tokenizer(["Tell me about the sea."], return_tensors="pt")
    output = policy.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 4
    # The critic started from the reward model and was trained.
    value = AutoModelForSequenceClassification.from_pretrained(output_dir / "value_model")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    assert value.score.weight.shape == reward.score.weight.shape
    assert not torch.equal(value.score.weight, reward.score.weight)
    # Every checkpoint is complete and holds a loadable policy beside the backend's own state.
    for update in (1, 2):
        folder = output_dir / "checkpoints" / f"update-{update:06d}"
        assert (folder / "progress.json").is_file() and (folder / "adapter_config.json").is_file()
        assert any((folder / "state").iterdir())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ppo_run_stopped_after_a_checkpoint_resumes_to_the_same_result(backend, ppo_runs, tiny_models, prompts, tmp_path):
    reference_dir, _ = ppo_runs(backend)
    # What a run killed right after its first checkpoint leaves behind: the checkpoint, the recipe, one metrics line.
    output_dir = tmp_path / "stopped"
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_dir / "checkpoints" / "update-000001", output_dir / "checkpoints" / "update-000001")
    shutil.copy(reference_dir / "recipe.yaml", output_dir / "recipe.yaml")
    first_line = (reference_dir / "metrics.jsonl").read_text().splitlines()[0]
    (output_dir / "metrics.jsonl").write_text(first_line + "\n" + json.dumps({"step": 2, "logged": "after"}) + "\n")

    result = launch(backend, "scripts/ppo.py", *ppo_flags(tiny_models, prompts, output_dir))
    assert "resuming after update 1" in result.stdout + result.stderr
    expected, actual = trained_weights(reference_dir), trained_weights(output_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert_same_metrics(read_metrics(output_dir / "metrics.jsonl"), read_metrics(reference_dir / "metrics.jsonl"),
                        rel=1e-5, abs=1e-7)  # fmt: skip


@pytest.mark.parametrize("backend", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_with_reward_functions_and_the_reward_models_own_tokenizer(backend, tiny_models, prompts, tmp_path):
    output_dir = tmp_path / "run"
    result = launch(backend, "scripts/ppo.py", *ppo_flags(
        tiny_models, prompts, output_dir, "--reward_model_tokenizer", "own", "--reward_functions", "length",
        "--reward_weights", "1.0", "0.5", "--value_model_init", "policy_trunk", "--save_strategy", "no",
    ))  # fmt: skip
    assert f"backend: {BACKENDS[backend]} on 2 processes (cpu)" in result.stdout
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == UPDATES
    for row in metrics:
        # The total is the weighted sum of the two sources' means, each gathered from both processes.
        total = row["reward/reward_model"] + 0.5 * row["reward/length"]
        assert row["objective/scores"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        assert 0 <= row["reward/length"] <= 1
    assert (output_dir / "value_model" / "value_head.safetensors").is_file()
    head = load_file(output_dir / "value_model" / "value_head.safetensors")
    assert head["score.weight"].shape == (1, 64) and head["score.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def preference_pairs(tmp_path_factory) -> Path:
    """Preference pairs in TRL's conversational format: positive replies chosen over negative ones."""
    folder = tmp_path_factory.mktemp("pairs")
    subjects = ["movie", "book", "concert", "dinner", "museum", "hike", "game", "album", "play", "garden", "beach", "trip"]
    for split, names in (("train", subjects), ("test", subjects[:6])):
        rows = [
            {
                "chosen": [{"role": "user", "content": f"How was the {s}?"}, {"role": "assistant", "content": "Wonderful!"}],
                "rejected": [{"role": "user", "content": f"How was the {s}?"}, {"role": "assistant", "content": "Awful."}],
            }
            for s in names
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reward_model_trains_and_saves_whole(backend, tiny_models, preference_pairs, tmp_path):
    output_dir = tmp_path / "reward_model"
    result = launch(
        backend, "scripts/train_reward.py", "--config", "configs/tiny/reward.yaml",
        "--model_name_or_path", str(tiny_models["policy"]), "--dataset_name", str(preference_pairs),
        "--output_dir", str(output_dir), "--report_to", "none",
    )  # fmt: skip
    assert "validation (6 pairs): accuracy" in result.stdout
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert model.config.num_labels == 1
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_models["policy"], num_labels=1)
    # Every weight is whole and the trunk was trained (a gathered ZeRO-3 or FSDP shard would be empty).
    state, initial = model.state_dict(), reference.state_dict()
    assert all(state[name].shape == initial[name].shape for name in initial)
    assert not torch.equal(state["model.layers.0.mlp.down_proj.weight"], initial["model.layers.0.mlp.down_proj.weight"])
    final = read_metrics(output_dir / "metrics.jsonl")[-1]
    # center_rewards (tiny recipe): the training completions' mean score is 0 after centring.
    assert final["centring/reference_mean_score_after"] == pytest.approx(0.0, abs=1e-4)
    assert 0.0 <= final["final/eval/accuracy"] <= 1.0
