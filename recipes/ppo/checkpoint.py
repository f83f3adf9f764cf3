"""Checkpoints of a PPO run, and the trained models it leaves.

    output_dir/checkpoints/update-000008/
        adapter_config.json, adapter_model.safetensors (or the full policy), tokenizer files, value_model/
                        the policy at that update, loadable as it is (scripts/evaluate.py --checkpoints ...)
        recipe.yaml     the run's resolved recipe
        state/          accelerate's state: the trained weights, optimizer, LR schedule and every process's random
                        generators, sharded as the backend shards them (DeepSpeed, FSDP)
        state_files.json  the size of every file in state/ as written
        progress.json   the update and episode counts, written last: a folder without it is incomplete

A checkpoint is written to a hidden folder and renamed into place once complete; the newest `save_total_limit` are
kept. Weights are gathered from every process before the loadable copy is written. A checkpoint damaged after it was
written (a state file cut short or deleted) is refused by `check_resumable` before a resumed run writes anything.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedModel

from recipes.errors import RecipeError
from recipes.ppo.config import default_instance

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "update-"
PROGRESS_FILE = "progress.json"
STATE_DIR = "state"
STATE_FILES = "state_files.json"
VALUE_MODEL_DIR = "value_model"
RECIPE_FILE = "recipe.yaml"


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first; folders cut short (no progress file) are ignored."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / PROGRESS_FILE).is_file())


def latest(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def read_progress(path) -> dict:
    return json.loads((Path(path) / PROGRESS_FILE).read_text())


def keep_trained_weights(models, weights, output_dir) -> None:
    """accelerate's save-state hook: the frozen weights (a LoRA policy's base) are not written into every
    checkpoint; they come back from the base model when the run is resumed."""
    for model, state in zip(models, weights):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [key for key in state if key not in trained]:
            del state[key]


def save(trainer, progress) -> Path:
    """Writes `output_dir/checkpoints/update-NNNNNN` (every process takes part), then keeps the newest
    `save_total_limit`. Refuses non-finite weights."""
    from recipes.ppo.trainer import NonFiniteRunError
    from recipes.tracking import current_wandb_run_id

    accelerator, config = trainer.accelerator, trainer.config
    root = Path(config.output_dir) / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{progress.update:06d}"
    staging = root / f".partial-{final.name}"
    local_finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters() if p.requires_grad)
    if not trainer.all_processes(local_finite):
        raise NonFiniteRunError(f"non-finite weights after update {progress.update}: no checkpoint written")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # DeepSpeed writes its own shards; the frozen base of a LoRA policy is left out as with the other backends.
    state_kwargs = {"exclude_frozen_parameters": True} if trainer.backend.is_deepspeed else {}
    accelerator.save_state(str(staging / STATE_DIR), **state_kwargs)
    save_trained_models(trainer, staging)
    if accelerator.is_main_process:
        recipe = Path(config.output_dir) / RECIPE_FILE
        if recipe.is_file():
            shutil.copy(recipe, staging / RECIPE_FILE)
        progress.wandb_run_id = progress.wandb_run_id or current_wandb_run_id()
        (staging / STATE_FILES).write_text(json.dumps(file_sizes(staging / STATE_DIR), indent=2) + "\n")
        (staging / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(config.output_dir)[: -config.save_total_limit or None]:
            shutil.rmtree(old)
        accelerator.print(f"checkpoint: {final}")
    accelerator.wait_for_everyone()
    return final


def file_sizes(folder: Path) -> dict[str, int]:
    """{path relative to `folder`: size in bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ModelArguments fields that decide which weights (and optimizer states) a checkpoint holds, and their shapes.
STATE_SHAPING_FIELDS = ("use_peft", "lora_r", "lora_target_modules", "lora_target_parameters",
                        "lora_modules_to_save", "use_dora", "value_model_init", "value_use_peft")  # fmt: skip


def check_resumable(path, num_processes: int, model_args=None) -> None:
    """Refuses, naming the file or field, a checkpoint that cannot be resumed as it is: its progress file does not
    read, a file of its state is missing or not the size it was written with (`STATE_FILES`), it was written by
    another number of processes, or by a recipe whose models hold other weights than `model_args` (the resumed
    run's model section) asks for (`STATE_SHAPING_FIELDS`). Reads no tensor: a run calls it before it writes
    anything."""
    path = Path(path)
    what_to_do = _what_to_do(path)
    try:
        read_progress(path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"resume_from_checkpoint: {path / PROGRESS_FILE} does not read ({error}): {what_to_do}")
    state = path / STATE_DIR
    if not state.is_dir():
        raise RecipeError(f"resume_from_checkpoint: {state} is missing: {what_to_do}")
    if (path / STATE_FILES).is_file():
        found = file_sizes(state)
        for name, size in json.loads((path / STATE_FILES).read_text()).items():
            if name not in found:
                raise RecipeError(f"resume_from_checkpoint: {state / name} is missing (deleted after the checkpoint "
                                  f"was written): {what_to_do}")  # fmt: skip
            if found[name] != size:
                raise RecipeError(f"resume_from_checkpoint: {state / name} has {found[name]} bytes, {size} when "
                                  f"written (cut short or changed since): {what_to_do}")  # fmt: skip
    # accelerate writes one random_states_<process>.pkl per process.
    writers = len(list(state.glob("random_states_*.pkl")))
    if writers != num_processes:
        raise RecipeError(
            f"resume_from_checkpoint: {path} was written by {writers} process{'es' if writers != 1 else ''} and this "
            f"run has {num_processes}: resume with {writers} (accelerate launch --num_processes {writers}); each "
            "process continues its own random streams and share of the prompts"
        )
    if model_args is not None and (path / RECIPE_FILE).is_file():
        # The saved recipe holds the fields that differ from the defaults.
        written, defaults = yaml.safe_load((path / RECIPE_FILE).read_text()) or {}, default_instance(type(model_args))
        for name in STATE_SHAPING_FIELDS:
            then, now = written.get(name, getattr(defaults, name)), getattr(model_args, name)
            if then != now:
                raise RecipeError(
                    f"resume_from_checkpoint: {path} was written with {name}: {then} and this recipe has {name}: "
                    f"{now}, which holds other weights: resume with the checkpoint's own recipe "
                    f"({path / RECIPE_FILE}), or start afresh in a new output_dir"
                )


def _what_to_do(path: Path) -> str:
    earlier = [found for found in complete_checkpoints(path.parent.parent) if found.name < path.name]
    if earlier:
        return f"resume from the checkpoint before it with --resume_from_checkpoint {earlier[-1]}"
    return "start afresh with --overwrite_output_dir true (or a new output_dir)"


def load(trainer, path):
    """Restores what `save` wrote into `trainer`; returns the progress to continue from."""
    from recipes.ppo.trainer import RunProgress

    accelerator = trainer.accelerator
    path = Path(path)
    if not (path / PROGRESS_FILE).is_file():
        raise RecipeError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {PROGRESS_FILE})")
    check_resumable(path, accelerator.num_processes)
    state = path / STATE_DIR
    # Frozen weights are not in the checkpoint (`keep_trained_weights`): the module keeps the ones it loaded.
    strict = {"load_module_strict": False} if trainer.backend.is_deepspeed else {"strict": False}
    try:
        accelerator.load_state(str(state), **strict)
    except (RuntimeError, KeyError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"resume_from_checkpoint: {path} does not fit this recipe's models: {first_line}") from error
    progress = RunProgress(**{**read_progress(path), "preempted": False})
    accelerator.print(f"resuming after update {progress.update} from {path}")
    return progress


def save_trained_models(trainer, output_dir) -> None:
    """Writes the policy (LoRA adapter or full weights) with its tokenizer to `output_dir` and the critic to
    `output_dir/value_model` (a sequence-classification folder, or the value head's weights). Every process must
    call it: sharded weights (ZeRO-3, FSDP) are gathered first."""
    accelerator = trainer.accelerator
    output_dir = Path(output_dir)
    state = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        module = accelerator.unwrap_model(trainer.model)
        policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        critic_state = {k.removeprefix("critic."): v for k, v in state.items() if k.startswith("critic.")}
        module.policy.save_pretrained(output_dir, state_dict=policy_state)
        trainer.tokenizer.save_pretrained(output_dir)
        module.critic.save_pretrained(output_dir / VALUE_MODEL_DIR, state_dict=critic_state)
        if isinstance(module.critic, PreTrainedModel) or hasattr(module.critic, "peft_config"):
            trainer.tokenizer.save_pretrained(output_dir / VALUE_MODEL_DIR)
    accelerator.wait_for_everyone()
