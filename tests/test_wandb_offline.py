"""W&B without an API key: the run switches to offline logging by itself, and the offline run file holds the same
per-update metrics as metrics.jsonl and the recipe as its config.
The run file is read with `tests/wandb_records.py`.
"""


import pytest
from conftest import read_metrics, tiny_recipe_flags
from wandb_records import history_rows, read_wandb_records, run_config

from recipes import parse_recipe, run_ppo


@pytest.mark.slow
def test_wandb_logs_offline_without_an_api_key(tiny_models, prompt_files, tmp_path, monkeypatch, capsys):
    # No key, no mode: the kit must choose offline itself. HOME points away from any `wandb login` netrc of the
    # machine; WANDB_MODE is set then removed so that monkeypatch also removes what the kit sets.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "placeholder")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    (tmp_path / "home").mkdir()

    output_dir = tmp_path / "run"
    recipe = parse_recipe(
        tiny_recipe_flags(
            tiny_models, prompt_files["jsonl"], output_dir,
            "--total_episodes", "8", "--report_to", "wandb", "--wandb_project", "ppo-recipes-tests",
            "--run_name", "offline-check",
        )
    )  # fmt: skip
    resolved = recipe.to_dict()
    run_ppo(recipe)

    assert "W&B: logging offline (no W&B API key" in capsys.readouterr().out
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == 2

    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    records = read_wandb_records(run_files[0])

    # The trainer's W&B callback logs each update under `train/<TRL name>`.
    rows = [row for row in history_rows(records) if "train/objective/scores" in row]
    assert len(rows) == len(metrics)
    for row, line in zip(rows, metrics):
        for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "episode"):
            assert row[f"train/{name}"] == pytest.approx(line[name], rel=1e-9, abs=1e-12), name

    started_with = run_config(records, with_updates=False)
    assert started_with["model_name_or_path"] == str(tiny_models["policy"])
    assert started_with["reward_model_name_or_path"] == str(tiny_models["reward"])
    assert {key: started_with.get(key) for key in resolved} == resolved
    # The final config keeps every recipe key; transformers' callback re-logs its own arguments, with the values
    # of `*_token` fields masked (stop_token: "<STOP_TOKEN>"), and the rest unchanged.
    final = run_config(records, with_updates=True)
    assert {key: final[key] for key in resolved if not key.endswith("_token")} == {
        key: value for key, value in resolved.items() if not key.endswith("_token")
    }

    run = next(record.run for record in records if record.WhichOneof("record_type") == "run")
    assert run.project == "ppo-recipes-tests"
    assert run.display_name == "offline-check"
