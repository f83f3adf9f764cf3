"""Prompt loading with the real SmolLM2 tokenizer: file formats, chat rendering, length filtering, the pad token, the
columns reward sources read (`prompt`, `messages`) and the left-padded batches of `collate_prompts`."""

import json

import pytest
import torch
from conftest import PROMPTS, write_prompt_files
from datasets import Dataset
from transformers import AutoTokenizer

from recipes import DataArguments, ModelArguments, RecipeError
from recipes.data import (
    PromptBatch,
    collate_prompts,
    load_prompts,
    load_raw_prompts,
    prompt_conversations,
    prompt_texts,
    reward_prompts,
    tokenize_prompts,
)
from recipes.models import load_tokenizer

GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"])))


def test_pad_token_differs_from_eos(tiny_models, tokenizer):
    # SmolLM2's own tokenizer pads with its EOS token; PPO would then mask EOS out of the loss and the reward.
    raw = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert raw.pad_token_id == raw.eos_token_id
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token not in (tokenizer.eos_token, tokenizer.bos_token)
    assert tokenizer.pad_token not in tokenizer.chat_template
    assert tokenizer.padding_side == "left"


def test_explicit_pad_token_is_used(tiny_models):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"]), pad_token="<|endoftext|>"))
    assert tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("pad_token, message", [("<no-such-token>", "not in the tokenizer's vocabulary"),
                                                ("<|im_end|>", "must differ from the EOS token")])  # fmt: skip
def test_unusable_pad_token_is_refused(tiny_models, pad_token, message):
    with pytest.raises(RecipeError, match=rf"pad_token: .*{message}"):
        load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"]), pad_token=pad_token))


@pytest.mark.parametrize("file_format", ["jsonl", "csv", "parquet"])
def test_prompt_files_load_and_split(prompt_files, tokenizer, file_format):
    data_args = DataArguments(dataset_name=str(prompt_files[file_format]))
    raw = load_raw_prompts(data_args, seed=42)
    assert (len(raw["train"]), len(raw["eval"])) == (10, 2)  # 10% of 12 held out, rounded up
    assert sorted([*raw["train"]["prompt"], *raw["eval"]["prompt"]]) == sorted(PROMPTS)

    prompts = load_prompts(data_args, tokenizer, seed=42)
    assert prompts.dropped_too_long == {"train": 0, "eval": 0}
    expected = tokenizer(list(raw["train"]["prompt"]))["input_ids"]
    assert list(prompts.train["input_ids"]) == expected
    assert prompts.train.column_names == ["input_ids", "prompt", "messages"]
    # Each row keeps its own text beside its ids: what reward functions read.
    assert list(prompts.train["prompt"]) == list(raw["train"]["prompt"])


def test_split_is_the_same_for_every_file_format(prompt_files):
    splits = {
        file_format: list(
            load_raw_prompts(DataArguments(dataset_name=str(prompt_files[file_format])), seed=7)["eval"]["prompt"]
        )
        for file_format in ("jsonl", "csv", "parquet")
    }
    assert splits["jsonl"] == splits["csv"] == splits["parquet"]


def test_chat_messages_are_rendered_with_the_generation_prompt(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["messages"]))
    raw = load_raw_prompts(data_args, seed=42)
    texts = prompt_texts(raw["train"], data_args, tokenizer)
    for text, messages in zip(texts, raw["train"]["messages"]):
        assert text.endswith(GENERATION_PROMPT)
        assert f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n" in text
    prompts = load_prompts(data_args, tokenizer, seed=42)
    # The rendered text already holds its special tokens: the ids decode back to it exactly, nothing added.
    decoded = [tokenizer.decode(ids) for ids in prompts.train["input_ids"]]
    assert decoded == texts
    suffix = tokenizer(GENERATION_PROMPT, add_special_tokens=False)["input_ids"]
    assert prompts.train["input_ids"][0][-len(suffix) :] == suffix


def test_plain_prompts_as_user_messages_match_chat_messages(prompt_files, tokenizer):
    as_messages = load_prompts(DataArguments(dataset_name=str(prompt_files["messages"])), tokenizer, seed=1)
    as_user = load_prompts(
        DataArguments(dataset_name=str(prompt_files["jsonl"]), prompt_as_user_message=True), tokenizer, seed=1
    )
    assert list(as_user.train["input_ids"]) == list(as_messages.train["input_ids"])
    assert tokenizer.decode(as_user.eval["input_ids"][0]).endswith(GENERATION_PROMPT)


