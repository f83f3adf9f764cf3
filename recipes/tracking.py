"""Where a run's figures go: `metrics.jsonl` in the output folder and W&B (online, or offline by itself), plus the
per-phase time and peak memory of each update.

In W&B the per-update metrics are named as TRL's trainers name them (`train/objective/kl`, ... against
`train/global_step`), so dashboards made for TRL's PPO runs read the kit's; the held-out evaluation is `eval/*`.
"""

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

GIB = 2**30


class MetricsLog:
    """Appends each update's metrics to `metrics.jsonl` (one JSON object per line, `step` = the update) and, when a
    W&B run is active, logs them there. Main process only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, update: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"step": update, **metrics}) + "\n")
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            named = {key if key.startswith("eval/") else f"train/{key}": value for key, value in metrics.items()}
            wandb.log({**named, "train/global_step": update}, step=update)


def log_sample_table(update: int, prompts: list[str], completions: list[str], scores: list[float]) -> None:
    """Prints a few sampled completions with their scores, and logs them all to W&B as the table `completions`."""
    print(f"samples after update {update - 1}:")
    for prompt, completion, score in list(zip(prompts, completions, scores))[:4]:
        print(f"  [{score:+.3f}] {prompt[:60]!r} → {completion[:100]!r}")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        table = wandb.Table(columns=["prompt", "completion", "score"], data=list(zip(prompts, completions, scores)))
        wandb.log({"completions": table}, step=update)


class PhaseMeter:
    """Wall time and peak memory of each phase of an update (`with meter("generation"): ...`), as
    `time/<phase>_s` and `memory/<phase>_peak_gib`, plus the run's peak so far, `memory/peak_gib`.

    Memory is CUDA's `max_memory_allocated` on a GPU and the resident set's high-water mark on a CPU (Linux: reset
    at each phase's start through /proc/self/clear_refs, read from /proc/self/status)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.run_peak = self._peak()  # what loading the models took

    def start_update(self) -> None:
        self.seconds, self.peaks = {}, {}

    @contextmanager
    def __call__(self, phase: str):
        self._reset_peak()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
            peak = self._peak()
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
            self.run_peak = max(self.run_peak, peak)

    def metrics(self) -> dict[str, float]:
        metrics = {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}
        metrics.update({f"memory/{phase}_peak_gib": peak / GIB for phase, peak in self.peaks.items()})
        metrics["memory/peak_gib"] = self.run_peak / GIB
        return metrics

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the peak then only grows over the run

    def _peak(self) -> float:
        """Bytes: the peak since the last reset."""
        if self.cuda:
            return float(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def current_wandb_run_id() -> str | None:
    wandb = sys.modules.get("wandb")
    return wandb.run.id if wandb is not None and wandb.run is not None else None


def start_wandb_run(
    project: str, run_name: str | None, tags: list[str] | None, config: dict, run_id: str | None = None
) -> None:
    """Starts the W&B run with the resolved recipe as its config (main process only); with `run_id`, continues that
    run. The wandb client decides whether W&B can be reached, and a run never fails or hangs for lack of it:
    - WANDB_MODE, when set, is passed through untouched;
    - without credentials (`wandb.login` finds no WANDB_API_KEY, `wandb login` netrc entry or identity token) the run
      logs offline, instead of the client prompting for a key or refusing;
    - with credentials the client starts an online run through its own proxy settings (HTTPS_PROXY, or the
      `https_proxy` setting) and its own init timeout (WANDB_INIT_TIMEOUT, 90 s by default); if it fails, the run
      logs offline."""
    import wandb

    run = {"project": project, "name": run_name, "tags": tags, "config": config, "id": run_id,
           "resume": "allow" if run_id else None}  # fmt: skip
    if os.environ.get("WANDB_MODE"):
        wandb.init(**run)
        return
    if not wandb.login(prompt=False, verify=False):
        _log_offline(wandb, run, "no W&B API key (WANDB_API_KEY or `wandb login`)")
        return
    try:
        wandb.init(mode="online", **run)
    except (wandb.Error, TimeoutError) as error:  # TimeoutError: the client overran its own init timeout
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _log_offline(wandb, run, f"the wandb client could not start an online run: {reason}")


def _log_offline(wandb, run: dict, why: str) -> None:
    # Later W&B runs of this process (an evaluation after training) go offline at once instead of asking again.
    os.environ["WANDB_MODE"] = "offline"
    print(f"W&B: logging offline ({why}); upload later with `wandb sync wandb/offline-run-*`", flush=True)
    wandb.init(mode="offline", **run)


def finish_wandb_run() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


class MetricsFileCallback(TrainerCallback):
    """For transformers' trainers (reward-model training, the rival methods): appends each log to `metrics.jsonl`
    as `MetricsLog` does (W&B gets the same logs through transformers' own callback)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")
