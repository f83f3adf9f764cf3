"""The reward-model recipe: one YAML file read by both steps of making a reward model, parsed strictly (unknown
keys and wrong types are errors naming the key and the file) into four dataclasses.

    python scripts/build_preferences.py --config configs/<model>/reward.yaml   # PreferenceArguments → pairs
    accelerate launch scripts/train_reward.py --config configs/<model>/reward.yaml   # pairs → reward model

The preference builder writes its pairs to `dataset_name`, the folder the trainer reads them from.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trl import ModelConfig, RewardConfig

from recipes.config import LORA_RANGES, PreferenceDataArguments, RecipeParser, resolved_config, save_resolved_config
from recipes.devices import apply_cpu_defaults
from recipes.errors import RecipeError
from recipes.ppo.config import TRAINING_RANGES, check_ranges

DEFAULT_POLICY = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class PreferenceArguments:
    """How `scripts/build_preferences.py` makes pairs: completions sampled from a policy for each prompt, judged
    by a gold reward; every two of a prompt's completions whose gold scores differ enough make a pair."""

    policy_name_or_path: str = field(
        default=DEFAULT_POLICY, metadata={"help": "Causal LM whose completions are compared: a folder or hub id."}
    )
    policy_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="float32",
        metadata={"help": "dtype the policy samples in: float32 or bfloat16 (faster on CPUs with bf16)."},
    )
    prompts_name: str = field(
        default="data/sentiment_prompts",
        metadata={"help": "Prompt file or folder (train.jsonl/test.jsonl) or hub dataset with a plain-text column."},
    )
    prompts_column: str = field(default="prompt", metadata={"help": "Column of plain-text prompts (one user turn)."})
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use at most this many training prompts."})
    max_test_prompts: int | None = field(default=None, metadata={"help": "Use at most this many held-out prompts."})
    gold_reward: str = field(
        default="sentiment",
        metadata={"help": "The reward function that labels the pairs: a built-in name (sentiment) or "
                  "'package.module:function'."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (no top-k or top-p, as PPO samples rollouts)."}
    )
    completions_per_prompt: int = field(
        default=2,
        metadata={"help": "Completions sampled per prompt; every two of them may make a pair (k give up to "
                  "k(k-1)/2 pairs)."},
    )
    max_new_tokens: int = field(
        default=48, metadata={"help": "Longest completion, in tokens (use the PPO recipe's response_length)."}
    )
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generate call (each gives completions_per_prompt completions)."}
    )
    min_score_gap: float = field(
        default=0.3,
        metadata={"help": "Keep a pair only if its gold scores differ by at least this much (0 keeps ties too)."},
    )
    sampling_seed: int = field(default=0, metadata={"help": "Seed of the sampling: same seed, same pairs."})
    overwrite_preferences: bool = field(
        default=False, metadata={"help": "Replace the preference files already in `dataset_name`."}
    )

    def __post_init__(self):
        check_ranges(self, PREFERENCE_RANGES)


PREFERENCE_RANGES = {
    "max_train_prompts": (1, None, "at least 1, or null for all"),
    "max_test_prompts": (1, None, "at least 1, or null for all"),
    "temperature": (1e-6, None, "above 0 (sampling divides the logits by it)"),
    "completions_per_prompt": (2, None, "at least 2 (a pair compares two)"),
    "max_new_tokens": (1, None, "at least 1 token"),
    "generation_batch_size": (1, None, "at least 1"),
    "min_score_gap": (0, None, "at least 0 (0 keeps ties too)"),
}


@dataclass
class RewardModelArguments(ModelConfig):
    """The reward model's base (TRL's `ModelConfig`: path, dtype, LoRA) plus the pad token. A causal LM gets a
    new one-output score head; LoRA trains with task type SEQ_CLS, so the score head is trained in full."""

    lora_task_type: str = field(
        default="SEQ_CLS", metadata={"help": "Must be SEQ_CLS: the score head is then trained and saved in full."}
    )
    num_hidden_layers: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the first N transformer layers of the base (default: all): a shallower reward model "
            "trains and scores in proportion faster; the layers above N are not loaded."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Padding token, as in the PPO recipe (must be in the vocabulary). Default: the PPO kit's choice, "
            "an unused special token when the tokenizer pads with EOS."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, {**LORA_RANGES, "num_hidden_layers": (1, None, "at least 1, or null for all")})


