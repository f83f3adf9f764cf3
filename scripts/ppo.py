"""PPO for a language model against a reward model, as one recipe describes it.

    accelerate launch scripts/ppo.py --config configs/<model>/ppo.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/ppo.yaml (CPU, offline).
"""

import sys

from recipes import DEFAULT_PPO_RECIPE, parse_recipe, run_cli, run_ppo


def main() -> None:
    recipe = parse_recipe(sys.argv[1:], default_config=DEFAULT_PPO_RECIPE)
    run_ppo(recipe)


if __name__ == "__main__":
    sys.exit(run_cli(main))
