"""Samples two completions per prompt from a policy, labels them with a gold reward and writes the preference
pairs (train.jsonl, test.jsonl) to the recipe's `dataset_name` folder.

    python scripts/build_preferences.py --config configs/<model>/reward.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/reward.yaml (CPU, offline).
"""

import sys

from recipes.devices import process_state
from recipes.errors import run_cli
from reward_models import DEFAULT_REWARD_RECIPE
from reward_models.config import parse_reward_recipe
from reward_models.preferences import build_preferences


def main() -> None:
    recipe = parse_reward_recipe(sys.argv[1:], default_config=DEFAULT_REWARD_RECIPE)
    process_state().print(build_preferences(recipe).describe())


if __name__ == "__main__":
    sys.exit(run_cli(main))
