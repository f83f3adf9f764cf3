"""The recipe: one YAML file per run, parsed strictly into three dataclasses (data, model, algorithm).

    accelerate launch scripts/ppo.py --config configs/<model>/ppo.yaml [--any_field value ...]

The YAML sets the defaults, command-line flags override them. An unknown key, a wrong type or a TRL example
field that the kit replaces is an error naming the key and the file.
"""

import dataclasses
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from recipes.errors import RecipeError
from recipes.ppo.config import (
    READ_TRAINING_FIELDS,
    REPLACED_TRAINING_FIELDS,
    PPOConfig,
    check_ranges,
    default_instance,
    unread_fields,
)

QUANTIZATION_MODES = ("none", "8bit", "4bit")


@dataclass
class DataArguments(ScriptArguments):
    """Where the prompts come from and how they become token ids (TRL's `ScriptArguments` plus the kit's fields)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset id."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column of plain-text prompts."})
    messages_column: str = field(
        default="messages",
        metadata={"help": "Column of chat prompts (lists of {role, content}); rendered with the chat template."},
    )
    prompt_as_user_message: bool = field(
        default=False,
        metadata={"help": "Render each plain-text prompt as one user turn with the chat template (instruct models)."},
    )
    max_prompt_length: int = field(
        default=128,
        metadata={"help": "Prompts longer than this many tokens are dropped (and counted), never truncated."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the prompts held out for evaluation when the dataset has no `dataset_test_split`."},
    )
    max_train_prompts: int | None = field(default=None, metadata={"help": "Use at most this many training prompts."})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "Use at most this many held-out prompts."})

    def __post_init__(self):
        check_ranges(self, DATA_RANGES)


# An eval_fraction of 0 or 1 would leave one split empty.
EVAL_FRACTION_RANGE = (1e-9, 1 - 1e-9, "between 0 and 1 (both excluded)")

DATA_RANGES = {
    "max_prompt_length": (1, None, "at least 1 token"),
    "eval_fraction": EVAL_FRACTION_RANGE,
    "max_train_prompts": (1, None, "at least 1, or null for all"),
    "max_eval_prompts": (1, None, "at least 1, or null for all"),
}


@dataclass
class PreferenceDataArguments(ScriptArguments):
    """Preference pairs (TRL's `ScriptArguments` plus the kit's fields): what a reward model and DPO learn from.

    Rows hold `chosen` and `rejected` conversations (prompt turns + one assistant turn), or a `prompt`
    conversation beside `chosen`/`rejected` assistant turns: TRL's conversational preference formats."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A folder with train.jsonl/test.jsonl, a .jsonl/.json/.parquet file, or a hub dataset id."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the pairs held out for validation when the dataset has no `dataset_test_split`."},
    )
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "Use at most this many validation pairs."})

    def __post_init__(self):
        check_ranges(self, PREFERENCE_DATA_RANGES)


PREFERENCE_DATA_RANGES = {
    "eval_fraction": EVAL_FRACTION_RANGE,
    "max_train_pairs": (1, None, "at least 1, or null for all"),
    "max_eval_pairs": (1, None, "at least 1, or null for all"),
}


@dataclass
class ModelArguments(ModelConfig):
    """The policy (TRL's `ModelConfig`: path, dtype, LoRA, 4/8-bit base) plus the reference, value and reward
    models."""

    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Padding token, when the tokenizer has none or pads with its EOS token (PPO needs them distinct). "
            "Must already be in the vocabulary. Default: an unused special token of the tokenizer."
        },
    )
    reference: Literal["auto", "adapter_disabled", "separate"] = field(
        default="auto",
        metadata={
            "help": "'adapter_disabled': the LoRA policy with its adapter switched off (no second copy in memory); "
            "'separate': a model of its own; 'auto': adapter_disabled with LoRA, separate otherwise."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Separate reference model. Default: the policy's base model."}
    )
    ref_quantization: Literal["none", "8bit", "4bit"] = field(
        default="none", metadata={"help": "Load the separate reference model in full precision, 8-bit or 4-bit."}
    )
    value_model_init: Literal["reward_model", "policy", "policy_trunk"] = field(
        default="reward_model",
        metadata={
            "help": "The critic: a separate model initialised from the reward model (TRL's default) or the policy's "
            "base; or 'policy_trunk', a value head on the policy's own last hidden state (one forward gives "
            "log-probs and values; no second network in memory; the value loss also trains the policy's weights)."
        },
    )
    value_use_peft: bool = field(
        default=False,
        metadata={"help": "Train the value model with LoRA (the policy's lora_* settings) instead of in full."},
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Sequence-classification reward model with one label: a local folder or hub id."},
    )
    reward_quantization: Literal["none", "8bit", "4bit"] = field(
        default="none", metadata={"help": "Load the reward model in full precision, 8-bit or 4-bit."}
    )
    reward_model_tokenizer: Literal["policy", "own"] = field(
        default="policy",
        metadata={
            "help": "'policy': the reward model reads the policy's tokens (it shares the policy's tokenizer); "
            "'own': completions are decoded to text and re-tokenised with the reward model's own tokenizer and "
            "chat template."
        },
    )
    reward_functions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions `package.module:function`, each (prompts, completions) -> list of floats, or "
            "the name of a built-in (sentiment, length, ends_with_punctuation)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward source, the reward model (if any) first, then reward_functions in order; "
            "the reward is their weighted sum. Default: all 1."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, LORA_RANGES)
        if self.reward_weights and not all(math.isfinite(weight) for weight in self.reward_weights):
            raise RecipeError(f"reward_weights: {self.reward_weights}; every weight must be a finite number")


