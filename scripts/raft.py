"""RAFT, best-of-n fine-tuning: rounds of sampling k completions per prompt with the kit's sampler, keeping each
prompt's best by the kit's reward, and fine-tuning on them with TRL's SFTTrainer, as one recipe describes it.

    accelerate launch scripts/raft.py --config configs/<model>/raft.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/raft.yaml (CPU, offline).
"""

import sys

from recipes.errors import run_cli
from recipes.methods.raft import DEFAULT_RAFT_RECIPE, parse_raft_recipe, run_raft


def main() -> None:
    run_raft(parse_raft_recipe(sys.argv[1:], default_config=DEFAULT_RAFT_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
