"""Prepare offline copies of models for machines that cannot reach the Hugging Face Hub.

Usage:
    python scripts/prepare_model.py [HUB_ID ...] [--cache_dir DIR]

With no HUB_ID, prepares every model in recipes.model_cache.OFFLINE_MODELS. Prints
one prepared folder per model on stdout (progress goes to stderr). Exits 1 with a
one-line error if any model fails.
"""

from __future__ import annotations

import argparse
import sys

from recipes.model_cache import MODEL_CACHE_DIR, OFFLINE_MODELS, prepare_offline_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "hub_ids", nargs="*", metavar="HUB_ID",
        help=f"Hub ids to prepare (default: all of {', '.join(sorted(OFFLINE_MODELS))})",
    )
    parser.add_argument(
        "--cache_dir", default=None,
        help=f"cache root (default: $RECIPES_MODEL_CACHE or ~/.cache/ppo-recipes/models; now {MODEL_CACHE_DIR()})",
    )
    args = parser.parse_args(argv)

    for hub_id in args.hub_ids or sorted(OFFLINE_MODELS):
        try:
            path = prepare_offline_model(hub_id, cache_root=args.cache_dir)
        except KeyboardInterrupt:
            print(f"error: preparing {hub_id} was interrupted; nothing was written to the cache.", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - any failure becomes one line and exit code 1
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: preparing {hub_id} failed: {message}", file=sys.stderr)
            return 1
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
