"""Prompts for PPO: loaded from a local file or the hub, checked row by row, rendered, tokenised, filtered by
length, split."""

import json
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

# The roles of the chat format every chat template of the hub reads.
CHAT_ROLES = ("system", "user", "assistant", "tool")


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


def load_raw_prompts(data_args: DataArguments, seed: int, key: str = "dataset_name") -> DatasetDict:
    """The train and eval splits before tokenisation. A local file (or folder) is split `eval_fraction` held out;
    a hub dataset uses `dataset_test_split` when it has one. Every row of the column the prompts are read from
    (`check_rows`) is checked first. `key`: the recipe field that names the data, for errors."""
    name = data_args.dataset_name
    if not name:
        raise RecipeError(f"{key} is not set: name a prompt file (.jsonl/.json/.parquet/.csv) or hub dataset")
    path = Path(name)
    if path.suffix in FILE_FORMATS and not path.is_file():
        raise RecipeError(f"{key}: data file not found: {name}")
    try:
        if path.is_file():
            if path.suffix not in FILE_FORMATS:
                raise RecipeError(f"{key}: {name} is not a .jsonl, .json, .parquet or .csv file")
            loaded = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path))
        elif path.is_dir():
            loaded = load_dataset(name, name=data_args.dataset_config)
        else:
            loaded = load_hub_dataset(name, data_args.dataset_config)
    except RecipeError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid)
        raise _load_error(path, key, error) from error

    if data_args.dataset_train_split not in loaded:
        folder = f" (a folder's split '{data_args.dataset_train_split}' is its {data_args.dataset_train_split}.jsonl)"
        raise RecipeError(
            f"dataset_train_split: '{name}' has no split '{data_args.dataset_train_split}' (splits: {list(loaded)})"
            + (folder if path.is_dir() else "")
        )
    splits = [data_args.dataset_train_split]
    if data_args.dataset_test_split in loaded and data_args.dataset_test_split != data_args.dataset_train_split:
        splits.append(data_args.dataset_test_split)
    for split in splits:
        columns = _columns_read(data_args, loaded[split].column_names)
        check_rows(loaded[split], columns, _split_source(path, split, key))
    train = loaded[data_args.dataset_train_split]
    if len(splits) == 2:
        held_out = loaded[data_args.dataset_test_split]
    else:
        if len(train) < 2:
            raise RecipeError(f"{key}: '{name}' has {len(train)} rows; it needs at least 2 to hold some out")
        parts = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    return DatasetDict(train=train, eval=held_out)


def load_data_file(path: str | Path, key: str) -> Dataset:
    """The rows of one local .jsonl/.json/.parquet/.csv file (at least one); errors name the recipe field `key` and
    say what is wrong with the file."""
    path = Path(path)
    if path.suffix not in FILE_FORMATS or not path.is_file():
        raise RecipeError(f"{key}: no .jsonl, .json, .parquet or .csv file at {path}")
    try:
        dataset = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # as in load_raw_prompts
        raise _load_error(path, key, error) from error
    if len(dataset) == 0:
        raise RecipeError(f"{key}: {path}: no rows")
    return dataset


def _load_error(path: Path, key: str, error: Exception) -> RecipeError:
    """What went wrong loading local data: the first of its files that is empty or holds a line that is not a JSON
    object (a file cut short), else what `datasets` raised and the error it wraps."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in FILE_FORMATS)
    for file in files:
        problem = data_file_problem(file)
        if problem:
            return RecipeError(f"{key}: {file}{problem}")
    if path.is_dir() and not files:
        return RecipeError(f"{key}: {path} holds no .jsonl, .json, .parquet or .csv file")
    # `datasets` wraps what its file readers raised ("An error occurred while generating the dataset").
    reasons = [_first_line(error)] + ([_first_line(error.__cause__)] if error.__cause__ is not None else [])
    return RecipeError(f"{key}: cannot load '{path}': {': '.join(reasons)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def data_file_problem(path: Path) -> str | None:
    """Why a local data file cannot be read as rows, said after its path (None when nothing is found): empty, a CSV
    header alone, or, for JSON, a line (or the whole file) that is not JSON objects, as when a file was cut short."""
    text = path.read_text(errors="replace")
    if not text.strip():
        return " is empty"
    if path.suffix == ".csv" and len([line for line in text.splitlines() if line.strip()]) < 2:
        return " holds a header line and no rows"
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return f", line {number}: not a JSON object (was the file cut short?): {line[:60]!r}"
            if not isinstance(row, dict):
                return f", line {number}: a JSON {type(row).__name__}, not an object of columns: {line[:60]!r}"
    elif path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f", line {error.lineno}: not valid JSON ({error.msg}; was the file cut short?)"
    return None


def _split_source(path: Path, split: str, key: str) -> str:
    """What errors about a split's rows name: the data file itself, or the folder's one file of that split, where
    rows are counted as in the file; else the dataset and its split."""
    if path.is_file():
        return f"{key}: {path}"
    files = list(path.glob(f"{split}.*")) if path.is_dir() else []
    return f"{key}: {files[0]}" if len(files) == 1 else f"{key}: '{path}' (split '{split}')"


def _columns_read(data_args, columns: list[str]) -> dict[str, str]:
    """The column prompts (or chat examples) are read from, and as what: 'text' from `prompt_column`, else 'chat'
    from `messages_column`; nothing for data arguments without these fields (preference pairs are checked where they
    are read)."""
    prompt_column = getattr(data_args, "prompt_column", None)
    if prompt_column in columns:
        return {prompt_column: "text"}
    messages_column = getattr(data_args, "messages_column", None)
    if messages_column in columns:
        return {messages_column: "chat"}
    return {}


def check_rows(dataset: Dataset, columns: dict[str, str], source: str) -> None:
    """Every row of `columns` ({column: 'text' or 'chat'}) holds what the kit reads: text that is not blank, or a
    non-empty list of chat messages, each a {role, content} with one of `CHAT_ROLES` and text. Errors name `source`,
    the row (counted from 1, as the lines of a .jsonl file) and the column."""
    if len(dataset) == 0:
        raise RecipeError(f"{source}: no rows")
    for column, kind in columns.items():
        for number, value in enumerate(dataset[column], start=1):
            problem = _text_problem(value) if kind == "text" else _chat_problem(value)
            if problem:
                raise RecipeError(f"{source}, row {number}, column '{column}': {problem}")


def _text_problem(value) -> str | None:
    if not isinstance(value, str):
        return f"{_kind(value)}, not text"
    return "empty text" if not value.strip() else None


def _chat_problem(value) -> str | None:
    if not isinstance(value, list):
        return f"{_kind(value)}, not a list of chat messages ({{role, content}})"
    if not value:
        return "an empty list of chat messages"
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {number} is {_kind(message)}, not a {{role, content}} mapping"
        if message.get("role") not in CHAT_ROLES:
            return f"message {number} has role {message.get('role')!r}; a role is one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {number} has {_kind(message.get('content'))} as its 'content', not text"
    return None


def _kind(value) -> str:
    """A value as an error shows it: its type, and its start when it is short text or a number."""
    if value is None:
        return "nothing (null or missing)"
    if isinstance(value, (str, int, float)):
        return f"the {type(value).__name__} {str(value)[:40]!r}"
    return f"a {type(value).__name__}"


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
