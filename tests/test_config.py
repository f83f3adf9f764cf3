"""The recipe parser (YAML defaults, command-line overrides, strict keys and types) and the batch arithmetic."""


import pytest
import yaml
from conftest import TINY_RECIPE, all_fields

from recipes import PPOArguments, RecipeError, parse_recipe, plan_batches


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)




def test_tiny_recipe_parses_into_the_three_dataclasses():
    recipe = parse_recipe(["--config", str(TINY_RECIPE)])
    assert recipe.source == str(TINY_RECIPE)
    assert recipe.model.use_peft is True
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.data.prompt_as_user_message is True
    assert recipe.training.total_episodes == 8
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.training.stop_token == "eos"


def test_yaml_scientific_floats_are_floats(tmp_path):
    text = "learning_rate: 1e-5\nkl_coef: 5e-2\nlora_dropout: 1E-1\ncliprange: 2.0e-1\n"
    # YAML 1.1 (PyYAML) reads `1e-5` as a string; the kit converts it for float fields.
    assert yaml.safe_load(text)["learning_rate"] == "1e-5"
    recipe = parse_recipe(["--config", write_yaml(tmp_path / "r.yaml", text)])
    assert recipe.training.learning_rate == 1e-5 and isinstance(recipe.training.learning_rate, float)
    assert recipe.training.kl_coef == 5e-2
    assert recipe.model.lora_dropout == 0.1
    assert recipe.training.cliprange == 0.2


def test_command_line_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "learning_rate: 1e-4\ntotal_episodes: 8\nlora_r: 8\nuse_peft: true\n")
    recipe = parse_recipe(["--config", path, "--learning_rate", "3e-4", "--lora_r", "4", "--use_peft", "false"])
    assert recipe.training.learning_rate == 3e-4
    assert recipe.model.lora_r == 4
    assert recipe.model.use_peft is False
    assert recipe.training.total_episodes == 8  # not overridden: the YAML value stays


def test_default_config_is_used_without_config_flag(tmp_path):
    path = write_yaml(tmp_path / "default.yaml", "total_episodes: 12\n")
    recipe = parse_recipe(["--num_ppo_epochs", "2"], default_config=path)
    assert recipe.source == path
    assert recipe.training.total_episodes == 12
    assert recipe.training.num_ppo_epochs == 2


def test_unknown_yaml_key_is_refused_naming_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "learning_rate: 1e-4\nlearnig_rate: 1e-5\n")
    with pytest.raises(RecipeError, match=r"unknown key 'learnig_rate'") as error:
        parse_recipe(["--config", path])
    assert path in str(error.value)


def test_unknown_command_line_flag_is_refused():
    with pytest.raises(RecipeError, match="--no_such_flag"):
        parse_recipe(["--config", str(TINY_RECIPE), "--no_such_flag", "1"])


@pytest.mark.parametrize(
    "line, key",
    [
        ("per_device_train_batch_size: four", "per_device_train_batch_size"),
        ("num_ppo_epochs: 1.5", "num_ppo_epochs"),
        ("num_ppo_epochs: true", "num_ppo_epochs"),  # a bool is not an int here
        ("use_peft: 'yes'", "use_peft"),
        ("learning_rate: fast", "learning_rate"),
        ("lora_target_modules: q_proj", "lora_target_modules"),
        ("reference: shared", "reference"),
        ("ref_quantization: 3bit", "ref_quantization"),
    ],
)
def test_wrong_type_is_refused_naming_key_and_file(tmp_path, line, key):
    path = write_yaml(tmp_path / "r.yaml", line + "\n")
    with pytest.raises(RecipeError, match=rf"key '{key}' has") as error:
        parse_recipe(["--config", path])
    assert path in str(error.value)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "- learning_rate\n- 1e-5\n")
    with pytest.raises(RecipeError, match="mapping"):
        parse_recipe(["--config", path])


def test_missing_recipe_file_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        parse_recipe(["--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("key, replacement", [("sft_model_path", "model_name_or_path"),
                                              ("reward_model_path", "reward_model_name_or_path")])  # fmt: skip
