"""Prompt loading with the real SmolLM2 tokenizer: file formats, chat rendering, length filtering, the pad token."""

import json

import pytest
from conftest import PROMPTS, write_prompt_files
from datasets import Dataset
from transformers import AutoTokenizer

from recipes import DataArguments, ModelArguments, RecipeError
from recipes.data import load_prompts, load_raw_prompts, prompt_texts, tokenize_prompts
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
    assert prompts.train.column_names == ["input_ids"]


def test_split_is_the_same_for_every_file_format(prompt_files):
    splits = {
        file_format: list(load_raw_prompts(DataArguments(dataset_name=str(prompt_files[file_format])), seed=7)["eval"]["prompt"])
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
