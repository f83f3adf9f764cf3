"""GRPO (TRL's `GRPOTrainer`): online, no critic. Each prompt's `num_generations` completions are scored by the
kit's reward; a completion's advantage is its reward minus its group's mean (divided by the group's std, TRL's
`scale_rewards: group`); the KL to the reference (`beta`, per token, k3) is a term of the loss, not of the reward.

    accelerate launch scripts/grpo.py --config configs/<model>/grpo.yaml [--any_field value ...]

The recipe: the kit's `DataArguments` (prompts, rendered as PPO renders them) and `ModelArguments` (policy, LoRA,
reward model and functions), and TRL's `GRPOConfig` with the kit's run fields (`total_episodes`: completions
sampled). The reward's weights are the model section's `reward_weights`, as in PPO.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import trl

from recipes import REPO_ROOT
from recipes.config import DataArguments, ModelArguments
from recipes.methods.trl_wiring import (
    ONLINE_NOT_READ,
    MethodRecipe,
    OnlineRunFields,
    parse_method_recipe,
    run_online_method,
)

DEFAULT_GRPO_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "grpo.yaml")

@dataclass
class GRPOConfig(OnlineRunFields, trl.GRPOConfig):
    """TRL's `GRPOConfig` (its fields, names and defaults) plus the kit's run fields."""

    # The reward's weights live in the model section (ModelArguments.reward_weights), as in PPO: one source of truth.
    reward_weights: list[float] | None = dataclasses.field(default=None, init=False)


def parse_grpo_recipe(args: list[str], default_config: str | None = None) -> MethodRecipe:
    return parse_method_recipe(
        "grpo", args, (DataArguments, ModelArguments, GRPOConfig), default_config, ONLINE_NOT_READ
    )


def run_grpo(recipe: MethodRecipe) -> Path:
    """Trains as the recipe says; returns the output folder (policy with its tokenizer, recipe.yaml,
    metrics.jsonl, and TRL's checkpoint-<step> folders when `save_strategy` asks for them)."""
    return run_online_method(recipe, trl.GRPOTrainer)
