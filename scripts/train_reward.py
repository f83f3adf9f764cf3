"""Trains a reward model (pairwise, Bradley–Terry) on preference pairs, as one recipe describes it.

    accelerate launch scripts/train_reward.py --config configs/<model>/reward.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/reward.yaml (CPU, offline); its pairs come
from scripts/build_preferences.py.
"""

import sys

from recipes.errors import run_cli
from reward_models import DEFAULT_REWARD_RECIPE
from reward_models.config import parse_reward_recipe
from reward_models.training import train_reward_model


def main() -> None:
    train_reward_model(parse_reward_recipe(sys.argv[1:], default_config=DEFAULT_REWARD_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
