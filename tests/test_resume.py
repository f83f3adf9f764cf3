"""Runs that survive: a killed run resumes and ends as if nothing had happened; SIGTERM checkpoints and exits 0;
cut-short checkpoints are skipped; non-finite updates are skipped, counted, and stop the run when they repeat."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.ppo.checkpoint import CHECKPOINTS_DIR, PROGRESS_FILE, complete_checkpoints
from tests.conftest import PPO_SCRIPT, REPO_ROOT, read_metrics, run_python, tiny_recipe_flags

pytestmark = pytest.mark.slow

UPDATES = 4
# 4 episodes per update × 4 updates; a checkpoint after every update.
RUN_FLAGS = ("--total_episodes", str(4 * UPDATES), "--save_steps", "1", "--save_total_limit", "3")
TIME_DEPENDENT = {"eps"}
MACHINE_DEPENDENT_PREFIXES = ("time/", "memory/")  # phase seconds, peak RSS


def _flags(tiny_models, prompt_files, output_dir, *extra):
    return tiny_recipe_flags(tiny_models, prompt_files["jsonl"], output_dir, *RUN_FLAGS, *extra)


def _start(flags) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PPO_SCRIPT), *flags],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) first:\n{process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(output_dir / "adapter_model.safetensors")
    value = load_file(output_dir / "value_model" / "model.safetensors")
    return {**{f"policy.{k}": v for k, v in weights.items()}, **{f"value.{k}": v for k, v in value.items()}}


def _comparable(metrics: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k not in TIME_DEPENDENT and not k.startswith(MACHINE_DEPENDENT_PREFIXES)}
        for row in metrics
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    from tests.conftest import write_prompt_files, PROMPTS

    prompt_files = write_prompt_files(tmp_path_factory.mktemp("data"), PROMPTS)
    output_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = run_python([str(PPO_SCRIPT), *_flags(tiny_models, prompt_files, output_dir)], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return prompt_files, output_dir


def test_killed_run_resumes_to_the_same_weights_and_metrics(tiny_models, uninterrupted, tmp_path):
    prompt_files, reference_dir = uninterrupted
    output_dir = tmp_path / "killed"
    flags = _flags(tiny_models, prompt_files, output_dir)
    process = _start(flags)
    _wait_for(lambda: (output_dir / CHECKPOINTS_DIR / "update-000002" / PROGRESS_FILE).is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "adapter_model.safetensors").exists(), "the run finished before it was killed"

    resumed = run_python([str(PPO_SCRIPT), *flags], cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after update" in resumed.stdout + resumed.stderr

    expected, actual = _final_weights(reference_dir), _final_weights(output_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics] == list(range(1, UPDATES + 1))
    for ours, theirs in zip(_comparable(metrics), _comparable(read_metrics(reference_dir / "metrics.jsonl"))):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (ours["step"], key)


def test_sigterm_checkpoints_exits_zero_and_resumes(tiny_models, uninterrupted, tmp_path):
    prompt_files, _ = uninterrupted
    output_dir = tmp_path / "preempted"
    # No periodic checkpoints: the only one is the one SIGTERM asks for.
    flags = _flags(tiny_models, prompt_files, output_dir, "--save_strategy", "no")
    process = _start(flags)
    metrics_file = output_dir / "metrics.jsonl"
    _wait_for(lambda: metrics_file.is_file() and metrics_file.read_text().count("\n") >= 1, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    checkpoints = complete_checkpoints(output_dir)
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / PROGRESS_FILE).read_text())["update"]
    assert 1 <= stopped_at < UPDATES
    assert not (output_dir / "adapter_model.safetensors").exists()

    resumed = run_python([str(PPO_SCRIPT), *flags], cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after update {stopped_at}" in resumed.stdout + resumed.stderr
    assert [row["step"] for row in read_metrics(metrics_file)] == list(range(1, UPDATES + 1))


def test_checkpoint_cut_short_is_skipped_for_the_previous_one(uninterrupted, tmp_path):
    _, reference_dir = uninterrupted
    checkpoints = complete_checkpoints(reference_dir)
    assert [p.name for p in checkpoints] == ["update-000001", "update-000002", "update-000003"]
    # A kill while writing leaves the staging folder, or a folder without its progress file (written last).
    copy = tmp_path / "run"
    for checkpoint in checkpoints[:2]:
        shutil.copytree(checkpoint, copy / CHECKPOINTS_DIR / checkpoint.name)
    (copy / CHECKPOINTS_DIR / "update-000002" / PROGRESS_FILE).unlink()
    (copy / CHECKPOINTS_DIR / ".partial-update-000003").mkdir()
    assert [p.name for p in complete_checkpoints(copy)] == ["update-000001"]


def test_nonfinite_reward_updates_stop_the_run_cleanly(tiny_models, prompt_files, tmp_path):
    """A reward model whose score head is NaN: every update is skipped and counted, and after
    max_nonfinite_updates in a row the run stops with one clear line and writes no weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    broken = tmp_path / "nan_reward"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_models["reward"]).save_pretrained(broken)
    output_dir = tmp_path / "out"
    flags = tiny_recipe_flags(
        tiny_models, prompt_files["jsonl"], output_dir,
        "--reward_model_name_or_path", str(broken), "--value_model_init", "policy",
        "--total_episodes", "16", "--max_nonfinite_updates", "2", "--save_steps", "1",
    )  # fmt: skip
    result = run_python([str(PPO_SCRIPT), *flags], cwd=REPO_ROOT)
    assert result.returncode == 1
    last_line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith("error:") and "2 updates in a row" in last_line
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert [row["nonfinite/skipped_updates"] for row in metrics] == [1, 2]
    assert complete_checkpoints(output_dir) == []
    assert not (output_dir / "adapter_model.safetensors").exists()


def test_evaluation_reads_a_runs_checkpoints(tiny_models, uninterrupted, tmp_path):
    """scripts/evaluate.py --checkpoints on a run's own checkpoints/update-N folders and its final output: one row
    per policy in sweep.jsonl, and the reward-vs-KL plot within the run."""
    _, run_dir = uninterrupted
    policies = [str(path) for path in complete_checkpoints(run_dir)] + [str(run_dir)]
    output_dir = tmp_path / "sweep"
    result = run_python(
        ["scripts/evaluate.py", "--config", "configs/tiny/eval.yaml", "--checkpoints", *policies,
         "--reward_models", str(tiny_models["reward"]), "--reward_functions", "length", "--output_dir", str(output_dir)],
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (output_dir / "sweep.jsonl").read_text().splitlines()]
    assert [row["policy"] for row in rows] == policies
    assert all(row["num_prompts"] > 0 and "kl/k1/mean" in row and "reward/length/mean" in row for row in rows)
    assert all("reward/reward/mean" in row for row in rows)  # the reward model, named after its folder
    # The policies differ (each checkpoint is a later update), so their KL to the reference does too.
    assert len({round(row["kl/k1/mean"], 6) for row in rows}) > 1
    assert (output_dir / "reward_vs_kl.png").stat().st_size > 0
