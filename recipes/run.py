"""One PPO run from a parsed recipe: check → load → train → save. Everything that can be wrong with the input is
checked before the output folder is touched, so a refused run leaves nothing behind. Rerunning the same command
on an output folder that holds a checkpoint continues the run from it."""

import json
import shutil
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs
from transformers import set_seed

from recipes.config import METRICS_FILE, RESOLVED_RECIPE_FILE, Recipe, check_output_dir
from recipes.data import PromptSplits, load_prompts
from recipes.errors import RecipeError
from recipes.evaluation import HeldOutEvaluation
from recipes.models import PPOModels, describe_reward, load_ppo_models, load_tokenizer, reference_mode
from recipes.ppo import checkpoint
from recipes.ppo.config import BatchPlan, PPOConfig, plan_batches
from recipes.ppo.distributed import fsdp_on_cpu
from recipes.ppo.trainer import PPOTrainer
from recipes.tracking import MetricsLog, finish_wandb_run, start_wandb_run


def run_ppo(recipe: Recipe) -> Path:
    """Trains the policy as the recipe says and returns the output folder, which then holds the policy (adapter
    or full weights) with its tokenizer, `value_model/`, `recipe.yaml` and `metrics.jsonl`."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    resume_from = checkpoint_to_resume(training.output_dir, training.resume_from_checkpoint, training.overwrite_output_dir)
    if resume_from is not None:
        checkpoint.check_resumable(resume_from, state.num_processes, recipe.model)
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir, resuming=resume_from is not None)

    tokenizer = load_tokenizer(model_args)
    prompts = load_prompts(recipe.data, tokenizer, seed=training.seed)
    plan = plan_batches(training, state.num_processes, len(prompts.train))
    state.print(prompts.describe(recipe.data.max_prompt_length))
    state.print(f"batches: {plan.describe()}")
    accelerator = build_accelerator(training, plan)
    # Fresh score heads and LoRA matrices are drawn from the global generators: seeded, a run is reproducible.
    set_seed(training.seed)
    models = load_ppo_models(model_args, tokenizer)
    state.print(
        f"models: policy {model_args.model_name_or_path} ({'LoRA' if model_args.use_peft else 'full'}), "
        f"reference {reference_mode(model_args)}, value from {model_args.value_model_init}, "
        f"reward {describe_reward(model_args)}"
    )
    held_out = HeldOutEvaluation.for_ppo_recipe(recipe, tokenizer, models.reward)  # its sources load (or fail) here
    # Every process has checked the output folder before the main one writes into it.
    state.wait_for_everyone()

    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.save_yaml(output_dir / RESOLVED_RECIPE_FILE)
        if resume_from is None:
            # A fresh run over an old one (overwrite_output_dir): the old checkpoints must not be resumed later.
            shutil.rmtree(output_dir / checkpoint.CHECKPOINTS_DIR, ignore_errors=True)
            (output_dir / METRICS_FILE).write_text("")
        else:
            keep_metrics_until(output_dir / METRICS_FILE, checkpoint.read_progress(resume_from)["update"])
        if "wandb" in (training.report_to or []):
            run_id = checkpoint.read_progress(resume_from).get("wandb_run_id") if resume_from else None
            start_wandb_run(training.wandb_project, training.run_name, training.wandb_tags, recipe.to_dict(), run_id)

    trainer = make_trainer(recipe, plan, accelerator, tokenizer, prompts, models, held_out,
                           MetricsLog(output_dir / METRICS_FILE) if state.is_main_process else None)  # fmt: skip
    progress = trainer.train(resume_from=resume_from)
    if progress.preempted:
        if state.is_main_process:
            finish_wandb_run()
        state.print(f"preempted: checkpoint written; rerun the same command to continue from update {progress.update}")
        return output_dir
    trainer.save_trained_models(output_dir)
    if state.is_main_process:
        finish_wandb_run()
    state.print(f"saved policy, value model, {RESOLVED_RECIPE_FILE} and {METRICS_FILE} to {output_dir}")
    return output_dir


def build_accelerator(config: PPOConfig, plan: BatchPlan) -> Accelerator:
    """The run's accelerator: the launch config's backend (DDP, DeepSpeed, FSDP), the recipe's precision, and one
    optimizer step per `plan.micro_batches_per_step` micro-batches. Made before any model is loaded, so that
    DeepSpeed ZeRO-3 can create the models already sharded."""
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    # TrainingArguments sets up (and first resets) the process state the first time its `device` is read, as
    # transformers' optimizer choice does: read it now, so that it never resets the accelerator made here.
    config.device  # noqa: B018
    accelerator = Accelerator(
        gradient_accumulation_steps=plan.micro_batches_per_step,
        mixed_precision=precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
    )
    fsdp_on_cpu(accelerator)
    return accelerator


def make_trainer(recipe: Recipe, plan: BatchPlan, accelerator, tokenizer, prompts: PromptSplits, models: PPOModels,
                 held_out: HeldOutEvaluation | None = None, log=None) -> PPOTrainer:  # fmt: skip
    """The kit's PPO trainer over loaded models and prompts."""
    return PPOTrainer(recipe.training, plan, accelerator, tokenizer, models, prompts, models.reward, held_out, log)


def checkpoint_to_resume(output_dir: str | None, explicit: str | None, overwrite: bool) -> Path | None:
    """`resume_from_checkpoint` when given; else the newest complete checkpoint in `output_dir` (unless told to
    overwrite); else None (a fresh run)."""
    if explicit:
        path = Path(explicit)
        if not (path / checkpoint.PROGRESS_FILE).is_file():
            raise RecipeError(
                f"resume_from_checkpoint: {explicit} is not a complete checkpoint (no {checkpoint.PROGRESS_FILE})"
            )
        return path
    if output_dir is None or overwrite:
        return None
    return checkpoint.latest(output_dir)


def keep_metrics_until(path: Path, update: int) -> None:
    """Drops the lines of updates after `update` (logged after the checkpoint, before the run was stopped), so
    that the resumed run continues the file without gaps or duplicates."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= update]
    path.write_text("".join(line + "\n" for line in kept))
