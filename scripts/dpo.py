"""DPO (TRL's DPOTrainer) on preference pairs (the folder scripts/build_preferences.py writes), as one recipe
describes it.

    accelerate launch scripts/dpo.py --config configs/<model>/dpo.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/dpo.yaml (CPU, offline).
"""

import sys

from recipes.errors import run_cli
from recipes.methods.dpo import DEFAULT_DPO_RECIPE, parse_dpo_recipe, run_dpo


def main() -> None:
    run_dpo(parse_dpo_recipe(sys.argv[1:], default_config=DEFAULT_DPO_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