# TRL's ModelConfig LoRA fields, for every recipe that trains through LoRA (the policy's, the value model's and
# the reward model's adapters).
LORA_RANGES = {
    "lora_r": (1, None, "at least 1"),
    "lora_alpha": (1e-9, None, "above 0 (the adapter's output is scaled by lora_alpha / lora_r)"),
    "lora_dropout": (0, 1 - 1e-9, "at least 0 and below 1 (1 would drop every input of the adapter)"),
}


# TRL's example script reads these PPOConfig fields; the kit names its models in ModelArguments instead.
REPLACED_KEYS = {
    "sft_model_path": "model_name_or_path",
    "reward_model_path": "reward_model_name_or_path",
}

# Secrets are never written to a saved recipe or sent to W&B. Other `*_token` fields (`pad_token`, `stop_token`)
# are settings of the run and are kept.
SECRET_KEYS = {"hub_token"}

UNSUPPORTED_VALUES = {
    "dataset_streaming": (True, "streaming datasets are not supported: PPO samples prompts in random order"),
}


@dataclass
class Recipe:
    """A parsed recipe: what `scripts/ppo.py` runs."""

    data: DataArguments
    model: ModelArguments
    training: PPOConfig
    source: str | None = None
    """The YAML file it came from (None: defaults and flags only)."""

    def to_dict(self) -> dict[str, Any]:
        return resolved_config((self.data, self.model, self.training))

    def save_yaml(self, path: str | Path) -> None:
        save_resolved_config((self.data, self.model, self.training), self.source, path)


def resolved_config(parts: tuple) -> dict[str, Any]:
    """The fields of `parts` (parsed dataclasses) whose values differ from the kit's defaults, as plain YAML
    values: a config that reproduces the run with this kit's pinned versions. Secrets (`SECRET_KEYS`) are left out."""
    resolved = {}
    for part in parts:
        ours, defaults = _as_plain_dict(part), _as_plain_dict(default_instance(type(part)))
        for key, value in ours.items():
            if key not in REPLACED_KEYS and key not in SECRET_KEYS and value != defaults.get(key):
                resolved[key] = value
    return resolved


def save_resolved_config(parts: tuple, source: str | None, path: str | Path) -> None:
    header = f"# Resolved recipe: {source or 'defaults'} with command-line overrides; differences from\n"
    header += "# the kit's defaults only. Reusable with --config.\n"
    Path(path).write_text(header + yaml.safe_dump(resolved_config(parts), sort_keys=False))


