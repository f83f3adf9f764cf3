"""Where a run's metrics go: `metrics.jsonl` in the output folder, and W&B (online, or offline by itself)."""

import json
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from transformers import TrainerCallback

DEFAULT_WANDB_URL = "https://api.wandb.ai"


class MetricsFileCallback(TrainerCallback):
    """Appends each logged update's metrics (the trainer's names) as one JSON object per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def wandb_mode() -> tuple[str, str]:
    """('online' or 'offline', why). An explicit WANDB_MODE wins; without an API key, or when the W&B server
    does not answer within a few seconds, the run logs offline instead of failing or hanging."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL)
    host = urlparse(url).hostname or ""
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(host)):
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((host, urlparse(url).port or 443), timeout=3).close()
    except OSError:
        return "offline", f"{host} is not reachable"
    return "online", "API key found and server reachable"


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_wandb_run(
    project: str, run_name: str | None, tags: list[str] | None, config: dict, run_id: str | None = None
) -> None:
    """Starts the W&B run with the resolved recipe as its config (main process only); the trainer's W&B callback
    then logs into this run and adds its own arguments to the config. With `run_id`, continues that run."""
    import wandb

    mode, why = wandb_mode()
    os.environ["WANDB_MODE"] = mode
    if mode == "offline":
        print(f"W&B: logging offline ({why}); upload later with `wandb sync wandb/offline-run-*`")
    wandb.init(project=project, name=run_name, tags=tags, config=config, mode=mode, id=run_id, resume="allow" if run_id else None)


def finish_wandb_run() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()
