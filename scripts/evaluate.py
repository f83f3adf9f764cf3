"""Evaluates a trained policy against its reference on held-out prompts: reward per source, win-rate, KL,
perplexity, length, EOS rate, diversity; one JSON file, a sample table, and W&B.

    python scripts/evaluate.py --config configs/<model>/eval.yaml [--policy_name_or_path outputs/<model>/ppo]
    python scripts/evaluate.py --config configs/<model>/eval.yaml --checkpoints run/checkpoint-4 run/checkpoint-8
"""

import sys

from recipes.errors import run_cli
from recipes.evaluation import parse_eval_config, run_evaluation


def main() -> None:
    run_evaluation(*parse_eval_config(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
