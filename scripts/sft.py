"""Supervised fine-tuning (TRL's SFTTrainer), LoRA or full, on chat examples or plain text, as one recipe describes it:
the first step of the classic pipeline (SFT → reward model → PPO).

    accelerate launch scripts/sft.py --config configs/<model>/sft.yaml [--any_field value ...]

Without --config it runs the default recipe, configs/smollm2-135m/sft.yaml (CPU, offline).
"""

import sys

from recipes.errors import run_cli
from recipes.methods.sft import DEFAULT_SFT_RECIPE, parse_sft_recipe, run_sft


def main() -> None:
    run_sft(parse_sft_recipe(sys.argv[1:], default_config=DEFAULT_SFT_RECIPE))


if __name__ == "__main__":
    sys.exit(run_cli(main))
