"""PPO recipes for RLHF on the Hugging Face stack: config, models, data, the PPO engine, evaluation.

    from recipes import parse_recipe, run_ppo
    run_ppo(parse_recipe(["--config", "configs/tiny/ppo.yaml"]))

Names are imported on first use, so that light tools (e.g. scripts/prepare_model.py) do not load trl and torch.
"""

import importlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PPO_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "ppo.yaml")

_EXPORTS = {
    "DataArguments": "recipes.config",
    "ModelArguments": "recipes.config",
    "Recipe": "recipes.config",
    "parse_recipe": "recipes.config",
    "BatchPlan": "recipes.ppo.config",
    "PPOConfig": "recipes.ppo.config",
    "plan_batches": "recipes.ppo.config",
    "PPOTrainer": "recipes.ppo.trainer",
    "RecipeError": "recipes.errors",
    "run_cli": "recipes.errors",
    "run_ppo": "recipes.run",
}

__all__ = ["DEFAULT_PPO_RECIPE", "REPO_ROOT", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipes' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