def test_replaced_trl_keys_are_refused_in_yaml_and_on_the_command_line(tmp_path, key, replacement):
    path = write_yaml(tmp_path / "r.yaml", f"{key}: some/model\n")
    with pytest.raises(RecipeError, match=rf"'{key}' is not read by this kit: use '{replacement}'"):
        parse_recipe(["--config", path])
    with pytest.raises(RecipeError, match=rf"--{key} is not read by this kit: use --{replacement}"):
        parse_recipe(["--config", str(TINY_RECIPE), f"--{key}", "some/model"])


def test_streaming_datasets_are_refused(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "dataset_streaming: true\n")
    with pytest.raises(RecipeError, match="dataset_streaming"):
        parse_recipe(["--config", path])


def test_saved_recipe_reparses_to_the_same_run(tmp_path):
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--pad_token", "<|endoftext|>", "--kl_coef", "0.1"])
    saved = tmp_path / "recipe.yaml"
    recipe.save_yaml(saved)
    again = parse_recipe(["--config", str(saved)])
    assert again.to_dict() == recipe.to_dict()
    # Not only the saved keys: every field of the run, including `*_token` settings such as stop_token.
    assert all_fields(again) == all_fields(recipe)
    assert again.training.stop_token == "eos"
    assert again.model.pad_token == "<|endoftext|>"


def test_saved_recipe_leaves_out_the_hub_token(tmp_path):
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--hub_token", "hf_secret_value"])
    saved = tmp_path / "recipe.yaml"
    recipe.save_yaml(saved)
    assert "hf_secret_value" not in saved.read_text()
    assert "hub_token" not in recipe.to_dict()


def ppo_arguments(tmp_path, **overrides) -> PPOArguments:
    settings = dict(output_dir=str(tmp_path / "out"), report_to="none")
    settings.update(overrides)
    return PPOArguments(**settings)


def test_batch_plan_arithmetic(tmp_path):
    training = ppo_arguments(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=2, total_episodes=50
    )
    plan = plan_batches(training, processes=3, train_prompts=100)
    assert plan.local_episodes == 8  # 4 × 2 on each process
    assert plan.episodes_per_update == 24  # × 3 processes
    assert plan.mini_batch_episodes == 12
    assert plan.updates == 3  # ceil(50 / 24)
    assert plan.describe() == (
        "4 per-device episodes × 2 grad-accumulation × 3 processes = 24 episodes per update; "
        "2 mini-batches of 12 episodes; 50 episodes → 3 updates"
    )


def test_batch_plan_without_total_episodes_uses_epochs_times_prompts(tmp_path):
    training = ppo_arguments(tmp_path, per_device_train_batch_size=4, num_mini_batches=1, num_train_epochs=2.5)
    assert training.total_episodes is None
    plan = plan_batches(training, processes=1, train_prompts=10)
    assert plan.total_episodes == 25
    assert plan.updates == 7  # ceil(25 / 4)


@pytest.mark.parametrize(
    "overrides, processes, prompts, message",
    [
        (dict(per_device_train_batch_size=4, num_mini_batches=3, total_episodes=8), 1, 100, "num_mini_batches=3"),
        (dict(per_device_train_batch_size=8, num_mini_batches=2, total_episodes=8, whiten_rewards=True), 1, 100,
         "whiten_rewards"),
        (dict(per_device_train_batch_size=4, num_mini_batches=1, num_train_epochs=0), 1, 100,
         "total_episodes .* at least 1"),
        (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1, total_episodes=8), 2,
         7, "only 7 training prompts, fewer than the 8 episodes"),
    ],
)  # fmt: skip
def test_batch_plan_errors(tmp_path, overrides, processes, prompts, message):
    with pytest.raises(RecipeError, match=message):
        plan_batches(ppo_arguments(tmp_path, **overrides), processes=processes, train_prompts=prompts)


def test_whiten_rewards_accepts_eight_episodes_per_mini_batch(tmp_path):
    training = ppo_arguments(
        tmp_path, per_device_train_batch_size=16, num_mini_batches=2, total_episodes=16, whiten_rewards=True
    )
    assert plan_batches(training, processes=1, train_prompts=16).mini_batch_episodes == 8
