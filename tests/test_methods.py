"""PPO's rivals through their entry points (scripts/{sft,dpo,rloo,grpo,raft}.py, recipes/methods): each runs its tiny
recipe end to end in this process (logging to metrics.jsonl and to W&B offline) and under `accelerate launch` with
two processes, leaves a policy that scripts/evaluate.py loads and that generates, samples exactly its budget, and
refuses bad input as scripts/ppo.py does. RAFT's selection on hand-made scores; the reward adapter against the
kit's own scoring; every recipe of configs/{tiny,smollm2-135m} parses and starts with the command that runs it.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROMPTS, REPO_ROOT, free_port, read_metrics
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from wandb_records import history_rows, read_wandb_records, run_config

from recipes.config import ModelArguments
from recipes.errors import RecipeError
from recipes.evaluation import load_policy_for_eval
from recipes.methods.dpo import parse_dpo_recipe
from recipes.methods.grpo import parse_grpo_recipe
from recipes.methods.raft import RoundPlan, best_of_k, parse_raft_recipe
from recipes.methods.rloo import parse_rloo_recipe
from recipes.methods.sft import parse_sft_recipe
from recipes.methods.trl_wiring import RewardFunction, policy_tokens
from recipes.models import load_tokenizer
from recipes.rewards.sources import Episodes, FunctionSource, ModelSource, WeightedSum

METHODS = ("sft", "dpo", "rloo", "grpo", "raft")
PARSERS = {"sft": parse_sft_recipe, "dpo": parse_dpo_recipe, "rloo": parse_rloo_recipe, "grpo": parse_grpo_recipe,
           "raft": parse_raft_recipe}  # fmt: skip
ONLINE = ("rloo", "grpo", "raft")
BUDGET = 8  # the tiny recipes' completions sampled (total_episodes); 0 for SFT and DPO, which sample none
# A metric each method's trainer logs, as metrics.jsonl names it.
METRIC = {"sft": "loss", "dpo": "rewards/accuracies", "rloo": "reward", "grpo": "reward", "raft": "reward/mean"}
ACCELERATE = Path(sys.executable).parent / "accelerate"


# ---------------------------------------------------------------------------------------------------------------
# Data and runs


@pytest.fixture(scope="module")
def method_data(tmp_path_factory) -> dict[str, Path]:
    """Prompts (one `prompt` column) for the online methods; preference pairs (train/test files, TRL's conversational
    `chosen`/`rejected`, as scripts/build_preferences.py writes them) for DPO, whose `chosen` turns SFT trains on."""
    folder = tmp_path_factory.mktemp("method_data")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    pairs = folder / "pairs"
    pairs.mkdir()
    for name, prompts in (("train.jsonl", PROMPTS[:8]), ("test.jsonl", PROMPTS[8:])):
        rows = [
            {
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": "It was lovely, thanks!"}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "Awful. Never again."}],
                "chosen_score": 0.8,
                "rejected_score": -0.6,
            }
            for p in prompts
        ]
        (pairs / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"prompts": folder / "prompts.jsonl", "pairs": pairs}


def recipe_path(method: str) -> Path:
    return REPO_ROOT / "configs" / "tiny" / f"{method}.yaml"


def method_flags(method: str, tiny_models, data, output_dir: Path, *overrides: str) -> list[str]:
    """configs/tiny/<method>.yaml on the tiny models and the test's data, writing to `output_dir`."""
    flags = ["--config", str(recipe_path(method)), "--model_name_or_path", str(tiny_models["policy"]),
             "--output_dir", str(output_dir)]  # fmt: skip
    if method in ONLINE:
        flags += ["--reward_model_name_or_path", str(tiny_models["reward"]), "--dataset_name", str(data["prompts"])]
    else:
        flags += ["--dataset_name", str(data["pairs"])]
    return [*flags, *overrides]


def run_script(method: str, args: list[str], monkeypatch) -> int:
    """scripts/<method>.py run in this process as `python scripts/<method>.py args...`; returns its exit code."""
    script = REPO_ROOT / "scripts" / f"{method}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    return exit_.value.code


@pytest.fixture
def one_thread():
    """On two shared cores, one intra-op thread per process is several times faster than two fighting for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path) -> Path:
    """No key, no mode: the kit must choose offline itself (as tests/test_wandb_offline.py). Returns the folder W&B
    writes its run files under; W&B's process-wide setup is torn down afterwards, so the next run reads its own."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "placeholder")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb-{name.lower()}"))
        (tmp_path / f"wandb-{name.lower()}").mkdir()
    (tmp_path / "home").mkdir()
    yield tmp_path / "wandb-dir"
    wandb.teardown()


