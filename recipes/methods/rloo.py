"""RLOO (TRL's `RLOOTrainer`): online, no critic. Each prompt's `num_generations` completions are scored by the
kit's reward minus `beta` × their summed per-token KL to the reference (k1, as PPO's default `kl_estimator`); a
completion's advantage is that minus the mean of its group's other completions (the leave-one-out baseline).

    accelerate launch scripts/rloo.py --config configs/<model>/rloo.yaml [--any_field value ...]

The recipe: the kit's `DataArguments` and `ModelArguments`, and TRL's `RLOOConfig` with the kit's run fields
(`total_episodes`: completions sampled), as for GRPO.
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

DEFAULT_RLOO_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "rloo.yaml")


@dataclass
class RLOOConfig(OnlineRunFields, trl.RLOOConfig):
    """TRL's `RLOOConfig` (its fields, names and defaults) plus the kit's run fields."""

    # The reward's weights live in the model section (ModelArguments.reward_weights), as in PPO: one source of truth.
    reward_weights: list[float] | None = dataclasses.field(default=None, init=False)


def parse_rloo_recipe(args: list[str], default_config: str | None = None) -> MethodRecipe:
    return parse_method_recipe(
        "rloo", args, (DataArguments, ModelArguments, RLOOConfig), default_config, ONLINE_NOT_READ
    )


def run_rloo(recipe: MethodRecipe) -> Path:
    """Trains as the recipe says; returns the output folder (as `recipes.methods.grpo.run_grpo`)."""
    return run_online_method(recipe, trl.RLOOTrainer)
