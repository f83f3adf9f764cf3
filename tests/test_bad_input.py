"""Bad input through the script a user runs: exit code 1, one `error:` line naming the key, file or column, no
traceback, and no output folder left behind (an existing one is left as it was)."""

from pathlib import Path

import pytest
import yaml
from conftest import PPO_SCRIPT, TINY_RECIPE, run_python

# Runs scripts/ppo.py with bitsandbytes unimportable, as if it were not installed (its code is never called).
WITHOUT_BITSANDBYTES = (
    "import runpy, sys; sys.modules['bitsandbytes'] = None; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(script, run_name='__main__')"
)


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


def run_recipe(recipe: dict, tmp_path: Path, python_args: tuple[str, ...] = ()) -> tuple[str, Path]:
    """Writes `recipe` to bad.yaml, runs the script on it, checks the refusal; returns (error line, YAML path)."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_python([*python_args, str(PPO_SCRIPT), "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last_line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith("error: "), result.stderr
    return last_line, path


def no_output(recipe: dict) -> bool:
    return not Path(recipe["output_dir"]).exists()


@pytest.mark.slow
def test_unknown_key(recipe_dict, tmp_path):
    recipe_dict["kl_coeff"] = 0.1
    error, path = run_recipe(recipe_dict, tmp_path)
    assert "unknown key 'kl_coeff'" in error and str(path) in error
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_wrong_type(recipe_dict, tmp_path):
    recipe_dict["per_device_train_batch_size"] = "four"
    error, path = run_recipe(recipe_dict, tmp_path)
    assert "key 'per_device_train_batch_size' has str value 'four', expected int" in error and str(path) in error
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_missing_data_file(recipe_dict, tmp_path):
    recipe_dict["dataset_name"] = str(tmp_path / "absent.jsonl")
    error, _ = run_recipe(recipe_dict, tmp_path)
    assert error == f"error: dataset_name: data file not found: {tmp_path / 'absent.jsonl'}"
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_missing_column(recipe_dict, tmp_path):
    recipe_dict["prompt_column"] = "text"
    error, _ = run_recipe(recipe_dict, tmp_path)
    assert "'text' column (prompt_column)" in error and "columns: ['prompt']" in error
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_nothing_left_after_length_filter(recipe_dict, tmp_path):
    recipe_dict["max_prompt_length"] = 1
    error, _ = run_recipe(recipe_dict, tmp_path)
    assert "no train prompts left" in error and "max_prompt_length" in error
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_quantization_without_bitsandbytes(recipe_dict, tmp_path):
    recipe_dict.update(reference="separate", ref_quantization="4bit")
    error, _ = run_recipe(recipe_dict, tmp_path, python_args=("-c", WITHOUT_BITSANDBYTES))
    assert error.startswith("error: ref_quantization: 4bit loading needs the bitsandbytes package")
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_reward_model_with_two_labels(recipe_dict, two_label_reward_model, tmp_path):
    recipe_dict["reward_model_name_or_path"] = str(two_label_reward_model)
    error, _ = run_recipe(recipe_dict, tmp_path)
    assert f"reward_model_name_or_path: '{two_label_reward_model}' has 2 labels" in error
    assert no_output(recipe_dict)


@pytest.mark.slow
def test_existing_output_dir_is_left_alone(recipe_dict, tmp_path):
    output_dir = Path(recipe_dict["output_dir"])
    (output_dir / "value_model").mkdir(parents=True)
    files = {output_dir / "metrics.jsonl": '{"step": 1}\n', output_dir / "value_model" / "config.json": "{}"}
    for path, text in files.items():
        path.write_text(text)
    before = sorted(output_dir.rglob("*"))
    error, _ = run_recipe(recipe_dict, tmp_path)
    assert error.startswith(f"error: output_dir: {output_dir} is not empty")
    assert "--overwrite_output_dir" in error
    assert sorted(output_dir.rglob("*")) == before
    assert all(path.read_text() == text for path, text in files.items())
