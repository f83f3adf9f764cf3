"""The recipe parser (YAML defaults, command-line overrides, strict keys and types, value ranges, TrainingArguments
fields the kit does not read) and the batch arithmetic of recipes.ppo.config."""

import pytest
import yaml
from conftest import TINY_RECIPE, all_fields

from recipes import PPOConfig, RecipeError, parse_recipe, plan_batches
from recipes.config import resolved_config, save_resolved_config


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


def test_hub_token_is_refused_by_the_ppo_recipe():
    # The PPO engine never pushes to the hub, so it has no use for the token.
    with pytest.raises(RecipeError, match="'hub_token' is a transformers TrainingArguments field that the kit"):
        parse_recipe(["--config", str(TINY_RECIPE), "--hub_token", "hf_secret_value"])


def test_resolved_config_leaves_out_the_hub_token(tmp_path):
    """Other scripts' arguments (reward-model training's TrainingArguments) may carry the token: a saved config
    never does, while the other settings are kept."""
    parts = (ppo_config(tmp_path, hub_token="hf_secret_value", kl_coef=0.1),)
    resolved = resolved_config(parts)
    assert "hub_token" not in resolved
    assert resolved["kl_coef"] == 0.1
    saved = tmp_path / "recipe.yaml"
    save_resolved_config(parts, None, saved)
    assert "hf_secret_value" not in saved.read_text() and "kl_coef: 0.1" in saved.read_text()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("gamma", "1.5", "gamma: 1.5 is out of range; it must be between 0 and 1"),
        ("lam", "-0.1", "lam: -0.1 is out of range"),
        ("per_device_train_batch_size", "0", "per_device_train_batch_size: 0 is out of range; it must be at least 1"),
        ("num_mini_batches", "0", "num_mini_batches: 0 is out of range"),
        ("temperature", "0", "temperature: 0.0 is out of range; it must be above 0"),
        ("kl_coef", "nan", "kl_coef: nan is out of range"),
        ("response_length", "0", "response_length: 0 is out of range"),
        ("save_total_limit", "0", "save_total_limit: 0 is out of range"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(flag, value, message):
    with pytest.raises(RecipeError, match=f"^{message}"):
        parse_recipe(["--config", str(TINY_RECIPE), f"--{flag}", value])


def test_out_of_range_yaml_value_names_the_field_and_file(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "cliprange: 0\n")
    with pytest.raises(RecipeError, match="^cliprange: 0 is out of range; it must be above 0") as error:
        parse_recipe(["--config", path])
    assert path in str(error.value)


def test_boundary_values_are_accepted():
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--gamma", "1", "--lam", "0", "--kl_coef", "0",
                           "--max_grad_norm", "0", "--save_total_limit", "1"])  # fmt: skip
    training = recipe.training
    assert (training.gamma, training.lam, training.kl_coef, training.max_grad_norm) == (1.0, 0.0, 0.0, 0.0)
    assert training.save_total_limit == 1


@pytest.mark.parametrize(
    "flag, value, instead",
    [
        ("eval_strategy", "steps", ": use eval_every_updates"),
        ("max_steps", "3", ": use total_episodes"),
        ("label_smoothing_factor", "0.1", ""),
    ],
)
def test_training_arguments_fields_the_kit_does_not_read_are_refused(tmp_path, flag, value, instead):
    expected = rf"'{flag}' is a transformers TrainingArguments field that the kit does not read{instead}"
    with pytest.raises(RecipeError, match=rf"^{expected} \(recipe {TINY_RECIPE}\)$"):
        parse_recipe(["--config", str(TINY_RECIPE), f"--{flag}", value])
    path = write_yaml(tmp_path / "r.yaml", f"{flag}: {value}\n")
    with pytest.raises(RecipeError, match=expected) as error:
        parse_recipe(["--config", path])
    assert f"(recipe {path})" in str(error.value)


def test_training_arguments_fields_the_kit_reads_are_accepted():
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--warmup_steps", "2", "--weight_decay", "0.01",
                           "--lr_scheduler_type", "cosine", "--adam_beta2", "0.99"])  # fmt: skip
    assert recipe.training.warmup_steps == 2
    assert recipe.training.weight_decay == 0.01
    assert recipe.training.lr_scheduler_type == "cosine"
    assert recipe.training.adam_beta2 == 0.99


def ppo_config(tmp_path, **overrides) -> PPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), report_to="none")
    settings.update(overrides)
    return PPOConfig(**settings)


def test_ppo_config_checks_ranges_when_built_directly(tmp_path):
    with pytest.raises(RecipeError, match="^num_ppo_epochs: 0 is out of range"):
        ppo_config(tmp_path, num_ppo_epochs=0)


