"""One PPO run from a parsed recipe: check → load → train → save. Everything that can be wrong with the input is
checked before the output folder is touched, so a refused run leaves nothing behind. Rerunning the same command
on an output folder that holds a checkpoint continues the run from it."""

import json
import shutil
from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from recipes.config import METRICS_FILE, RESOLVED_RECIPE_FILE, Recipe, check_output_dir, plan_batches
from recipes.data import PromptSplits, load_prompts
from recipes.engine import CHECKPOINTS_DIR, PROGRESS_FILE, RecipePPOTrainer, complete_checkpoints
from recipes.errors import RecipeError
from recipes.evaluation import HeldOutEvaluation
from recipes.models import PPOModels, describe_reward, load_ppo_models, load_tokenizer, reference_mode
from recipes.tracking import MetricsFileCallback, finish_wandb_run, start_wandb_run



def run_ppo(recipe: Recipe) -> Path:
    """Trains the policy as the recipe says and returns the output folder, which then holds the policy (adapter
    or full weights) with its tokenizer, `value_model/`, `recipe.yaml` and `metrics.jsonl`."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    resume_from = checkpoint_to_resume(training.output_dir, training.resume_from_checkpoint, training.overwrite_output_dir)
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir, resuming=resume_from is not None)

    tokenizer = load_tokenizer(model_args)
    prompts = load_prompts(recipe.data, tokenizer, seed=training.seed)
    plan = plan_batches(training, state.num_processes, len(prompts.train))
    state.print(prompts.describe(recipe.data.max_prompt_length))
    state.print(f"batches: {plan.describe()}")
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
            shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
            (output_dir / METRICS_FILE).write_text("")
        if "wandb" in (training.report_to or []):
            run_id = _progress(resume_from).get("wandb_run_id") if resume_from else None
            start_wandb_run(training.wandb_project, training.run_name, training.wandb_tags, recipe.to_dict(), run_id)

    trainer = make_trainer(recipe, tokenizer, prompts, models, held_out, [MetricsFileCallback(output_dir / METRICS_FILE)])
    if resume_from is not None and state.is_main_process:
        keep_metrics_until(output_dir / METRICS_FILE, _progress(resume_from)["update"])
    progress = trainer.train(resume_from=resume_from)
    if progress.preempted:
        if state.is_main_process:
            finish_wandb_run()
        state.print(f"preempted: checkpoint written; rerun the same command to continue from update {progress.update}")
        return output_dir
    trainer.save_outputs(output_dir)
    if state.is_main_process:
        finish_wandb_run()
    state.print(f"saved policy, value model, {RESOLVED_RECIPE_FILE} and {METRICS_FILE} to {output_dir}")
    return output_dir


def make_trainer(
    recipe: Recipe,
    tokenizer,
    prompts: PromptSplits,
    models: PPOModels,
    held_out: HeldOutEvaluation | None = None,
    callbacks=(),
) -> RecipePPOTrainer:
    """The kit's PPO trainer over loaded models and prompts, with its held-out evaluation (if any)."""
    trainer = RecipePPOTrainer(
        args=recipe.training,
        processing_class=tokenizer,
        model=models.policy,
        ref_model=models.reference,
        reward_model=models.reward,
        value_model=models.value,
        train_dataset=prompts.train,
        eval_dataset=prompts.eval,
        peft_config=models.policy_peft_config,
        callbacks=list(callbacks),
    )
    trainer.held_out_evaluation = held_out
    return trainer


def checkpoint_to_resume(output_dir: str | None, explicit: str | None, overwrite: bool) -> Path | None:
    """`resume_from_checkpoint` when given; else the newest complete checkpoint in `output_dir` (unless told to
    overwrite); else None (a fresh run)."""
    if explicit:
        path = Path(explicit)
        if not (path / PROGRESS_FILE).is_file():
            raise RecipeError(f"resume_from_checkpoint: {explicit} is not a complete checkpoint (no {PROGRESS_FILE})")
        return path
    if output_dir is None or overwrite:
        return None
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS_FILE).read_text())


def keep_metrics_until(path: Path, update: int) -> None:
    """Drops the lines of updates after `update` (logged after the checkpoint, before the run was stopped), so
    that the resumed run continues the file without gaps or duplicates."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= update]
    path.write_text("".join(line + "\n" for line in kept))
