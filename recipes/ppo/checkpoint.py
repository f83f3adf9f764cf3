"""Checkpoints of a PPO run, and the trained models it leaves.

    output_dir/checkpoints/update-000008/
        adapter_config.json, adapter_model.safetensors (or the full policy), tokenizer files, value_model/
                        the policy at that update, loadable as it is (scripts/evaluate.py --checkpoints ...)
        recipe.yaml     the run's resolved recipe
        state/          accelerate's state: the trained weights, optimizer, LR schedule and every process's random
                        generators, sharded as the backend shards them (DeepSpeed, FSDP)
        progress.json   the update and episode counts, written last: a folder without it is incomplete

A checkpoint is written to a hidden folder and renamed into place once complete; the newest `save_total_limit` are
kept. Weights are gathered from every process before the loadable copy is written.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel

from recipes.errors import RecipeError

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "update-"
PROGRESS_FILE = "progress.json"
STATE_DIR = "state"
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
        (staging / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(config.output_dir)[: -config.save_total_limit or None]:
            shutil.rmtree(old)
        accelerator.print(f"checkpoint: {final}")
    accelerator.wait_for_everyone()
    return final


def load(trainer, path):
    """Restores what `save` wrote into `trainer`; returns the progress to continue from."""
    from recipes.ppo.trainer import RunProgress

    accelerator = trainer.accelerator
    path = Path(path)
    if not (path / PROGRESS_FILE).is_file():
        raise RecipeError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {PROGRESS_FILE})")
    state = path / STATE_DIR
    if not (state / f"random_states_{accelerator.process_index}.pkl").is_file():
        raise RecipeError(
            f"resume_from_checkpoint: {path} was written by fewer processes than {accelerator.num_processes} "
            "(or by an older version of the kit); resume with as many processes as the run had"
        )
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
