"""The one error type the kit raises for bad input, and how scripts turn it into a one-line message."""

import sys
from collections.abc import Callable


class RecipeError(Exception):
    """Bad input: a config key, file, column or model the run cannot use. The message names it and says what to do."""


def run_cli(main: Callable[[], object]) -> int:
    """Runs a script's `main`; a `RecipeError` becomes one line on stderr and exit code 1 (no traceback)."""
    try:
        main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
