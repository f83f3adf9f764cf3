"""Writes the kit's sentiment prompt set (subject lists × request templates; subjects split between train and
test), deterministically for a seed.

    python scripts/make_sentiment_prompts.py [--output_dir data/sentiment_prompts] [--seed 0]
"""

import argparse
import sys

from recipes.errors import run_cli
from recipes.sentiment_prompts import sentiment_prompt_splits, write_prompt_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/sentiment_prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_size", type=int, default=400)
    parser.add_argument("--test_size", type=int, default=100)
    args = parser.parse_args()
    splits = sentiment_prompt_splits(seed=args.seed, train_size=args.train_size, test_size=args.test_size)
    for split, path in write_prompt_splits(args.output_dir, splits).items():
        print(f"{split}: {len(getattr(splits, split))} prompts → {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