def test_long_prompts_are_dropped_and_counted_never_truncated(tokenizer):
    words = ["good", "bad", "great", "awful", "fine"]
    texts = [" ".join(words[: n % 5 + 1] * (n // 5 + 1)) for n in range(20)]
    full = tokenizer(texts)["input_ids"]
    limit = 6
    long_count = sum(len(ids) > limit for ids in full)
    assert 0 < long_count < len(texts)  # the data straddles the limit

    data_args = DataArguments(dataset_name="inline", max_prompt_length=limit)
    kept, dropped = tokenize_prompts(Dataset.from_dict({"prompt": texts}), data_args, tokenizer)
    assert dropped == long_count
    assert list(kept["input_ids"]) == [ids for ids in full if len(ids) <= limit]


def test_load_prompts_reports_drops_per_split(tmp_path, tokenizer):
    long_prompt = "This prompt is far too long for the limit " * 4
    files = write_prompt_files(tmp_path, PROMPTS + [long_prompt] * 8)
    data_args = DataArguments(dataset_name=str(files["jsonl"]), max_prompt_length=16, eval_fraction=0.25)
    prompts = load_prompts(data_args, tokenizer, seed=3)
    assert sum(prompts.dropped_too_long.values()) == 8
    assert len(prompts.train) + len(prompts.eval) == len(PROMPTS)
    assert all(len(ids) <= 16 for ids in [*prompts.train["input_ids"], *prompts.eval["input_ids"]])
    described = prompts.describe(16)
    assert f"{prompts.dropped_too_long['train']} train, {prompts.dropped_too_long['eval']} eval" in described


def test_nothing_left_after_filtering_is_an_error(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["jsonl"]), max_prompt_length=1)
    with pytest.raises(RecipeError, match=r"no train prompts left after dropping 10 longer than 1 tokens"):
        load_prompts(data_args, tokenizer, seed=0)


def test_max_prompt_counts_limit_the_splits(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["jsonl"]), max_train_prompts=4, max_eval_prompts=1)
    prompts = load_prompts(data_args, tokenizer, seed=0)
    assert (len(prompts.train), len(prompts.eval)) == (4, 1)


def test_test_split_of_a_folder_is_used_for_evaluation(tmp_path, tokenizer):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:9]))
    (folder / "test.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[9:]))
    raw = load_raw_prompts(DataArguments(dataset_name=str(folder)), seed=0)
    assert list(raw["train"]["prompt"]) == PROMPTS[:9]
    assert list(raw["eval"]["prompt"]) == PROMPTS[9:]


def test_missing_column_is_named(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["jsonl"]), prompt_column="text")
    with pytest.raises(RecipeError, match=r"neither a 'text' column \(prompt_column\) nor a 'messages' column"):
        load_prompts(data_args, tokenizer, seed=0)


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(RecipeError, match=rf"dataset_name: data file not found: {missing}"):
        load_raw_prompts(DataArguments(dataset_name=str(missing)), seed=0)


# --- the columns reward sources read ---------------------------------------------------------------------------


CHATS = [
    [{"role": "user", "content": "Tell me about your day."}],
    [
        {"role": "system", "content": "You are cheerful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How was the film?"},
    ],
]


def test_plain_prompts_keep_their_text_and_no_conversation(tokenizer):
    data_args = DataArguments(dataset_name="inline")
    tokenized, dropped = tokenize_prompts(Dataset.from_dict({"prompt": PROMPTS[:3]}), data_args, tokenizer)
    assert dropped == 0
    assert list(tokenized["prompt"]) == PROMPTS[:3]
    assert list(tokenized["messages"]) == [[], [], []]  # no chat turns: a reward model reads prompt + completion
    assert list(tokenized["input_ids"]) == tokenizer(PROMPTS[:3])["input_ids"]