@dataclass
class RewardTrainingArguments(RewardConfig):
    """TRL's `RewardConfig` (all its fields: learning_rate, num_train_epochs, max_length, ...) plus the run-level
    fields the kit adds. Defaults differ from TRL where noted."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` (its files are replaced, nothing is deleted)."},
    )
    wandb_project: str = field(default="ppo-recipes", metadata={"help": "W&B project, when `report_to` has wandb."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})
    center_rewards: bool = field(
        default=False,
        metadata={
            "help": "After training, move the score head so that the mean score over the reference completions is 0."
        },
    )
    normalize_rewards: bool = field(
        default=False,
        metadata={
            "help": "After training, centre the scores (as center_rewards) and scale them to standard deviation 1 "
            "over the reference completions, so that a PPO recipe's kl_coef weighs the KL against rewards of a "
            "known spread."
        },
    )
    center_rewards_reference: str | None = field(
        default=None,
        metadata={"help": "Preference file whose chosen and rejected completions are the reference of "
                  "center_rewards and normalize_rewards. Default: the training pairs."},
    )
    # Each checkpoint copies the whole model, and the kit saves the final, merged model itself.
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoint every `save_steps` steps ('steps') or never ('no')."}
    )
    # TRL turns this deprecated alias on by default; None lets `activation_checkpointing` (off unless set) decide:
    # recomputing activations costs a third more time, and small models do not need the memory.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    # TRL's deprecated alias of the tokenizer's pad token; the kit's is `pad_token` in the model section.
    pad_token: str | None = field(default=None, init=False)

    def __post_init__(self):
        # Before TrainingArguments' own checks, some of which fail on such values with a bare ZeroDivisionError.
        check_ranges(self, REWARD_TRAINING_RANGES)
        apply_cpu_defaults(self)
        super().__post_init__()


REWARD_TRAINING_RANGES = {
    **TRAINING_RANGES,
    "max_length": (1, None, "at least 1 token, or null for no limit"),
    "center_rewards_coefficient": (0, None, "at least 0"),
}


# RewardConfig fields whose job the kit does itself; setting them would be silently overruled.
NOT_READ_KEYS = {
    "model_init_kwargs": "the kit loads the model from model_name_or_path with dtype and attn_implementation",
    "chat_template_path": "pairs are tokenised with the base model's own chat template before training",
    "eos_token": "completions end with the tokenizer's EOS token, as PPO's `stop_token: eos` leaves them",
}


@dataclass
class RewardRecipe:
    """A parsed reward-model recipe: what `scripts/build_preferences.py` and `scripts/train_reward.py` run."""

    preferences: PreferenceArguments
    data: PreferenceDataArguments
    model: RewardModelArguments
    training: RewardTrainingArguments
    source: str | None = None
    """The YAML file it came from (None: defaults and flags only)."""

    @property
    def parts(self) -> tuple:
        return (self.preferences, self.data, self.model, self.training)

    def to_dict(self) -> dict[str, Any]:
        return resolved_config(self.parts)

    def save_yaml(self, path: str | Path) -> None:
        save_resolved_config(self.parts, self.source, path)


def parse_reward_recipe(args: list[str], default_config: str | None = None) -> RewardRecipe:
    """Parses `--config file.yaml` (or `default_config`) plus command-line overrides, and refuses TRL fields the
    kit does not read."""
    parser = RecipeParser((PreferenceArguments, PreferenceDataArguments, RewardModelArguments, RewardTrainingArguments))
    (preferences, data, model, training), source = parser.parse(args, default_config=default_config)
    defaults = RewardTrainingArguments(output_dir=training.output_dir)
    for key, why in NOT_READ_KEYS.items():
        if getattr(training, key) != getattr(defaults, key):
            raise RecipeError(f"{key} is not read by the reward recipe: {why}")
    if model.lora_task_type != "SEQ_CLS":
        raise RecipeError(f"lora_task_type: '{model.lora_task_type}' cannot train a reward model; use SEQ_CLS")
    if model.load_in_4bit or model.load_in_8bit:
        raise RecipeError("load_in_4bit/load_in_8bit: reward training saves a merged full-precision model; unset them")
    return RewardRecipe(preferences=preferences, data=data, model=model, training=training, source=source)