def _as_plain_dict(part: Any) -> dict[str, Any]:
    values = part.to_dict() if hasattr(part, "to_dict") else dataclasses.asdict(part)
    names = {f.name for f in dataclasses.fields(part) if f.init and not f.name.startswith("_")}
    # TrainingArguments.to_dict replaces every `*_token` value with a placeholder ("<STOP_TOKEN>"): read them as set.
    return {
        key: _plain(getattr(part, key) if key.endswith("_token") else value)
        for key, value in values.items()
        if key in names
    }


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RecipeParser(TrlParser):
    """TRL's parser (YAML defaults, CLI overrides) made strict: every YAML key must be a field and its value must
    have the field's type; errors name the key and the file. Any script's dataclasses can use it."""

    def __init__(self, dataclass_types: tuple[type, ...]):
        super().__init__(dataclass_types)
        self._types = {}
        for dataclass_type in self.dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for f in dataclasses.fields(dataclass_type):
                if f.init:
                    self._types[f.name] = hints[f.name]

    def error(self, message: str):
        """argparse's own error prints the whole usage; one line naming the flag is enough."""
        raise RecipeError(message)

    def parse(self, args: list[str], default_config: str | None = None) -> tuple[tuple, str | None]:
        """Returns (one instance per dataclass, the YAML path used or None)."""
        args = list(args)
        config_path = default_config
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise RecipeError("--config needs a YAML file path")
            config_path = args[index + 1]
            del args[index : index + 2]
        if config_path is not None:
            self.set_defaults_with_config(**self.load_config(config_path))
        for key in REPLACED_KEYS:
            if f"--{key}" in args:
                raise RecipeError(f"--{key} is not read by this kit: use --{REPLACED_KEYS[key]}")
        try:
            return tuple(self.parse_args_into_dataclasses(args=args)), config_path
        except (ValueError, TypeError, RecipeError) as error:
            where = f" (recipe {config_path})" if config_path else ""
            raise RecipeError(f"{_first_line(error)}{where}") from error

    def load_config(self, path: str) -> dict[str, Any]:
        """Reads and checks a recipe YAML: a mapping of known keys to values of the right type."""
        config_file = Path(path)
        if not config_file.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            config = yaml.load(config_file.read_text(), Loader=_RecipeLoader)
        except yaml.YAMLError as error:
            raise RecipeError(_yaml_error(path, error)) from error
        if not isinstance(config, dict):
            raise RecipeError(f"{path} must be a YAML mapping of recipe keys to values")
        checked = {}
        for key, value in config.items():
            if key in REPLACED_KEYS:
                raise RecipeError(f"{path}: key '{key}' is not read by this kit: use '{REPLACED_KEYS[key]}'")
            if key not in self._types:
                raise RecipeError(f"{path}: unknown key '{key}' (see README.md, 'Recipe fields')")
            checked[key] = _coerce(key, value, self._types[key], path)
            if key in UNSUPPORTED_VALUES and checked[key] == UNSUPPORTED_VALUES[key][0]:
                raise RecipeError(f"{path}: '{key}: {value}': {UNSUPPORTED_VALUES[key][1]}")
        return checked


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"key '{key}' is given twice (first on line {lines[key]}): keep one",
                    problem_mark=key_node.start_mark,
                )
            if isinstance(key, typing.Hashable):
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_error(path: str, error: yaml.YAMLError) -> str:
    """Where in the file and what: PyYAML's own message spans several lines, with the problem last."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"{path} is not valid YAML: {_first_line(error)}"
    hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in problem else ""
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: {problem}{hint}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _coerce(key: str, value: Any, hint: Any, path: str) -> Any:
    """Returns `value` if it fits the field type `hint` (a YAML float written `1e-5` is read as text by YAML 1.1
    and converted here); raises a RecipeError naming the key and file otherwise."""
    if _float_field(hint) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not _fits(value, hint):
        raise RecipeError(
            f"{path}: key '{key}' has {type(value).__name__} value {value!r}, expected {_type_name(hint)}"
        )
    return value


def _float_field(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, str) and value in {member.value for member in hint}
    return True  # other annotations are checked by the dataclass itself


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__} of {', '.join(_type_name(a) for a in args)}"
    return getattr(hint, "__name__", str(hint))


def parse_recipe(args: list[str], default_config: str | None = None) -> Recipe:
    """Parses `--config file.yaml` (or `default_config` when no --config is given) plus command-line overrides; a
    TrainingArguments field the kit's engine does not read is an error naming it."""
    (data, model, training), source = RecipeParser((DataArguments, ModelArguments, PPOConfig)).parse(
        args, default_config=default_config
    )
    unread = unread_fields(training, READ_TRAINING_FIELDS, REPLACED_TRAINING_FIELDS)
    if unread:
        raise RecipeError(unread[0] + (f" (recipe {source})" if source else ""))
    return Recipe(data=data, model=model, training=training, source=source)


# ---------------------------------------------------------------------------------------------------------------
# Output folders

RESOLVED_RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"


def check_output_dir(output_dir: str | None, overwrite: bool, resuming: bool = False) -> Path:
    """The output folder must be new or empty, unless `overwrite_output_dir` or the run resumes (nothing is ever
    deleted)."""
    if not output_dir:
        raise RecipeError("output_dir is not set")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"output_dir: {output_dir} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise RecipeError(
            f"output_dir: {output_dir} is not empty; choose a new output_dir or pass --overwrite_output_dir true"
        )
    return path
