"""Writes the tiny random policy and reward model used by tests and configs/tiny/.

    python scripts/make_tiny_models.py [--output_dir outputs/tiny/models]
"""

import argparse

from recipes.tiny_models import build_tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/tiny/models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for role, path in build_tiny_models(args.output_dir, seed=args.seed).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
