"""W&B: the wandb client decides whether W&B can be reached (recipes.tracking.start_wandb_run), and a run never fails
or hangs for lack of it. Without an API key the run logs offline by itself, and the offline run file holds the same
per-update metrics as metrics.jsonl and the recipe as its config; with a key the client is asked, through the proxy
the environment names, and the run logs offline once the client gives up; WANDB_MODE is passed through untouched.
Run files are read with `tests/wandb_records.py`. Nothing leaves 127.0.0.1: the proxy is a RecordingProxy
(tests/local_servers.py) that forwards nothing, and the W&B server's name (api.wandb.invalid) exists nowhere.
"""

import os
import subprocess
import sys
import time

import pytest
from conftest import read_metrics, tiny_recipe_flags
from local_servers import RecordingProxy
from wandb_records import history_rows, read_wandb_records, run_config

from recipes import REPO_ROOT, parse_recipe, run_ppo

# Starts a W&B run as the kit's entry points do, logs one value, and says which mode the run ended up in.
START_RUN = """
import wandb
from recipes.tracking import finish_wandb_run, start_wandb_run
start_wandb_run("ppo-recipes-tests", "proxy-check", None, {"seed": 1})
wandb.log({"x": 1.0})
print("mode:", wandb.run.settings.mode)
finish_wandb_run()
"""


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


def start_run_through_proxy(tmp_path, **settings: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """Runs START_RUN with every HTTP(S) request sent to a RecordingProxy, a W&B server at api.wandb.invalid, an init
    timeout of 5 s and no `wandb login` (HOME is empty); `settings` add to the environment. Returns the process, the
    request lines the proxy got and the seconds it took."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and not k.lower().endswith("_proxy")}
    with RecordingProxy() as proxy:
        env.update(
            HOME=str(home), WANDB_DIR=str(tmp_path), HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url, NO_PROXY="",
            WANDB_BASE_URL="https://api.wandb.invalid", WANDB_INIT_TIMEOUT="5", WANDB_ERROR_REPORTING="false",
            **settings,
        )  # fmt: skip
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", START_RUN], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        return result, proxy.request_lines, time.monotonic() - started


@pytest.mark.slow
def test_with_an_api_key_the_wandb_client_is_asked_through_the_proxy(tmp_path):
    """The kit does not decide W&B is unreachable by itself (it once opened a socket to the server, which ignores
    proxies): the wandb client goes through HTTPS_PROXY, and when it gives up the run logs offline."""
    result, requests, seconds = start_run_through_proxy(tmp_path, WANDB_API_KEY="k" * 40)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CONNECT api.wandb.invalid:443 HTTP/1.1" in requests
    assert "W&B: logging offline (the wandb client could not start an online run: " in result.stdout
    assert "mode: offline" in result.stdout.splitlines()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert [row["x"] for row in history_rows(read_wandb_records(run_file)) if "x" in row] == [1.0]
    # Bounded by the client's init timeout (5 s) and its grace period (10 s), plus starting Python and wandb.
    assert seconds < 120


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, None),
        ({}, "W&B: logging offline (no W&B API key (WANDB_API_KEY or `wandb login`))"),
    ],
    ids=["WANDB_MODE wins", "no API key"],
)
def test_offline_without_asking_the_server(tmp_path, settings, message):
    result, requests, _ = start_run_through_proxy(tmp_path, **settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert requests == []
    assert "mode: offline" in result.stdout.splitlines()
    assert (message in result.stdout) if message else ("W&B: logging offline" not in result.stdout)
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
