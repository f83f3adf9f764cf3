"""Memory per device of a PPO recipe on its declared hardware, before anything is downloaded or loaded.

    python scripts/plan.py --config configs/<model>/ppo.yaml [--accelerate_config FILE] [--num_processes N]
                           [--device cpu|gpu] [--hardware FILE] [--any_recipe_field value ...]

The hardware comes from the recipe folder's hardware.yaml (the entry named after the recipe file) unless --hardware
names another file; the launch config from that entry unless --accelerate_config names one. Prints a table of what
each device holds, and exits 0 when the recipe fits, 1 when it does not (after listing the cheapest changes that
make it fit), 2 on bad input.
"""

import argparse
import sys

from recipes.errors import RecipeError
from recipes.planner import PlanRequest, cheapest_fixes, estimate_update_time, load_hardware, plan_recipe

FITS, DOES_NOT_FIT, BAD_INPUT = 0, 1, 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="The PPO recipe (YAML).")
    parser.add_argument("--accelerate_config", help="Launch config to plan for (default: the hardware entry's).")
    parser.add_argument("--num_processes", type=int, help="Override the launch config's process count.")
    parser.add_argument("--hardware", help="Hardware file (default: hardware.yaml beside the recipe).")
    parser.add_argument("--device", choices=["cpu", "gpu"],
                        help="Where the processes run, when not where the launch config says (e.g. fsdp.yaml on CPU "
                        "processes).")  # fmt: skip
    args, recipe_flags = parser.parse_known_args(argv)

    hardware = load_hardware(args.config, args.hardware)
    request = PlanRequest(["--config", args.config, *recipe_flags], hardware, args.accelerate_config,
                          args.num_processes, args.device)  # fmt: skip
    plan, fit = plan_recipe(request)
    print(f"recipe: {args.config}{' ' + ' '.join(recipe_flags) if recipe_flags else ''}")
    print(plan.table())
    if fit is None:
        print("\nno hardware declared (no hardware.yaml entry for this recipe): nothing to compare with")
        return FITS
    if hardware.device == "gpu" and hardware.gpu:
        print(estimate_update_time(plan, request.parse(), hardware.gpu).describe() + f" on one {hardware.gpu}")
    print(f"\n{fit.describe()}")
    if fit.fits:
        return FITS
    fixes = cheapest_fixes(request)
    if not fixes:
        print("no single change or combination of the planner's changes makes it fit")
    elif len(fixes[0]) == 1 and len(fixes) >= 1 and all(len(option) == 1 for option in fixes):
        print("each of these changes alone makes it fit (cheapest first):")
        for (fix,) in fixes:
            print(f"  {fix.command_part():<60} {fix.description}")
    else:
        print("no single change is enough; these together make it fit:")
        for fix in fixes[0]:
            print(f"  {fix.command_part():<60} {fix.description}")
    return DOES_NOT_FIT


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(BAD_INPUT)
