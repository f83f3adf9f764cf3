"""The mistakes a new user makes, entry point by entry point: each ends in one `error:` line naming the key, file,
row or column and saying what to do, exit code 1, no traceback, and no output folder left behind (an existing one is
left as it was).

Most mistakes are checked where the kit checks them (recipe parsing, data loading, checkpoint resuming) in this
process; the scripts run in this process too (`run_script`), as `python scripts/<name>.py` would, and one in a
Python process of its own."""

import hashlib
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PPO_SCRIPT, PROMPTS, REPO_ROOT, TINY_RECIPE, run_python, tiny_recipe_flags, write_prompt_files

from recipes import parse_recipe, run_ppo
from recipes.config import DataArguments, ModelArguments, PreferenceDataArguments
from recipes.data import load_raw_prompts
from recipes.errors import RecipeError
from recipes.evaluation import parse_eval_config
from recipes.methods.dpo import parse_dpo_recipe
from recipes.methods.grpo import parse_grpo_recipe
from recipes.methods.raft import parse_raft_recipe
from recipes.methods.rloo import parse_rloo_recipe
from recipes.methods.sft import parse_sft_recipe
from recipes.models import check_model_kind
from recipes.ppo import checkpoint
from recipes.rewards.sources import Episodes, FunctionSource
from reward_models.config import parse_reward_recipe

TINY = REPO_ROOT / "configs" / "tiny"


def run_script(script: str, args: list[str], monkeypatch) -> int:
    """scripts/<script> run in this process as `python scripts/<script> args...`; returns its exit code (an
    exception other than the kit's own error escapes, as a traceback would)."""
    path = REPO_ROOT / "scripts" / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    return exit_.value.code


