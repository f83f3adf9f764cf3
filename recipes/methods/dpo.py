"""DPO (TRL's `DPOTrainer`): offline, on the preference pairs the reward model was trained on (the folder
`scripts/build_preferences.py` writes: TRL's conversational `chosen`/`rejected`). No completion is sampled during
training and no reward model is read: the pairs themselves are the signal, and `beta` weighs the implicit KL to the
reference (the LoRA policy with its adapter disabled, or a frozen copy of the policy).

    accelerate launch scripts/dpo.py --config configs/<model>/dpo.yaml [--any_field value ...]

The recipe: the kit's `PreferenceDataArguments` (as the reward recipe's data section), `ModelArguments` (policy,
LoRA) and TRL's `DPOConfig` with the kit's run fields.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import trl
from accelerate import PartialState
from datasets import Dataset
from transformers import set_seed
from trl import get_peft_config

from recipes import REPO_ROOT
from recipes.config import METRICS_FILE, ModelArguments, PreferenceDataArguments, check_output_dir
from recipes.data import load_raw_prompts
from recipes.errors import RecipeError
from recipes.methods.trl_wiring import (
    PPO_ONLY_MODEL_FIELDS,
    REWARD_MODEL_FIELDS,
    KitRunFields,
    MethodRecipe,
    capped_splits,
    check_reference,
    describe_policy,
    describe_steps,
    open_outputs,
    parse_method_recipe,
    save_and_close,
)
from recipes.models import load_policy, load_tokenizer
from recipes.ppo.config import TRAINING_RANGES
from recipes.tracking import MetricsFileCallback

DEFAULT_DPO_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "dpo.yaml")

PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class DPOConfig(KitRunFields, trl.DPOConfig):
    """TRL's `DPOConfig` (its fields, names and defaults) plus the kit's run fields."""

    # TRL's deprecated alias of the tokenizer's pad token; the kit's is `pad_token` in the model section.
    pad_token: str | None = field(default=None, init=False)

    RANGES: ClassVar[dict] = {
        **TRAINING_RANGES,
        "beta": (1e-9, None, "above 0 (the loss scales the policy's log-ratios by it; below 0 it learns the "
                 "rejected side)"),
        "max_length": (1, None, "at least 1 token, or null for no limit"),
    }


DPO_NOT_READ = {
    **PPO_ONLY_MODEL_FIELDS,
    **{name: "DPO learns from the preference pairs, without a reward model" for name in REWARD_MODEL_FIELDS},
}


def parse_dpo_recipe(args: list[str], default_config: str | None = None) -> MethodRecipe:
    return parse_method_recipe(
        "dpo", args, (PreferenceDataArguments, ModelArguments, DPOConfig), default_config, DPO_NOT_READ
    )


def load_pairs(data_args: PreferenceDataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation) pairs with TRL's preference columns (`chosen`, `rejected`, and `prompt` when the data
    has it); other columns (the builder's gold scores) are left out."""
    if not data_args.dataset_name:
        raise RecipeError(
            "dataset_name is not set: name the preference pairs (e.g. the folder scripts/build_preferences.py wrote)"
        )
    raw = load_raw_prompts(data_args, seed)
    columns = raw["train"].column_names
    missing = [column for column in PAIR_COLUMNS if column not in columns]
    if missing:
        raise RecipeError(
            f"dataset_name: '{data_args.dataset_name}' has no column {' or '.join(map(repr, missing))} "
            f"(columns: {columns})"
        )
    kept = [column for column in ("prompt", *PAIR_COLUMNS) if column in columns]
    limits = {"train": data_args.max_train_pairs, "eval": data_args.max_eval_pairs}
    return capped_splits(raw, kept, limits, data_args.dataset_name, "pairs")


def run_dpo(recipe: MethodRecipe) -> Path:
    """Trains as the recipe says; returns the output folder (policy with its tokenizer, recipe.yaml,
    metrics.jsonl, and TRL's checkpoint-<step> folders when `save_strategy` asks for them)."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir)
    reference = check_reference(model_args, "dpo")
    tokenizer = load_tokenizer(model_args)
    train, validation = load_pairs(recipe.data, training.seed)
    state.print(f"pairs: {len(train)} train, {len(validation)} validation")
    state.print(f"batches: {describe_steps(training, state.num_processes, len(train), 'pairs')}")
    # LoRA matrices are drawn from the global generator: seeded, a run is reproducible.
    set_seed(training.seed)
    policy = load_policy(model_args)
    state.print(f"models: {describe_policy(model_args, policy)}, reference {reference}")
    open_outputs(recipe, output_dir)

    trainer = trl.DPOTrainer(
        model=policy,
        args=training,
        train_dataset=train,
        eval_dataset=validation if training.eval_strategy != "no" else None,
        processing_class=tokenizer,
        # TRL wraps the policy itself: a PeftModel handed over ready-made would get a frozen copy of its adapter
        # as the reference instead of the adapter disabled.
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsFileCallback(output_dir / METRICS_FILE)],
    )
    trainer.train()
    save_and_close(trainer, output_dir)
    return output_dir
