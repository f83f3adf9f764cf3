"""RLOO (TRL's RLOOTrainer) against the kit's reward, on the kit's prompts, as one recipe describes it.

    accelerate launch scripts/rloo.py --config configs/<model>/rloo.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/rloo.yaml (CPU, offline).
"""

import sys

from recipes.errors import run_cli
from recipes.methods.rloo import DEFAULT_RLOO_RECIPE, parse_rloo_recipe, run_rloo


def main() -> None:
    run_rloo(parse_rloo_recipe(sys.argv[1:], default_config=DEFAULT_RLOO_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
