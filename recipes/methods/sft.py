"""Supervised fine-tuning (TRL's `SFTTrainer`), LoRA or full, on chat examples or plain text: the first step of the
classic pipeline (SFT → reward model → PPO) for users who start from a base model, and the fine-tuning stage of
RAFT (`recipes.methods.raft`).

    accelerate launch scripts/sft.py --config configs/<model>/sft.yaml [--any_field value ...]

The recipe: `SFTDataArguments` (which file, which column), the kit's `ModelArguments` (policy, LoRA) and TRL's
`SFTConfig` with the kit's run fields. Chat examples (a column of {role, content} lists) are rendered with the
tokenizer's chat template; the loss is on every token of the example (TRL's default for conversations; set
`assistant_only_loss` for chat templates that mark assistant turns).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import trl
from accelerate import PartialState
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import ScriptArguments

from recipes import REPO_ROOT
from recipes.config import EVAL_FRACTION_RANGE, METRICS_FILE, ModelArguments, check_output_dir
from recipes.data import load_raw_prompts
from recipes.errors import RecipeError
from recipes.methods.trl_wiring import (
    PPO_ONLY_MODEL_FIELDS,
    REWARD_MODEL_FIELDS,
    KitRunFields,
    MethodRecipe,
    capped_splits,
    describe_policy,
    describe_steps,
    open_outputs,
    parse_method_recipe,
    save_and_close,
)
from recipes.models import load_policy_for_training, load_tokenizer
from recipes.ppo.config import TRAINING_RANGES, check_ranges
from recipes.tracking import MetricsFileCallback

DEFAULT_SFT_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "sft.yaml")


@dataclass
class SFTDataArguments(ScriptArguments):
    """The examples to fine-tune on (TRL's `ScriptArguments` plus the kit's fields): chat examples in
    `messages_column`, or plain text in the training section's `dataset_text_field` (TRL's name)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .jsonl/.json/.parquet/.csv file or folder (train/test files), or a hub dataset id."},
    )
    messages_column: str = field(
        default="messages",
        metadata={"help": "Column of chat examples (lists of {role, content}), rendered with the chat template. "
                  "When the data has no such column, the text column (dataset_text_field) is trained on."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share held out for evaluation when the dataset has no `dataset_test_split` (held out "
                  "even when eval_strategy is 'no', so that a later evaluation reads unseen examples)."},
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Use at most this many examples."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many."})

    def __post_init__(self):
        check_ranges(self, {
            "eval_fraction": EVAL_FRACTION_RANGE,
            "max_train_examples": (1, None, "at least 1, or null for all"),
            "max_eval_examples": (1, None, "at least 1, or null for all"),
        })  # fmt: skip


@dataclass
class SFTConfig(KitRunFields, trl.SFTConfig):
    """TRL's `SFTConfig` (its fields, names and defaults) plus the kit's run fields."""

    # TRL's deprecated alias of the tokenizer's pad token; the kit's is `pad_token` in the model section.
    pad_token: str | None = field(default=None, init=False)

    RANGES: ClassVar[dict] = {**TRAINING_RANGES, "max_length": (1, None, "at least 1 token, or null for no limit")}


SFT_NOT_READ = {
    **PPO_ONLY_MODEL_FIELDS,
    **{name: "SFT trains on examples, without a reward" for name in REWARD_MODEL_FIELDS},
    "reference": "SFT has no reference model",
}


def parse_sft_recipe(args: list[str], default_config: str | None = None) -> MethodRecipe:
    return parse_method_recipe("sft", args, (SFTDataArguments, ModelArguments, SFTConfig), default_config, SFT_NOT_READ)


def load_examples(data_args: SFTDataArguments, text_field: str, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) examples with one column: `messages` (chat, renamed from `messages_column`) or
    `text_field` (plain text)."""
    raw = load_raw_prompts(data_args, seed)
    columns = raw["train"].column_names
    if data_args.messages_column in columns:
        column, renamed = data_args.messages_column, "messages"
    elif text_field in columns:
        column, renamed = text_field, text_field
    else:
        raise RecipeError(
            f"dataset_name: '{data_args.dataset_name}' has neither a '{data_args.messages_column}' column "
            f"(messages_column) nor a '{text_field}' column (dataset_text_field); columns: {columns}"
        )
    limits = {"train": data_args.max_train_examples, "eval": data_args.max_eval_examples}
    rename = {column: renamed} if column != renamed else {}
    return capped_splits(raw, [column], limits, data_args.dataset_name, "examples", rename)


def sft_trainer(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    config: trl.SFTConfig,
    callbacks: list[TrainerCallback],
    held_out: Dataset | None = None,
) -> trl.SFTTrainer:
    """The SFT stage: TRL's trainer over a policy the kit loaded (with its LoRA adapter when it trains through
    LoRA) and examples in one of TRL's formats (`messages`, text, or `prompt`/`completion`)."""
    return trl.SFTTrainer(
        model=policy,
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def run_sft(recipe: MethodRecipe) -> Path:
    """Fine-tunes as the recipe says; returns the output folder (policy with its tokenizer, recipe.yaml,
    metrics.jsonl, and TRL's checkpoint-<step> folders when `save_strategy` asks for them)."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir)
    tokenizer = load_tokenizer(model_args)
    train, held_out = load_examples(recipe.data, training.dataset_text_field, training.seed)
    if "messages" in train.column_names and not tokenizer.chat_template:
        raise RecipeError("model_name_or_path: the tokenizer has no chat template, so chat examples cannot be rendered")
    state.print(f"examples: {len(train)} train, {len(held_out)} held out ({train.column_names[0]})")
    state.print(f"batches: {describe_steps(training, state.num_processes, len(train), 'examples')}")
    # LoRA matrices are drawn from the global generator: seeded, a run is reproducible.
    set_seed(training.seed)
    policy = load_policy_for_training(model_args)
    state.print(f"models: {describe_policy(model_args, policy)}")
    open_outputs(recipe, output_dir)

    evaluating = training.eval_strategy != "no"
    trainer = sft_trainer(policy, tokenizer, train, training, [MetricsFileCallback(output_dir / METRICS_FILE)],
                          held_out if evaluating else None)  # fmt: skip
    trainer.train()
    save_and_close(trainer, output_dir)
    return output_dir