def test_prompts_as_user_messages_keep_the_plain_text_and_one_user_turn(tokenizer):
    data_args = DataArguments(dataset_name="inline", prompt_as_user_message=True)
    tokenized, _ = tokenize_prompts(Dataset.from_dict({"prompt": PROMPTS[:3]}), data_args, tokenizer)
    # The policy continues the rendered chat; reward functions read the bare prompt, reward models the turn.
    assert list(tokenized["prompt"]) == PROMPTS[:3]
    assert list(tokenized["messages"]) == [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    for ids, prompt in zip(tokenized["input_ids"], PROMPTS[:3]):
        text = tokenizer.decode(ids)
        assert f"<|im_start|>user\n{prompt}<|im_end|>\n" in text and text.endswith(GENERATION_PROMPT)


def test_chat_prompts_keep_their_turns_and_the_last_user_message(tokenizer):
    dataset = Dataset.from_dict({"messages": CHATS})
    data_args = DataArguments(dataset_name="inline")
    assert reward_prompts(dataset, data_args) == ["Tell me about your day.", "How was the film?"]
    assert prompt_conversations(dataset, data_args) == CHATS
    tokenized, _ = tokenize_prompts(dataset, data_args, tokenizer)
    assert list(tokenized["prompt"]) == ["Tell me about your day.", "How was the film?"]
    assert list(tokenized["messages"]) == CHATS
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    assert [tokenizer.decode(ids) for ids in tokenized["input_ids"]] == rendered


def test_a_chat_without_a_user_turn_gives_an_empty_reward_prompt():
    dataset = Dataset.from_dict({"messages": [[{"role": "system", "content": "Say something."}]]})
    assert reward_prompts(dataset, DataArguments(dataset_name="inline")) == [""]


def test_dropped_prompts_take_their_text_and_turns_with_them(tokenizer):
    """Rows stay aligned when long prompts are dropped: each kept row's text and turns are its own."""
    texts = ["short one", "a much longer prompt " * 10, "short two"]
    chats = [[{"role": "user", "content": t}] for t in texts]
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit
    data_args = DataArguments(dataset_name="inline", prompt_as_user_message=True, max_prompt_length=limit)
    tokenized, dropped = tokenize_prompts(Dataset.from_dict({"prompt": texts}), data_args, tokenizer)
    assert dropped == 1
    assert list(tokenized["prompt"]) == ["short one", "short two"]
    assert [m[0]["content"] for m in tokenized["messages"]] == ["short one", "short two"]
    assert [tokenizer.decode(ids).count("short") for ids in tokenized["input_ids"]] == [1, 1]


def test_loaded_chat_prompts_carry_their_messages(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["messages"]))
    raw = load_raw_prompts(data_args, seed=42)
    prompts = load_prompts(data_args, tokenizer, seed=42)
    assert list(prompts.eval["messages"]) == list(raw["eval"]["messages"])
    assert list(prompts.eval["prompt"]) == [m[0]["content"] for m in raw["eval"]["messages"]]


# --- batches ---------------------------------------------------------------------------------------------------


def test_collate_prompts_left_pads_with_the_pad_id(tokenizer):
    data_args = DataArguments(dataset_name="inline", prompt_as_user_message=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[10]]
    tokenized, _ = tokenize_prompts(Dataset.from_dict({"prompt": prompts}), data_args, tokenizer)
    rows = list(tokenized)
    lengths = [len(row["input_ids"]) for row in rows]
    assert len(set(lengths)) == 3  # different lengths: the padding shows
    pad = tokenizer.pad_token_id
    batch = collate_prompts(rows, pad)
    assert isinstance(batch, PromptBatch)
    assert batch.input_ids.shape == (3, max(lengths)) and batch.input_ids.dtype == torch.long
    for row, ids, length in zip(batch.input_ids, tokenized["input_ids"], lengths):
        width = max(lengths) - length
        assert row[:width].tolist() == [pad] * width
        assert row[width:].tolist() == ids
        assert pad not in ids
    assert batch.prompts == prompts
    assert batch.conversations == [[{"role": "user", "content": p}] for p in prompts]


def test_collate_prompts_without_chat_turns_has_no_conversations(tokenizer):
    data_args = DataArguments(dataset_name="inline")
    tokenized, _ = tokenize_prompts(Dataset.from_dict({"prompt": PROMPTS[:2]}), data_args, tokenizer)
    batch = collate_prompts(list(tokenized), pad_token_id=7)
    assert batch.conversations is None
    assert batch.prompts == PROMPTS[:2]
    shorter = min(range(2), key=lambda i: len(tokenized[i]["input_ids"]))
    gap = batch.input_ids.shape[1] - len(tokenized[shorter]["input_ids"])
    assert gap > 0 and batch.input_ids[shorter, :gap].tolist() == [7] * gap