def test_batch_plan_arithmetic(tmp_path):
    training = ppo_config(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=3,
        total_episodes=50,
    )  # fmt: skip
    plan = plan_batches(training, processes=3, train_prompts=100)
    assert plan.local_episodes == 8  # 4 × 2 on each process
    assert plan.episodes_per_update == 24  # × 3 processes
    assert plan.local_mini_batch == 4  # 8 / 2 mini-batches, on each process
    assert plan.micro_batches_per_step == 1  # a mini-batch of 4 is one micro-batch of 4
    assert plan.optimizer_steps_per_update == 6  # 3 epochs × 2 mini-batches
    assert plan.updates == 3  # ceil(50 / 24)
    assert plan.describe() == (
        "4 per device × 2 accumulation × 3 processes = 24 episodes per update; 2 mini-batches of 12 episodes "
        "(1 micro-batch of 4 per process); 3 PPO epochs → 6 optimizer steps per update; 50 episodes → 3 updates"
    )


@pytest.mark.parametrize(
    "per_device, accumulation, mini_batches, local_mini_batch, micro_batches",
    [
        (2, 4, 1, 8, 4),  # a mini-batch of 8 in micro-batches of 2
        (2, 4, 2, 4, 2),
        (4, 3, 2, 6, 2),  # 6 episodes: one micro-batch of 4, one of 2
        (4, 1, 2, 2, 1),  # the micro-batch is capped by the mini-batch
        (1, 1, 1, 1, 1),
    ],
)
def test_micro_batches_per_optimizer_step(tmp_path, per_device, accumulation, mini_batches, local_mini_batch,
                                          micro_batches):  # fmt: skip
    training = ppo_config(tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                          num_mini_batches=mini_batches, total_episodes=100)  # fmt: skip
    plan = plan_batches(training, processes=1, train_prompts=100)
    assert plan.local_mini_batch == local_mini_batch
    assert plan.micro_batches_per_step == micro_batches
    # The micro-batches of a step cover its mini-batch, none of them empty.
    assert (micro_batches - 1) * per_device < local_mini_batch <= micro_batches * per_device


def test_describe_names_the_micro_batch_of_a_mini_batch_smaller_than_per_device(tmp_path):
    training = ppo_config(tmp_path, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1,
                          total_episodes=8)  # fmt: skip
    plan = plan_batches(training, processes=1, train_prompts=10)
    assert "2 mini-batches of 2 episodes (1 micro-batch of 2 per process)" in plan.describe()
    assert "1 PPO epochs → 2 optimizer steps per update; 8 episodes → 2 updates" in plan.describe()


def test_tiny_recipe_batch_plan_matches_its_comment():
    """configs/tiny/ppo.yaml says: 4 per device × 1 accumulation × 1 process = 4 episodes per update; 2 mini-batches
    of 2; 8 episodes → 2 updates."""
    recipe = parse_recipe(["--config", str(TINY_RECIPE)])
    plan = plan_batches(recipe.training, processes=1, train_prompts=64)
    assert (plan.episodes_per_update, plan.num_mini_batches, plan.local_mini_batch, plan.updates) == (4, 2, 2, 2)
    assert "4 per device × 1 accumulation × 1 processes = 4 episodes per update" in plan.describe()


def test_batch_plan_without_total_episodes_uses_epochs_times_prompts(tmp_path):
    training = ppo_config(tmp_path, per_device_train_batch_size=4, num_mini_batches=1, num_train_epochs=2.5)
    assert training.total_episodes is None
    plan = plan_batches(training, processes=1, train_prompts=10)
    assert plan.total_episodes == 25
    assert plan.updates == 7  # ceil(25 / 4)


@pytest.mark.parametrize(
    "overrides, processes, prompts, message",
    [
        (dict(per_device_train_batch_size=4, num_mini_batches=3, total_episodes=8), 1, 100,
         r"num_mini_batches=3 must divide per_device_train_batch_size × gradient_accumulation_steps = 4"),
        (dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, num_mini_batches=4, total_episodes=8), 1,
         100, "num_mini_batches=4 must divide .* = 6"),
        (dict(per_device_train_batch_size=8, num_mini_batches=2, total_episodes=8, whiten_rewards=True), 1, 100,
         "whiten_rewards needs at least 8 episodes per mini-batch"),
        (dict(per_device_train_batch_size=4, num_mini_batches=1, num_train_epochs=0), 1, 100,
         "total_episodes .* at least 1"),
        (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1, total_episodes=8), 2,
         15, "only 15 training prompts, fewer than the 16 episodes"),
    ],
)  # fmt: skip
def test_batch_plan_errors(tmp_path, overrides, processes, prompts, message):
    with pytest.raises(RecipeError, match=message):
        plan_batches(ppo_config(tmp_path, **overrides), processes=processes, train_prompts=prompts)


def test_whiten_rewards_accepts_eight_episodes_per_mini_batch(tmp_path):
    training = ppo_config(
        tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, num_mini_batches=2, total_episodes=16,
        whiten_rewards=True,
    )  # fmt: skip
    assert plan_batches(training, processes=1, train_prompts=16).local_mini_batch == 8
