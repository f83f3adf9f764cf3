"""PPO recipes for RLHF on the Hugging Face stack: config, models, data, trainer wiring.

    from recipes import parse_recipe, run_ppo
    run_ppo(parse_recipe(["--config", "configs/tiny/ppo.yaml"]))
"""

from pathlib import Path

from recipes.config import BatchPlan, DataArguments, ModelArguments, Recipe, parse_recipe, plan_batches
from recipes.engine import PPOArguments, RecipePPOTrainer
from recipes.errors import RecipeError, run_cli
from recipes.run import run_ppo

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PPO_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "ppo.yaml")

__all__ = [
    "DEFAULT_PPO_RECIPE",
    "BatchPlan",
    "DataArguments",
    "ModelArguments",
    "PPOArguments",
    "Recipe",
    "RecipeError",
    "RecipePPOTrainer",
    "parse_recipe",
    "plan_batches",
    "run_cli",
    "run_ppo",
]
