"""The seam between the kit and its PPO engine: the only module that imports TRL's PPO trainer.

TRL 1.12 is the last release with `PPOTrainer` (as `trl.experimental.ppo`). Configs and scripts only see the
names defined here (`PPOArguments`, `RecipePPOTrainer`), so the engine can be swapped without touching them.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

# Set before the import: trl.experimental warns on import otherwise.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402


@dataclass
class PPOArguments(PPOConfig):
    """TRL's `PPOConfig` (all its fields: learning_rate, num_ppo_epochs, kl_coef, response_length, ...) plus the
    run-level fields the kit adds. Defaults differ from TRL where noted."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` (its files are replaced, nothing is deleted)."},
    )
    wandb_project: str = field(
        default="ppo-recipes", metadata={"help": "W&B project, used when `report_to` includes wandb."}
    )
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})
    # Intermediate checkpoints of TRL's trainer cannot be resumed from, and each one copies the whole model;
    # the kit saves the final policy and value model itself.
    save_strategy: str = field(
        default="no", metadata={"help": "TRL checkpoints every `save_steps` updates ('steps') or never ('no')."}
    )
    # TRL turns this deprecated alias on by default; None lets `activation_checkpointing` (off unless set) decide.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )

    def __post_init__(self):
        # Without a GPU: fp32 by default (TRL defaults to bf16 mixed precision, which transformers refuses without a
        # GPU unless `use_cpu` is set), and always `use_cpu`, so that an explicit `bf16: true` runs on the CPU and
        # processes started by `accelerate launch --num_processes N` join one gloo process group (accelerate sets
        # up CPU data parallelism only when told to use the CPU; otherwise each process trains alone).
        if not torch.cuda.is_available():
            if self.bf16 is None:
                self.bf16 = False
            self.use_cpu = True
        super().__post_init__()


class RecipePPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, plus saving everything a run produces (policy, tokenizer, value model), and what a reward
    model that scores text (`reward_models.sources.RewardSourceModel`) needs: where each batch's prompts end, and
    its per-source scores logged as `reward/<source name>`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TRL 1.12's PPOTrainer skips `Trainer.__init__`, which sets this flag; `Trainer._save` reads it on every
        # process but the first, so saving failed there when several processes ran.
        self.is_distributed_loading_by_transformers = False
        # TRL 1.12 reads `self.model.policy` (reference log-probs with the adapter disabled, saving the policy) on
        # the model `accelerator.prepare` returned: with several processes the DDP wrapper, which has no such
        # attribute (huggingface/trl#2375). An alias, not a registered submodule, makes those reads work.
        unwrapped = self.accelerator.unwrap_model(self.model)
        if unwrapped is not self.model:
            object.__setattr__(self.model, "policy", unwrapped.policy)
        # TRL scores each batch with `context_length` = the width of its left-padded prompts, which a reward model
        # that splits rows into prompt and completion text cannot see in its inputs; the loaders tell it as they
        # hand out each batch (training rollouts, and the evaluation batches of `generate_completions`).
        context = getattr(self.reward_model, "scoring_context", None)
        if context is not None:
            self.dataloader = PromptWidthRecorder(self.dataloader, context, training=True)
            self.eval_dataloader = PromptWidthRecorder(self.eval_dataloader, context, training=False)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean score of each reward source over the update's training rollouts (`reward/<name>`), averaged
        over all processes, to TRL's metrics. Every process calls `log` once per update."""
        take_logged_sums = getattr(self.reward_model, "take_logged_sums", None)
        if take_logged_sums is not None:
            sums = take_logged_sums()
            if sums:
                totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.accelerator.device)
                totals = self.accelerator.reduce(totals, reduction="sum")
                means = {f"reward/{name}": (total / count).item() for name, (total, count) in zip(sums, totals)}
                logs = {**logs, **means}
        super().log(logs, *args, **kwargs)

    def save_outputs(self, output_dir: str | Path) -> None:
        """Saves the policy (LoRA adapter or full weights) with its tokenizer to `output_dir` and the value model
        to `output_dir/value_model`. Every process must call it (the trainer gathers sharded weights)."""
        output_dir = Path(output_dir)
        self.save_model(str(output_dir))
        if self.accelerator.is_main_process:
            value_model = self.accelerator.unwrap_model(self.model).value_model
            value_model.save_pretrained(output_dir / "value_model")
            self.processing_class.save_pretrained(output_dir / "value_model")
        self.accelerator.wait_for_everyone()


class PromptWidthRecorder:
    """Iterates a dataloader and, as it hands out each batch, records the batch's prompt width
    (`input_ids.shape[1]`) and whether it is a training batch in `context` (`reward_models.sources.ScoringContext`).
    Anything else is the wrapped dataloader's."""

    def __init__(self, dataloader, context, training: bool):
        self.dataloader = dataloader
        self.context = context
        self.training = training

    def __iter__(self):
        for batch in self.dataloader:
            self.context.prompt_width = batch["input_ids"].shape[1]
            self.context.training = self.training
            yield batch

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)