def check_policy(output_dir: Path, tiny_models) -> None:
    """The folder holds a trained LoRA adapter naming the tiny policy as its base, with the tokenizer; it loads as
    scripts/evaluate.py loads it and generates."""
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_models["policy"])
    assert (output_dir / "tokenizer_config.json").is_file()
    # LoRA's B matrices start at zero: some moved, so the adapter was trained.
    weights = load_file(output_dir / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in weights.items())
    policy = load_policy_for_eval(str(output_dir))
    prompt = torch.tensor([[1, 2, 3]])
    output = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                             min_new_tokens=3, do_sample=False)  # fmt: skip
    assert output.shape == (1, 6)


# ---------------------------------------------------------------------------------------------------------------
# End to end, in this process


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_runs_in_process(method, tiny_models, method_data, tmp_path, monkeypatch, capsys, one_thread, offline_wandb):
    output_dir = tmp_path / "run"
    flags = method_flags(method, tiny_models, method_data, output_dir, "--report_to", "wandb",
                         "--wandb_project", "ppo-recipes-tests", "--run_name", f"{method}-check")  # fmt: skip
    assert run_script(method, flags, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "W&B: logging offline" in printed

    check_policy(output_dir, tiny_models)
    # The saved recipe reruns the same run (fields TRL derives from the number of processes left out).
    recipe = PARSERS[method](flags)
    saved = PARSERS[method](["--config", str(output_dir / "recipe.yaml")])
    assert saved.to_dict() == recipe.to_dict()
    assert saved.training.max_steps == recipe.training.max_steps

    metrics = read_metrics(output_dir / "metrics.jsonl")
    logged = [row for row in metrics if METRIC[method] in row]
    assert logged and all(isinstance(row[METRIC[method]], float) for row in logged)
    if method in ("rloo", "grpo"):
        # 4 completions per generation on one process: 2 generations, one optimizer step each.
        assert f"{BUDGET} completions sampled and scored in 2 optimizer steps" in printed
        assert [row["step"] for row in logged] == [1, 2]
        assert all("kl" in row for row in logged)  # beta > 0: the adapter-disabled reference took part
    if method == "raft":
        assert [row["episodes"] for row in metrics] == [4, BUDGET]  # 2 rounds × 2 prompts × 2 completions
        assert all(row["selected"] == 2 for row in metrics)  # each prompt's best
        check_policy(output_dir / "rounds" / "round-1", tiny_models)

    run_files = list(offline_wandb.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    records = read_wandb_records(run_files[0])
    assert run_config(records, with_updates=False)["model_name_or_path"] == str(tiny_models["policy"])
    rows = [row for row in history_rows(records) if f"train/{METRIC[method]}" in row]
    assert [row[f"train/{METRIC[method]}"] for row in rows] == pytest.approx([row[METRIC[method]] for row in logged])


# ---------------------------------------------------------------------------------------------------------------
# End to end, two processes


@pytest.fixture(scope="module")
def launched(tiny_models, method_data, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every method's tiny recipe under `accelerate launch --config_file configs/accelerate/multi_cpu.yaml
    --num_processes 2`, the five launches side by side (each mostly waits for its imports)."""
    folder = tmp_path_factory.mktemp("launched")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    running = {}
    for method in METHODS:
        output_dir = folder / method
        command = [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/multi_cpu.yaml", "--num_processes",
                   "2", "--main_process_port", str(free_port()), f"scripts/{method}.py",
                   *method_flags(method, tiny_models, method_data, output_dir)]  # fmt: skip
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        running[method] = (process, command, output_dir)
    finished = {}
    for method, (process, command, output_dir) in running.items():
        stdout, stderr = process.communicate(timeout=900)
        finished[method] = (subprocess.CompletedProcess(command, process.returncode, stdout, stderr), output_dir)
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_runs_on_two_processes(method, launched, tiny_models):
    result, output_dir = launched[method]
    assert result.returncode == 0, f"{method}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    check_policy(output_dir, tiny_models)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert any(METRIC[method] in row for row in metrics)
    if method in ("rloo", "grpo"):
        # The same budget on two processes: 8 completions per generation, one generation, one step.
        assert f"{BUDGET} completions sampled and scored in 1 optimizer steps" in result.stdout
    elif method == "raft":
        assert [row["episodes"] for row in metrics] == [4, BUDGET]
        assert all(row["selected"] == 2 for row in metrics)  # one prompt's best from each process
    else:
        assert "× 2 processes" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 1, nothing written

# A field each method's recipe does not honour, set in its YAML, and what the refusal names.
NOT_HONOURED = {
    "sft": ("reward_model_name_or_path", "outputs/tiny/models/reward", "SFT trains on examples, without a reward"),
    "dpo": ("value_model_init", "policy", "PPO's critic"),
    "rloo": ("top_p", 0.9, "softmax(logits / temperature) alone"),
    "grpo": ("remove_unused_columns", True, "the kit's reward reads the prompt columns"),
    "raft": ("save_strategy", "steps", "RAFT saves the policy after every round"),
}


def refused(method: str, changes: dict, tmp_path: Path, tiny_models, method_data, monkeypatch, capsys) -> str:
    """Runs the method's script on its tiny recipe changed by `changes`; checks the refusal; returns the error line."""
    output_dir = tmp_path / "run"
    recipe = yaml.safe_load(recipe_path(method).read_text())
    flags = method_flags(method, tiny_models, method_data, output_dir)
    recipe.update({flags[i].removeprefix("--"): flags[i + 1] for i in range(2, len(flags), 2)}, **changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = run_script(method, ["--config", str(path)], monkeypatch)
    stderr = capsys.readouterr().err
    assert code == 1, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), stderr
    assert not output_dir.exists()
    return lines[-1]


@pytest.mark.parametrize("method", METHODS)
def test_refuses_unknown_key(method, tmp_path, tiny_models, method_data, monkeypatch, capsys):
    error = refused(method, {"learning_rat": 0.1}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert f"{tmp_path / 'bad.yaml'}: unknown key 'learning_rat'" in error


@pytest.mark.parametrize("method", METHODS)
def test_refuses_wrong_type(method, tmp_path, tiny_models, method_data, monkeypatch, capsys):
    error = refused(method, {"per_device_train_batch_size": "four"}, tmp_path, tiny_models, method_data, monkeypatch,
                    capsys)  # fmt: skip
    assert "key 'per_device_train_batch_size' has str value 'four', expected int" in error


@pytest.mark.parametrize("method", METHODS)
def test_refuses_missing_data_file(method, tmp_path, tiny_models, method_data, monkeypatch, capsys):
    absent = tmp_path / "absent.jsonl"
    error = refused(method, {"dataset_name": str(absent)}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert error == f"error: dataset_name: data file not found: {absent}"


@pytest.mark.parametrize("method", METHODS)
def test_refuses_what_it_does_not_honour(method, tmp_path, tiny_models, method_data, monkeypatch, capsys):
    name, value, why = NOT_HONOURED[method]
    error = refused(method, {name: value}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert f"'{name}' is not read by the {method} recipe: " in error and why in error


def test_refuses_a_budget_that_does_not_divide(tmp_path, tiny_models, method_data, monkeypatch, capsys):
    # 4 completions per generation: 10 is not a whole number of generations.
    error = refused("grpo", {"total_episodes": 10}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert "total_episodes=10 is not a whole number of generation batches of 4 completions" in error
    error = refused("grpo", {"max_steps": 3}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert "total_episodes and max_steps are both set" in error
    # 2 rounds × 2 completions: 10 completions do not make whole rounds.
    error = refused("raft", {"total_episodes": 10}, tmp_path, tiny_models, method_data, monkeypatch, capsys)
    assert "total_episodes=10 is not a whole number of prompts per round" in error


# ---------------------------------------------------------------------------------------------------------------
# RAFT's selection and budget


def test_best_of_k_takes_each_prompts_highest_score():
    scores = torch.tensor([[0.1, 0.7, 0.3], [2.0, -1.0, 1.5], [-0.5, -0.2, -0.9]])
    assert best_of_k(scores) == [(0, 1), (1, 0), (2, 1)]


def test_best_of_k_keeps_the_first_of_equal_scores():
    scores = torch.tensor([[0.4, 0.4, 0.1], [0.0, 0.0, 0.0], [-1.0, 0.5, 0.5]])
    assert best_of_k(scores) == [(0, 0), (1, 0), (2, 1)]


def test_best_of_k_with_one_completion_keeps_it():
    scores = torch.tensor([[0.3], [-2.0], [0.0]])
    assert best_of_k(scores) == [(0, 0), (1, 0), (2, 0)]


def test_best_of_k_keeps_a_negative_best_unless_below_min_score():
    scores = torch.tensor([[-0.8, -0.3], [0.2, 0.9], [-0.1, -0.1]])
    assert best_of_k(scores) == [(0, 1), (1, 1), (2, 0)]
    assert best_of_k(scores, min_score=0.0) == [(1, 1)]
    assert best_of_k(scores, min_score=-0.1) == [(1, 1), (2, 0)]  # the bound is inclusive


def test_best_of_k_never_picks_nan():
    nan = float("nan")
    scores = torch.tensor([[nan, 0.2, 0.1], [nan, nan, nan], [-3.0, nan, -4.0]])
    assert best_of_k(scores) == [(0, 1), (2, 0)]  # a prompt with no score at all is left out


def test_best_of_k_refuses_a_shape_without_completions():
    with pytest.raises(ValueError):
        best_of_k(torch.zeros(3, 0))
    with pytest.raises(ValueError):
        best_of_k(torch.zeros(3))


def test_round_plan_splits_the_budget():
    recipe = parse_raft_recipe(["--config", str(REPO_ROOT / "configs" / "smollm2-135m" / "raft.yaml")])
    plan = RoundPlan.of(recipe.training, processes=2, train_prompts=400)
    assert (plan.total_episodes, plan.num_rounds, plan.completions_per_prompt, plan.prompts_per_round) == (128, 4, 4, 8)
    with pytest.raises(RecipeError, match="8 prompts per round, but only 5 training prompts"):
        RoundPlan.of(recipe.training, processes=1, train_prompts=5)
    with pytest.raises(RecipeError, match="do not divide between 3 processes"):
        RoundPlan.of(recipe.training, processes=3, train_prompts=400)


# ---------------------------------------------------------------------------------------------------------------
# The reward adapter: the kit's scoring, in TRL's reward-function signature


def test_reward_function_scores_as_the_kit_scores(tiny_models):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"])))
    pad = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    source = WeightedSum([(1.0, ModelSource(model)), (0.5, FunctionSource.from_spec("length"))])
    function = RewardFunction(source, pad)
    assert function.__name__ == "weighted_sum"

    prompts = [[{"role": "user", "content": "The movie was"}], [{"role": "user", "content": "My day has been"}]]
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    texts = ["great fun", "long and rather tiring, but fine"]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    logged = {}
    scores = function(
        prompts=prompts,
        completions=[[{"role": "assistant", "content": t}] for t in texts],
        completion_ids=completion_ids,
        reward_prompt=["The movie was", "My day has been"],
        prompt_ids=prompt_ids,
        log_metric=logged.__setitem__,
        trainer_state=None,
    )
    token_rows = policy_tokens(prompt_ids, completion_ids, pad)
    expected = source.score(Episodes(["The movie was", "My day has been"], texts, prompts, token_rows, pad))
    assert scores == pytest.approx(expected.total.tolist())
    assert logged.keys() == {"rewards/reward_model/mean", "rewards/length/mean"}
    assert logged["rewards/length/mean"] == pytest.approx(expected.by_source["length"].mean().item())
    # The kit's layout: prompts left-padded, completions (EOS included) right-padded.
    width = max(map(len, prompt_ids))
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        assert token_rows[row, width - len(prompt) : width].tolist() == prompt
        assert token_rows[row, width : width + len(completion)].tolist() == completion
        assert (token_rows[row, : width - len(prompt)] == pad).all()
        assert (token_rows[row, width + len(completion) :] == pad).all()
    assert function.completions_scored == 2


# ---------------------------------------------------------------------------------------------------------------
# The recipes


@pytest.mark.parametrize("folder", ["tiny", "smollm2-135m"])
@pytest.mark.parametrize("method", METHODS)
def test_recipe_parses_and_starts_with_its_command(method, folder):
    path = REPO_ROOT / "configs" / folder / f"{method}.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# accelerate launch ")
    assert f" scripts/{method}.py --config configs/{folder}/{method}.yaml" in first_line
    recipe = PARSERS[method](["--config", str(path)])
    if method in ("rloo", "grpo"):
        # Budgets in completions sampled: the optimizer steps TRL runs follow from total_episodes.
        assert recipe.training.max_steps > 0 and "max_steps" not in recipe.to_dict()
    if folder == "smollm2-135m" and method in ONLINE:
        assert recipe.training.total_episodes == 128  # as configs/smollm2-135m/ppo.yaml
        assert recipe.model.reward_model_tokenizer == "own"
