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
        # TRL defaults to bf16 mixed precision, which transformers refuses without a GPU unless `use_cpu` is set:
        # without a GPU the default is fp32, and an explicit `bf16: true` runs on the CPU.
        if not torch.cuda.is_available():
            if self.bf16 is None:
                self.bf16 = False
            if self.bf16:
                self.use_cpu = True
        super().__post_init__()


class RecipePPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, plus saving everything a run produces (policy, tokenizer, value model)."""

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