def refused(script: str, args: list[str], monkeypatch, capsys, output: Path | None = None) -> str:
    """Runs the script; checks exit code 1, one `error:` line, last, and no `output` folder; returns that line."""
    code = run_script(script, args, monkeypatch)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr
    if output is not None:
        assert not output.exists()
    return lines[-1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Every entry point: the recipe file and its numbers


def parse_error(parse, args: list[str]) -> str:
    with pytest.raises(RecipeError) as error:
        parse(args)
    return str(error.value)


def test_yaml_with_a_tab_names_the_line_and_says_why(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("model_name_or_path: policy\n\tlora_r: 8\n")
    error = parse_error(parse_recipe, ["--config", str(path)])
    assert error == (f"{path}, line 2, column 1: found character '\\t' that cannot start any token (YAML indents "
                     "with spaces, not tabs)")  # fmt: skip


@pytest.mark.parametrize("parse, recipe", [(parse_recipe, "ppo"), (parse_reward_recipe, "reward"),
                                           (parse_eval_config, "eval"), (parse_sft_recipe, "sft")])  # fmt: skip
def test_key_given_twice_is_refused(parse, recipe, tmp_path):
    """YAML itself keeps the last of two equal keys, silently."""
    text = (TINY / f"{recipe}.yaml").read_text()
    first = next(line for line in text.splitlines() if line and not line.startswith("#"))
    path = tmp_path / "twice.yaml"
    path.write_text(text + first + "\n")
    first_line = text.splitlines().index(first) + 1
    key = first.split(":")[0]
    error = parse_error(parse, ["--config", str(path)])
    assert error.startswith(f"{path}, line {len(text.splitlines()) + 1}, column 1: key '{key}' is given twice "
                            f"(first on line {first_line})")  # fmt: skip


OUT_OF_RANGE = [
    # scripts/ppo.py: DataArguments, ModelArguments, PPOConfig
    (parse_recipe, "ppo", "max_prompt_length", "-5"),
    (parse_recipe, "ppo", "eval_fraction", "1.5"),
    (parse_recipe, "ppo", "max_train_prompts", "0"),
    (parse_recipe, "ppo", "max_eval_prompts", "-1"),
    (parse_recipe, "ppo", "lora_r", "0"),
    (parse_recipe, "ppo", "lora_dropout", "1.0"),
    (parse_recipe, "ppo", "learning_rate", "inf"),
    (parse_recipe, "ppo", "num_ppo_epochs", "0"),
    # scripts/build_preferences.py and scripts/train_reward.py: the reward recipe
    (parse_reward_recipe, "reward", "completions_per_prompt", "1"),
    (parse_reward_recipe, "reward", "min_score_gap", "-0.5"),
    (parse_reward_recipe, "reward", "temperature", "0"),
    (parse_reward_recipe, "reward", "max_new_tokens", "0"),
    (parse_reward_recipe, "reward", "generation_batch_size", "0"),
    (parse_reward_recipe, "reward", "max_test_prompts", "0"),
    (parse_reward_recipe, "reward", "max_train_pairs", "0"),
    (parse_reward_recipe, "reward", "num_hidden_layers", "0"),
    (parse_reward_recipe, "reward", "per_device_train_batch_size", "0"),
    (parse_reward_recipe, "reward", "num_train_epochs", "-1"),
    (parse_reward_recipe, "reward", "max_length", "0"),
    # scripts/evaluate.py
    (parse_eval_config, "eval", "batch_size", "0"),
    (parse_eval_config, "eval", "response_length", "0"),
    (parse_eval_config, "eval", "temperature", "0"),
    (parse_eval_config, "eval", "max_prompt_length", "0"),
    # the methods beside PPO
    (parse_sft_recipe, "sft", "max_train_examples", "0"),
    (parse_sft_recipe, "sft", "num_train_epochs", "0"),
    (parse_dpo_recipe, "dpo", "beta", "-0.1"),
    (parse_grpo_recipe, "grpo", "num_generations", "0"),
    (parse_grpo_recipe, "grpo", "max_completion_length", "0"),
    (parse_rloo_recipe, "rloo", "num_iterations", "0"),
    (parse_rloo_recipe, "rloo", "temperature", "0"),
    (parse_raft_recipe, "raft", "min_best_score", "nan"),
    (parse_raft_recipe, "raft", "lora_alpha", "0"),
]


@pytest.mark.parametrize("parse, recipe, field, value", OUT_OF_RANGE,
                         ids=[f"{recipe}-{field}" for _, recipe, field, _ in OUT_OF_RANGE])  # fmt: skip
def test_out_of_range_number_is_refused_naming_its_field(parse, recipe, field, value):
    error = parse_error(parse, ["--config", str(TINY / f"{recipe}.yaml"), f"--{field}", value])
    assert error.startswith(f"{field}: ") and " is out of range; it must be " in error, error
    assert error.endswith(f"(recipe {TINY / f'{recipe}.yaml'})")


@pytest.mark.parametrize("parse, recipe", [(parse_recipe, "ppo"), (parse_grpo_recipe, "grpo")])
def test_reward_weight_that_is_not_a_finite_number_is_refused(parse, recipe):
    error = parse_error(parse, ["--config", str(TINY / f"{recipe}.yaml"), "--reward_weights", "nan"])
    assert error.startswith("reward_weights: [nan]; every weight must be a finite number")


@pytest.mark.parametrize("parse, recipe, field", [(parse_eval_config, "eval", "dtype"),
                                                  (parse_eval_config, "eval", "report_to"),
                                                  (parse_reward_recipe, "reward", "policy_dtype")])  # fmt: skip
def test_unknown_choice_is_refused_naming_its_field(parse, recipe, field):
    error = parse_error(parse, ["--config", str(TINY / f"{recipe}.yaml"), f"--{field}", "float33"])
    assert error.startswith(f"argument --{field}") and "invalid choice: 'float33'" in error


# ---------------------------------------------------------------------------------------------------------------
# Every entry point that reads prompts or examples: the data file's shape


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def chats(broken_row: int, message) -> list[dict]:
    """Twelve chat prompts, row `broken_row` (from 1) holding `message` as its one message."""
    rows = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
    rows[broken_row - 1] = {"messages": message}
    return rows


PLAIN = jsonl([{"prompt": p} for p in PROMPTS])

# name: (file name, content, what the error says after "dataset_name: <file>")
BAD_FILES = {
    "empty": ("prompts.jsonl", "", " is empty"),
    "cut mid-line": ("prompts.jsonl", PLAIN[:-12], ", line 12: not a JSON object (was the file cut short?)"),
    "not JSON lines": ("prompts.jsonl", "The movie was\nMy day has been\n", ", line 1: not a JSON object"),
    "a line that is a list": ("prompts.jsonl", PLAIN + '["The movie was"]\n', ", line 13: a JSON list, not an object"),
    "CSV header alone": ("prompts.csv", "prompt\n", " holds a header line and no rows"),
    "prompt missing": ("prompts.jsonl", jsonl([{"prompt": p} for p in PROMPTS[:3]] + [{"text": "x"}]),
                       ", row 4, column 'prompt': nothing (null or missing), not text"),
    "prompt a number": ("prompts.jsonl", jsonl([{"prompt": 5}] + [{"prompt": p} for p in PROMPTS]),
                        ", row 1, column 'prompt': the int '5', not text"),
    "prompt blank": ("prompts.jsonl", jsonl([{"prompt": p} for p in PROMPTS] + [{"prompt": "  "}]),
                     ", row 13, column 'prompt': empty text"),
    "wrong role": ("chats.jsonl", jsonl(chats(3, [{"role": "usr", "content": "Hi"}])),
                   ", row 3, column 'messages': message 1 has role 'usr'; a role is one of system, user, "
                   "assistant, tool"),
    "message without content": ("chats.jsonl", jsonl(chats(2, [{"role": "user", "text": "Hi"}])),
                                ", row 2, column 'messages': message 1 has nothing (null or missing) as its "
                                "'content', not text"),
    "messages a string": ("chats.jsonl", jsonl(chats(5, "Tell me about your day.")),
                          ", row 5, column 'messages': the str 'Tell me about your day.', not a list of chat "
                          "messages ({role, content})"),
    "messages empty": ("chats.jsonl", jsonl(chats(1, [])), ", row 1, column 'messages': an empty list of chat "
                       "messages"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_prompt_file_names_file_line_row_and_column(case, tmp_path):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(RecipeError) as error:
        load_raw_prompts(DataArguments(dataset_name=str(path)), seed=0)
    assert str(error.value).startswith(f"dataset_name: {path}{message}"), str(error.value)


def test_folder_without_a_train_file_says_which_file_the_split_is(tmp_path):
    (tmp_path / "test.jsonl").write_text(PLAIN)
    with pytest.raises(RecipeError) as error:
        load_raw_prompts(DataArguments(dataset_name=str(tmp_path)), seed=0)
    assert str(error.value) == (f"dataset_train_split: '{tmp_path}' has no split 'train' (splits: ['test']) (a "
                                "folder's split 'train' is its train.jsonl)")  # fmt: skip


def test_folder_without_data_files_is_named(tmp_path):
    (tmp_path / "README.md").write_text("prompts go here")
    with pytest.raises(RecipeError, match=rf"^dataset_name: {tmp_path} holds no .jsonl, .json, .parquet or .csv file"):
        load_raw_prompts(DataArguments(dataset_name=str(tmp_path)), seed=0)


def test_rows_of_a_folder_are_counted_in_its_split_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(PLAIN)
    (tmp_path / "test.jsonl").write_text(jsonl([{"prompt": "fine"}, {"prompt": None}]))
    with pytest.raises(RecipeError, match=rf"^dataset_name: {tmp_path / 'test.jsonl'}, row 2, column 'prompt'"):
        load_raw_prompts(DataArguments(dataset_name=str(tmp_path)), seed=0)


def test_cut_preference_file_names_its_line(tmp_path):
    """The pairs' shapes are checked where they are read (tests/test_preference_data.py); a file cut short while
    written is found before."""
    pair = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}  # fmt: skip
    (tmp_path / "train.jsonl").write_text(jsonl([pair] * 3)[:-20])
    (tmp_path / "test.jsonl").write_text(jsonl([pair]))
    with pytest.raises(RecipeError, match=rf"^dataset_name: {tmp_path / 'train.jsonl'}, line 3: not a JSON object"):
        load_raw_prompts(PreferenceDataArguments(dataset_name=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Reward sources: models of the wrong kind, functions that fail


@pytest.mark.parametrize("role, key, kind, message", [
    ("policy", "reward_model_name_or_path", "reward model", "is LlamaForCausalLM, not a reward model"),
    ("reward", "model_name_or_path", "language model", "is a classifier (LlamaForSequenceClassification), not a "
                                                       "language model"),
])  # fmt: skip
def test_model_of_the_wrong_kind_is_refused_before_loading(role, key, kind, message, tiny_models):
    with pytest.raises(RecipeError) as error:
        check_model_kind(str(tiny_models[role]), key, kind)
    assert str(error.value).startswith(f"{key}: '{tiny_models[role]}' {message}")


def test_folder_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(RecipeError, match=rf"^reference_name_or_path: '{tmp_path}' is not a model folder"):
        check_model_kind(str(tmp_path), "reference_name_or_path", "language model")


def _raises(prompts, completions):
    raise KeyError("label")


@pytest.mark.parametrize("function, message", [
    (_raises, "reward function '_raises' raised KeyError: 'label'"),
    (lambda prompts, completions: [1.0], "reward function '<lambda>' returned 1 scores for 2 completions"),
    (lambda prompts, completions: ["good", "bad"], "reward function '<lambda>' returned list ['good', 'bad'], not "
                                                   "one number per completion"),
    (lambda completions: [0.0] * len(completions), "reward function '<lambda>' raised TypeError: "),
])  # fmt: skip
def test_reward_function_that_fails_is_one_error_naming_it(function, message):
    with pytest.raises(RecipeError) as error:
        FunctionSource(function).score(Episodes(["a", "b"], ["c", "d"]))
    assert str(error.value).startswith(message)


# ---------------------------------------------------------------------------------------------------------------
# scripts/ppo.py


@pytest.fixture
def recipe_dict(tiny_models, prompt_files, tmp_path) -> dict:
    """configs/tiny/ppo.yaml pointed at the tiny models, the test's prompt file and a new output folder."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe.update(
        model_name_or_path=str(tiny_models["policy"]),
        reward_model_name_or_path=str(tiny_models["reward"]),
        dataset_name=str(prompt_files["jsonl"]),
        output_dir=str(tmp_path / "run"),
    )
    return recipe


def ppo_refused(recipe: dict, tmp_path: Path, monkeypatch, capsys) -> tuple[str, Path]:
    """Writes `recipe` to bad.yaml and runs scripts/ppo.py on it; returns (error line, YAML path)."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return refused("ppo.py", ["--config", str(path)], monkeypatch, capsys, Path(recipe["output_dir"])), path


@pytest.mark.slow
def test_unknown_key_in_a_process_of_its_own(recipe_dict, tmp_path):
    recipe_dict["kl_coeff"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    result = run_python([str(PPO_SCRIPT), "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}: unknown key 'kl_coeff' (see README.md, 'Recipe fields')"
    assert not Path(recipe_dict["output_dir"]).exists()


def test_wrong_type(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["per_device_train_batch_size"] = "four"
    error, path = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert "key 'per_device_train_batch_size' has str value 'four', expected int" in error and str(path) in error


def test_out_of_range_number(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["max_prompt_length"] = 0
    error, path = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert error == f"error: max_prompt_length: 0 is out of range; it must be at least 1 token (recipe {path})"


def test_missing_data_file(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["dataset_name"] = str(tmp_path / "absent.jsonl")
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert error == f"error: dataset_name: data file not found: {tmp_path / 'absent.jsonl'}"


def test_prompt_file_cut_short(recipe_dict, tmp_path, monkeypatch, capsys):
    cut = tmp_path / "cut.jsonl"
    cut.write_text(PLAIN[:-12])
    recipe_dict["dataset_name"] = str(cut)
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert error.startswith(f"error: dataset_name: {cut}, line 12: not a JSON object (was the file cut short?)")


def test_missing_column(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["prompt_column"] = "text"
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert "'text' column (prompt_column)" in error and "columns: ['prompt']" in error


def test_nothing_left_after_length_filter(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["max_prompt_length"] = 1
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert "no train prompts left" in error and "max_prompt_length" in error


def test_quantization_without_bitsandbytes(recipe_dict, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    recipe_dict.update(reference="separate", ref_quantization="4bit")
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert error.startswith("error: ref_quantization: 4bit loading needs the bitsandbytes package")


def test_reward_model_with_two_labels(recipe_dict, two_label_reward_model, tmp_path, monkeypatch, capsys):
    recipe_dict["reward_model_name_or_path"] = str(two_label_reward_model)
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert f"reward_model_name_or_path: '{two_label_reward_model}' has 2 labels" in error


def test_policy_that_is_a_reward_model(recipe_dict, tiny_models, tmp_path, monkeypatch, capsys):
    """Loaded as a causal LM, a classifier gets a random LM head: the run would train on noise."""
    recipe_dict["model_name_or_path"] = str(tiny_models["reward"])
    error, _ = ppo_refused(recipe_dict, tmp_path, monkeypatch, capsys)
    assert error.startswith(f"error: model_name_or_path: '{tiny_models['reward']}' is a classifier")


def test_existing_output_dir_is_left_alone(recipe_dict, tmp_path, monkeypatch, capsys):
    output_dir = Path(recipe_dict["output_dir"])
    (output_dir / "value_model").mkdir(parents=True)
    files = {output_dir / "metrics.jsonl": '{"step": 1}\n', output_dir / "value_model" / "config.json": "{}"}
    for path, text in files.items():
        path.write_text(text)
    before = tree_digest(output_dir)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    error = refused("ppo.py", ["--config", str(path)], monkeypatch, capsys)
    assert error.startswith(f"error: output_dir: {output_dir} is not empty")
    assert "--overwrite_output_dir" in error
    assert tree_digest(output_dir) == before


# --- resuming from a damaged checkpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny PPO run of 2 updates with a checkpoint after the first: (output folder, the flags that ran it)."""
    prompts = write_prompt_files(tmp_path_factory.mktemp("data"), PROMPTS)["jsonl"]
    output_dir = tmp_path_factory.mktemp("runs") / "run"
    flags = tiny_recipe_flags(tiny_models, prompts, output_dir, "--save_steps", "1")
    run_ppo(parse_recipe(flags))
    assert checkpoint.latest(output_dir).name == "update-000001"
    return output_dir, flags


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path, list[str]]:
    """A copy of the finished run: (output folder, its checkpoint, flags that rerun it, which resumes)."""
    output_dir, flags = finished_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    flags = [str(copy) if flag == str(output_dir) else flag for flag in flags]
    return copy, checkpoint.latest(copy), flags


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "weights cut short": ("state/model.safetensors", cut, "has {now} bytes, {then} when written"),
    "optimizer deleted": ("state/optimizer.bin", Path.unlink, "is missing (deleted after the checkpoint was written)"),
    "random states cut short": ("state/random_states_0.pkl", cut, "has {now} bytes, {then} when written"),
    "state deleted": ("state", shutil.rmtree, "is missing"),
    "progress unreadable": ("progress.json", lambda path: path.write_text('{"update": '), "does not read"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_refused_naming_the_file(damage, run_copy):
    _, found, _ = run_copy
    name, change, message = DAMAGES[damage]
    then = (found / name).stat().st_size if (found / name).is_file() else 0
    change(found / name)
    now = (found / name).stat().st_size if (found / name).is_file() else 0
    with pytest.raises(RecipeError) as error:
        checkpoint.check_resumable(found, 1, ModelArguments(**{"use_peft": True, "lora_r": 8}))
    assert str(error.value).startswith(
        f"resume_from_checkpoint: {found / name} {message.format(now=now, then=then)}"
    ), str(error.value)
    assert str(error.value).endswith("start afresh with --overwrite_output_dir true (or a new output_dir)")


@pytest.mark.slow
def test_checkpoint_of_another_number_of_processes_is_refused(run_copy):
    _, found, _ = run_copy
    shutil.copy(found / "state" / "random_states_0.pkl", found / "state" / "random_states_1.pkl")
    with pytest.raises(RecipeError) as error:
        checkpoint.check_resumable(found, 1)
    assert str(error.value).startswith(
        f"resume_from_checkpoint: {found} was written by 2 processes and this run has 1: resume with 2 "
        "(accelerate launch --num_processes 2)"
    )


@pytest.mark.slow
def test_damaged_checkpoint_stops_the_resumed_run_before_it_writes(run_copy, monkeypatch, capsys):
    output_dir, found, flags = run_copy
    cut(found / "state" / "optimizer.bin")
    before = tree_digest(output_dir)
    error = refused("ppo.py", flags, monkeypatch, capsys)
    assert error.startswith(f"error: resume_from_checkpoint: {found / 'state' / 'optimizer.bin'} has ")
    assert tree_digest(output_dir) == before


@pytest.mark.slow
def test_resuming_with_another_lora_rank_is_refused_before_it_writes(run_copy, monkeypatch, capsys):
    output_dir, found, flags = run_copy
    before = tree_digest(output_dir)
    error = refused("ppo.py", [*flags, "--lora_r", "16"], monkeypatch, capsys)
    assert error == (
        f"error: resume_from_checkpoint: {found} was written with lora_r: 8 and this recipe has lora_r: 16, which "
        f"holds other weights: resume with the checkpoint's own recipe ({found / 'recipe.yaml'}), or start afresh "
        "in a new output_dir"
    )
    assert tree_digest(output_dir) == before


# ---------------------------------------------------------------------------------------------------------------
# scripts/evaluate.py


@pytest.fixture
def eval_flags(tiny_models, prompt_files, tmp_path) -> list[str]:
    """configs/tiny/eval.yaml on the tiny policy (as its own reference), reward model and prompts."""
    return ["--config", str(TINY / "eval.yaml"), "--policy_name_or_path", str(tiny_models["policy"]),
            "--reference_name_or_path", str(tiny_models["policy"]), "--reward_models", str(tiny_models["reward"]),
            "--dataset_name", str(prompt_files["jsonl"]), "--output_dir", str(tmp_path / "eval")]  # fmt: skip


def test_evaluating_a_folder_that_is_not_a_model_names_the_policy(eval_flags, tmp_path, monkeypatch, capsys):
    """The error once named reference_name_or_path, which the user had not set."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    error = refused("evaluate.py", [*eval_flags, "--policy_name_or_path", str(folder)], monkeypatch, capsys,
                    tmp_path / "eval")  # fmt: skip
    assert error.startswith(f"error: policy_name_or_path: '{folder}' is not a model folder")


def test_evaluating_a_missing_checkpoint_fails_before_the_first_is_evaluated(eval_flags, tiny_models, tmp_path,
                                                                             monkeypatch, capsys):  # fmt: skip
    missing = tmp_path / "run" / "checkpoints" / "update-000009"
    error = refused("evaluate.py", [*eval_flags, "--checkpoints", str(tiny_models["policy"]), str(missing)],
                    monkeypatch, capsys, tmp_path / "eval")  # fmt: skip
    assert error.startswith(f"error: checkpoints: model folder not found: {missing}")


def test_evaluating_with_a_causal_lm_as_reward_model(eval_flags, tiny_models, tmp_path, monkeypatch, capsys):
    error = refused("evaluate.py", [*eval_flags, "--reward_models", str(tiny_models["policy"])], monkeypatch, capsys,
                    tmp_path / "eval")  # fmt: skip
    assert error.startswith(f"error: reward_models: '{tiny_models['policy']}' is LlamaForCausalLM, not a reward model")


def test_evaluating_with_an_empty_perplexity_file(eval_flags, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "texts.jsonl"
    empty.write_text("")
    error = refused("evaluate.py", [*eval_flags, "--perplexity_texts", str(empty)], monkeypatch, capsys,
                    tmp_path / "eval")  # fmt: skip
    assert error == f"error: perplexity_texts: {empty} is empty"


# ---------------------------------------------------------------------------------------------------------------
# scripts/build_preferences.py, scripts/train_reward.py


@pytest.fixture
def reward_flags(tiny_models, tmp_path) -> list[str]:
    return ["--config", str(TINY / "reward.yaml"), "--policy_name_or_path", str(tiny_models["policy"]),
            "--model_name_or_path", str(tiny_models["policy"]), "--dataset_name", str(tmp_path / "pairs"),
            "--output_dir", str(tmp_path / "reward_model")]  # fmt: skip


def test_preference_builder_names_prompts_name_for_a_cut_prompt_file(reward_flags, tmp_path, monkeypatch, capsys):
    """The prompts are read through the prompt loader, whose errors once named its own field, dataset_name."""
    cut_file = tmp_path / "prompts.jsonl"
    cut_file.write_text(PLAIN[:-12])
    error = refused("build_preferences.py", [*reward_flags, "--prompts_name", str(cut_file)], monkeypatch, capsys,
                    tmp_path / "pairs")  # fmt: skip
    assert error.startswith(f"error: prompts_name: {cut_file}, line 12: not a JSON object")


def test_reward_training_names_an_empty_centring_reference(reward_flags, tmp_path, monkeypatch, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pair = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}  # fmt: skip
    for name in ("train.jsonl", "test.jsonl"):
        (pairs / name).write_text(jsonl([pair] * 4))
    empty = tmp_path / "reference.jsonl"
    empty.write_text("\n")
    error = refused("train_reward.py", [*reward_flags, "--center_rewards_reference", str(empty)], monkeypatch, capsys,
                    tmp_path / "reward_model")  # fmt: skip
    assert error == f"error: center_rewards_reference: {empty} is empty"


# ---------------------------------------------------------------------------------------------------------------
# The methods beside PPO (scripts/{sft,dpo,rloo,grpo,raft}.py share the loaders and checks above)


def test_sft_example_with_a_wrong_role(tiny_models, tmp_path, monkeypatch, capsys):
    examples = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Nice."}]} for p in PROMPTS]
    rows[6]["messages"][1]["role"] = "bot"
    examples.write_text(jsonl(rows))
    flags = ["--config", str(TINY / "sft.yaml"), "--model_name_or_path", str(tiny_models["policy"]),
             "--dataset_name", str(examples), "--messages_column", "messages", "--dataset_test_split", "none",
             "--output_dir", str(tmp_path / "sft")]  # fmt: skip
    error = refused("sft.py", flags, monkeypatch, capsys, tmp_path / "sft")
    assert error.startswith(f"error: dataset_name: {examples}, row 7, column 'messages': message 2 has role 'bot'")
