"""Models loaded outside the PPO trainer (evaluation, the preference builder) come in the recipe's dtype on this
process's device, and several processes under `accelerate launch` share the work and give what one process gives:
the same eval_results.json and samples, the same preference files. (This machine has no GPU: the device is the CPU
here; on a GPU machine it is `accelerate`'s device for the process.)"""

import json
import os
from pathlib import Path

import pytest
import torch

from recipes.devices import Shard
from recipes.evaluation import EvalArguments, load_policy_for_eval, load_reward_sources

from conftest import PPO_SCRIPT, PROMPTS, REPO_ROOT, free_port, run_python, tiny_recipe_flags, write_prompt_files

TWO_CPU_PROCESSES = ["--config_file", "configs/accelerate/multi_cpu.yaml", "--num_processes", "2"]


def test_evaluation_models_come_in_the_evaluation_dtype_on_the_given_device(tiny_models):
    policy = load_policy_for_eval(str(tiny_models["policy"]), "bfloat16", torch.device("cpu"))
    (reward,) = load_reward_sources(EvalArguments(reward_models=[str(tiny_models["reward"])], dtype="bfloat16"), "cpu")
    for model in (policy, reward.model):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_shard_takes_every_count_th_batch_and_the_shards_cover_all():
    shards = [Shard(index, 3).mine(8) for index in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Shard().mine(3) == [0, 1, 2]


def run_both_ways(args: list[str], tmp_path: Path, output_flag: str) -> tuple[Path, Path]:
    """Runs `args` (a script and its flags) as one process and as two under accelerate launch, each writing to its
    own folder (`output_flag` names the flag that says where)."""
    folders = (tmp_path / "one_process", tmp_path / "two_processes")
    env = {"OMP_NUM_THREADS": "1"}
    one = run_python([*args, output_flag, str(folders[0])], cwd=REPO_ROOT, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    port = ["--main_process_port", str(free_port())]
    two = run_python(["-m", "accelerate.commands.launch", *TWO_CPU_PROCESSES, *port, *args, output_flag,
                      str(folders[1])], cwd=REPO_ROOT, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return folders


@pytest.fixture(scope="module")
def tiny_ppo_output(tiny_models, tmp_path_factory) -> Path:
    """A tiny PPO run of configs/tiny/ppo.yaml (2 updates): a LoRA adapter on the tiny policy."""
    prompts = write_prompt_files(tmp_path_factory.mktemp("prompts"), PROMPTS)["jsonl"]
    output_dir = tmp_path_factory.mktemp("runs") / "ppo"
    result = run_python([str(PPO_SCRIPT), *tiny_recipe_flags(tiny_models, prompts, output_dir)], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("perplexity", ["completions", "texts"])
def test_evaluation_on_two_processes_gives_the_one_process_results(perplexity, tiny_models, tiny_ppo_output, tmp_path):
    """configs/tiny/eval.yaml on a tiny PPO output; 8 held-out prompts in batches of 3 (3, 3, 2): one process takes
    batches 0 and 2, the other batch 1. Perplexity of the reference's completions, or of a text file (its 5 texts in
    batches of 3: split too)."""
    args = ["scripts/evaluate.py", "--config", "configs/tiny/eval.yaml", "--policy_name_or_path", str(tiny_ppo_output),
            "--reward_models", str(tiny_models["reward"]), "--batch_size", "3"]  # fmt: skip
    if perplexity == "texts":
        texts = tmp_path / "texts.jsonl"
        lines = ["The cat sat on the mat.", "Rain again today.", "A short note.", "Tea or coffee?", "The end."]
        texts.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        args += ["--perplexity_texts", str(texts)]
    one, two = run_both_ways(args, tmp_path, "--output_dir")
    results = json.loads((one / "eval_results.json").read_text())
    assert results["num_prompts"] == 8
    assert (two / "eval_results.json").read_text() == (one / "eval_results.json").read_text()
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    assert (two / "eval.yaml").is_file()


@pytest.mark.slow
def test_preference_builder_on_two_processes_writes_the_one_process_files(tiny_models, tmp_path):
    """configs/tiny/reward.yaml: 16 train prompts in 2 batches of 8 (one per process), 8 test prompts in 1."""
    args = ["scripts/build_preferences.py", "--config", "configs/tiny/reward.yaml",
            "--policy_name_or_path", str(tiny_models["policy"])]  # fmt: skip
    one, two = run_both_ways(args, tmp_path, "--dataset_name")
    for name in ("train.jsonl", "test.jsonl"):
        rows = (one / name).read_text().splitlines()
        assert len(rows) == {"train.jsonl": 16, "test.jsonl": 8}[name]
        assert (two / name).read_text().splitlines() == rows
    assert sorted(os.listdir(two)) == ["test.jsonl", "train.jsonl"]
