"""GRPO (TRL's GRPOTrainer) against the kit's reward, on the kit's prompts, as one recipe describes it.

    accelerate launch scripts/grpo.py --config configs/<model>/grpo.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/grpo.yaml (CPU, offline).
"""

import sys

from recipes.errors import run_cli
from recipes.methods.grpo import DEFAULT_GRPO_RECIPE, parse_grpo_recipe, run_grpo


def main() -> None:
    run_grpo(parse_grpo_recipe(sys.argv[1:], default_config=DEFAULT_GRPO_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
