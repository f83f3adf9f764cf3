"""Prompts for PPO: loaded from a local file or the hub, rendered, tokenised, filtered by length, split."""

from dataclasses import dataclass

import torch
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from recipes.config import DataArguments
from recipes.errors import RecipeError
from recipes.hub import load_hub_dataset

# File endings `datasets` reads, and the loader name for each.
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PromptSplits:
    """Tokenised prompts (column `input_ids`, no padding) for training and held-out evaluation."""

    train: Dataset
    eval: Dataset
    dropped_too_long: dict[str, int]
    """Prompts dropped per split for exceeding `max_prompt_length` tokens."""

    def describe(self, max_prompt_length: int) -> str:
        dropped = ", ".join(f"{count} {split}" for split, count in self.dropped_too_long.items())
        return (
            f"prompts: {len(self.train)} train, {len(self.eval)} held out; dropped as longer than "
            f"{max_prompt_length} tokens (max_prompt_length): {dropped}"
        )


def load_raw_prompts(data_args: DataArguments, seed: int) -> DatasetDict:
    """The train and eval splits before tokenisation. A local file (or folder) is split `eval_fraction` held out;
    a hub dataset uses `dataset_test_split` when it has one."""
    name = data_args.dataset_name
    if not name:
        raise RecipeError("dataset_name is not set: name a prompt file (.jsonl/.json/.parquet/.csv) or hub dataset")
    path = Path(name)
    if path.suffix in FILE_FORMATS and not path.is_file():
        raise RecipeError(f"dataset_name: data file not found: {name}")
    try:
        if path.is_file():
            if path.suffix not in FILE_FORMATS:
                raise RecipeError(f"dataset_name: {name} is not a .jsonl, .json, .parquet or .csv file")
            loaded = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path))
        elif path.is_dir():
            loaded = load_dataset(name, name=data_args.dataset_config)
        else:
            loaded = load_hub_dataset(name, data_args.dataset_config)
    except RecipeError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid)
        raise RecipeError(f"dataset_name: cannot load '{name}': {str(error).splitlines()[0]}") from error

    if data_args.dataset_train_split not in loaded:
        raise RecipeError(
            f"dataset_train_split: '{name}' has no split '{data_args.dataset_train_split}' (splits: {list(loaded)})"
        )
    train = loaded[data_args.dataset_train_split]
    if data_args.dataset_test_split in loaded and data_args.dataset_test_split != data_args.dataset_train_split:
        held_out = loaded[data_args.dataset_test_split]
    else:
        if not 0 < data_args.eval_fraction < 1:
            raise RecipeError(f"eval_fraction must be between 0 and 1 (got {data_args.eval_fraction})")
        if len(train) < 2:
            raise RecipeError(f"dataset_name: '{name}' has {len(train)} rows; it needs at least 2 to hold some out")
        parts = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    return DatasetDict(train=train, eval=held_out)


def prompt_texts(dataset: Dataset, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each row's prompt as the exact text the policy continues: chat messages (or a plain prompt when
    `prompt_as_user_message`) are rendered with the chat template and its generation prompt."""
    columns = dataset.column_names
    if data_args.prompt_column in columns:
        # A plain list: `dataset[column]` is a lazy Column in datasets 5, which tokenizers refuse as a batch.
        texts = list(dataset[data_args.prompt_column])
        if not data_args.prompt_as_user_message:
            return texts
        conversations = [[{"role": "user", "content": text}] for text in texts]
    elif data_args.messages_column in columns:
        conversations = dataset[data_args.messages_column]
    else:
        raise RecipeError(
            f"dataset_name: '{data_args.dataset_name}' has neither a '{data_args.prompt_column}' column "
            f"(prompt_column) nor a '{data_args.messages_column}' column (messages_column); columns: {columns}"
        )
    if not tokenizer.chat_template:
        raise RecipeError("the tokenizer has no chat template, so chat prompts cannot be rendered")
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]


def reward_prompts(dataset: Dataset, data_args: DataArguments) -> list[str]:
    """Each row's prompt as a reward function reads it: the plain prompt, or a chat's last user message."""
    if data_args.prompt_column in dataset.column_names:
        return list(dataset[data_args.prompt_column])
    return [
        next((m["content"] for m in reversed(chat) if m["role"] == "user"), "")
        for chat in dataset[data_args.messages_column]
    ]


def prompt_conversations(dataset: Dataset, data_args: DataArguments) -> list[list[dict]]:
    """Each row's prompt as chat turns, for reward models that render their own chat template: the `messages`,
    or a plain prompt as one user turn when `prompt_as_user_message`; empty lists for plain-text prompts."""
    if data_args.prompt_column in dataset.column_names:
        if not data_args.prompt_as_user_message:
            return [[] for _ in range(len(dataset))]
        return [[{"role": "user", "content": text}] for text in dataset[data_args.prompt_column]]
    return [list(chat) for chat in dataset[data_args.messages_column]]


def tokenize_prompts(
    dataset: Dataset, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, int]:
    """Returns (dataset of `input_ids`, `prompt` and `messages`, number dropped for length): the ids the policy
    continues, and the prompt as reward sources read it (`reward_prompts`, `prompt_conversations`). Rendered chat
    text already holds its special tokens, so the tokenizer adds none to it."""
    texts = prompt_texts(dataset, data_args, tokenizer)
    rendered = data_args.prompt_column not in dataset.column_names or data_args.prompt_as_user_message
    input_ids = tokenizer(texts, add_special_tokens=not rendered)["input_ids"]
    rows = zip(input_ids, reward_prompts(dataset, data_args), prompt_conversations(dataset, data_args))
    kept = [row for row in rows if 0 < len(row[0]) <= data_args.max_prompt_length]
    columns = {"input_ids": [r[0] for r in kept], "prompt": [r[1] for r in kept], "messages": [r[2] for r in kept]}
    return Dataset.from_dict(columns), len(input_ids) - len(kept)


def load_prompts(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int) -> PromptSplits:
    """Loads, renders, tokenises and length-filters the prompts; fails if a split ends up empty."""
    raw = load_raw_prompts(data_args, seed)
    limits = {"train": data_args.max_train_prompts, "eval": data_args.max_eval_prompts}
    splits, dropped = {}, {}
    for split, dataset in raw.items():
        tokenized, dropped[split] = tokenize_prompts(dataset, data_args, tokenizer)
        if limits[split] is not None:
            tokenized = tokenized.select(range(min(limits[split], len(tokenized))))
        if len(tokenized) == 0:
            raise RecipeError(
                f"dataset_name: no {split} prompts left after dropping {dropped[split]} longer than "
                f"{data_args.max_prompt_length} tokens: raise max_prompt_length or check the data"
            )
        splits[split] = tokenized
    return PromptSplits(train=splits["train"], eval=splits["eval"], dropped_too_long=dropped)


@dataclass
class PromptBatch:
    """One process's prompts of one update: token ids [B, W] left-padded, and the texts reward sources read."""

    input_ids: torch.Tensor
    prompts: list[str]
    conversations: list[list[dict]] | None


def collate_prompts(rows: list[dict], pad_token_id: int) -> PromptBatch:
    """Rows of the prompt dataset (`input_ids`, `prompt`, `messages`) → a left-padded batch."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row["input_ids"]) :] = torch.tensor(row["input_ids"])
    conversations = [row["messages"] for row in rows] if all(row.get("messages") for row in rows) else None
    return PromptBatch(input_ids, [row["prompt"] for row in rows], conversations)
