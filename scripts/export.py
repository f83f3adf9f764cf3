"""Exports a trained model as a folder users can ship: a PPO run's policy (LoRA merged into its base) or one of its
checkpoints, or a reward model the kit trained; with a model card (recipe, reward, evaluation); pushed to the hub when
asked.

    python scripts/export.py --model_dir outputs/<model>/ppo --output_dir outputs/<model>/export \
        [--eval_dir outputs/<model>/eval] [--push_to_hub true --hub_model_id <user>/<name>]
"""

import sys

from recipes.errors import run_cli
from recipes.export import export_model, parse_export_args


def main() -> None:
    export_model(parse_export_args(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
