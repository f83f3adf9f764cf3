"""Preference pairs in the shapes they are published in, read by reward-model training: TRL's preference formats
(chat messages or plain text, with a `prompt` column or with the prompt implicit in both sides) and Anthropic's
HH-RLHF dialogue strings. The fixtures under tests/data/preferences/ hold the same four pairs in each shape, written by
hand after the published layouts (trl-lib/ultrafeedback_binarized's implicit-prompt conversations with scores; TRL's
documented explicit-prompt and plain-text examples; Anthropic/hh-rlhf's `{train,test}.jsonl(.gz)` with whole dialogues
in `chosen`/`rejected`, here with one multi-turn row more). Every shape must give the token ids of the kit's own
conversational pairs; a malformed row is one error line naming the file, the row and the column."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

from recipes.config import ModelArguments
from recipes.errors import RecipeError
from recipes.models import load_tokenizer
from recipes.rewards.sources import scored_token_ids
from reward_models.config import PreferenceDataArguments
from reward_models.training import load_preference_pairs, pair_shape, tokenize_pairs

from conftest import REPO_ROOT, run_python

DATA = REPO_ROOT / "tests" / "data" / "preferences"
TINY_REWARD_RECIPE = REPO_ROOT / "configs" / "tiny" / "reward.yaml"
SHAPES = {
    "trl_conversational_implicit.jsonl": "messages",
    "trl_conversational_prompt.jsonl": "messages",
    "trl_text_prompt.jsonl": "text",
    "trl_text_implicit.jsonl": "implicit text",
}
MULTI_TURN_PROMPT = [
    {"role": "user", "content": "I want to start running. Where do I begin?"},
    {"role": "assistant", "content": "Start with short runs mixed with walking, three times a week."},
    {"role": "user", "content": "How long should each run be?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"])))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The four pairs as the kit's own conversational rows (prompt as one user turn) give them."""
    rows = read_rows(DATA / "trl_conversational_prompt.jsonl")
    return [
        (scored_token_ids(tokenizer, row["prompt"] + row["chosen"]),
         scored_token_ids(tokenizer, row["prompt"] + row["rejected"]))
        for row in rows
    ]  # fmt: skip


def as_pairs(tokenized: Dataset) -> list[tuple[list[int], list[int]]]:
    return list(zip(tokenized["chosen_ids"], tokenized["rejected_ids"]))


@pytest.mark.parametrize("name", SHAPES)
def test_each_trl_shape_gives_the_conversational_token_ids(name, tokenizer):
    dataset = Dataset.from_json(str(DATA / name))
    assert pair_shape(dataset, name) == SHAPES[name]
    assert as_pairs(tokenize_pairs(dataset, tokenizer, name)) == expected_pairs(tokenizer)


def test_hh_rlhf_dialogues_split_into_prompt_turns_and_the_final_reply(tokenizer):
    dataset = Dataset.from_json(str(DATA / "hh_rlhf" / "train.jsonl"))
    assert pair_shape(dataset, "hh") == "hh-rlhf dialogue"
    pairs = as_pairs(tokenize_pairs(dataset, tokenizer, "hh"))
    assert pairs[:4] == expected_pairs(tokenizer)
    multi_turn = (
        scored_token_ids(tokenizer, [*MULTI_TURN_PROMPT, {"role": "assistant", "content": "Twenty minutes is plenty "
                                                          "at first; add a few minutes each week."}]),
        scored_token_ids(tokenizer, [*MULTI_TURN_PROMPT, {"role": "assistant", "content": "Run a marathon on the "
                                                          "first day."}]),
    )  # fmt: skip
    assert pairs[4] == multi_turn


def test_hh_rlhf_folder_as_published_loads_its_splits(tokenizer, tmp_path):
    """The published layout: a folder of gzipped `train.jsonl.gz` and `test.jsonl.gz` (e.g. helpful-base/)."""
    folder = tmp_path / "helpful-base"
    folder.mkdir()
    for split in ("train", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wb") as file:
            file.write((DATA / "hh_rlhf" / f"{split}.jsonl").read_bytes())
    pairs = load_preference_pairs(PreferenceDataArguments(dataset_name=str(folder)), tokenizer, seed=0, max_length=None)
    assert (len(pairs.train), len(pairs.eval)) == (5, 2)


def broken_copy(source: Path, folder: Path, row_number: int, change) -> Path:
    """`source` copied into `folder` with row `row_number` (from 1) changed by `change(row)`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = read_rows(source)
    change(rows[row_number - 1])
    target = folder / source.name
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def replace_value(column, value):
    def change(row):
        row[column] = value

    return change


MALFORMED = {
    "hh reply missing": (
        "hh_rlhf/train.jsonl", 3, "rejected",
        replace_value("rejected", "\n\nHuman: Can you explain what a leap year is?"),
        "must end with an '\\n\\nAssistant:' turn",
    ),
    "hh text before the dialogue": (
        "hh_rlhf/train.jsonl", 2, "chosen",
        replace_value("chosen", "Note\n\nHuman: What is a good name for a grey cat?\n\nAssistant: Smokey."),
        "text before the first",
    ),
    "hh different prompts": (
        "hh_rlhf/train.jsonl", 1, "chosen'/'rejected",
        replace_value("rejected", "\n\nHuman: Something else?\n\nAssistant: Yes."),
        "different prompt turns",
    ),
    "message without content": (
        "trl_conversational_implicit.jsonl", 2, "chosen",
        replace_value("chosen", [{"role": "user", "content": "What is a good name for a grey cat?"},
                                 {"role": "assistant", "text": "Smokey."}]),
        "message 2 is not a {role, content} pair",
    ),
    "conversation ending with the user": (
        "trl_conversational_prompt.jsonl", 4, "rejected",
        replace_value("rejected", [{"role": "user", "content": "Anything?"}]),
        "must end with an assistant turn",
    ),
    "text prompt missing": ("trl_text_prompt.jsonl", 3, "prompt", replace_value("prompt", None), "NoneType"),
    "implicit prompt not shared": (
        "trl_text_implicit.jsonl", 4, "chosen'/'rejected",
        replace_value("rejected", "Completely different text."),
        "no shared start",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_row_names_file_row_and_column(case, tokenizer, tmp_path):
    name, row_number, column, change, message = MALFORMED[case]
    path = broken_copy(DATA / name, tmp_path / Path(name).parent, row_number, change)
    with pytest.raises(RecipeError) as error:
        tokenize_pairs(Dataset.from_json(str(path)), tokenizer, f"dataset_name: {path}")
    columns = "columns" if "/" in column else "column"
    assert f"dataset_name: {path}, row {row_number}, {columns} '{column}'" in str(error.value)
    assert message in str(error.value)


@pytest.mark.slow
def test_train_reward_script_on_hh_rlhf_and_on_a_malformed_file(tiny_models, tmp_path):
    """The script trains on the published shape; a malformed row in the test split's file is one error line naming
    that file, row and column, before anything is written."""
    flags = ["--config", str(TINY_REWARD_RECIPE), "--model_name_or_path", str(tiny_models["policy"])]
    output_dir = tmp_path / "reward_model"
    result = run_python(["scripts/train_reward.py", *flags, "--dataset_name", str(DATA / "hh_rlhf"),
                         "--output_dir", str(output_dir)], cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs: 5 train, 2 validation" in result.stdout
    assert (output_dir / "model.safetensors").is_file()

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(DATA / "hh_rlhf" / "train.jsonl", broken / "train.jsonl")
    test_file = broken_copy(DATA / "hh_rlhf" / "test.jsonl", broken, 2, replace_value("chosen", "\n\nHuman: Hi"))
    refused_dir = tmp_path / "refused"
    result = run_python(["scripts/train_reward.py", *flags, "--dataset_name", str(broken),
                         "--output_dir", str(refused_dir)], cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: dataset_name: {test_file}, row 2, column 'chosen': the dialogue must end with an "
        "'\\n\\nAssistant:' turn"
    )
    assert not refused_dir.exists()


def test_row_of_a_share_drawn_by_eval_fraction_says_it_counts_in_drawn_order(tokenizer, tmp_path):
    path = broken_copy(DATA / "trl_text_prompt.jsonl", tmp_path, 3, replace_value("prompt", None))
    with pytest.raises(RecipeError, match=rf"dataset_name: {path} \(its (training|validation) share drawn by "
                       r"eval_fraction; rows counted in drawn order\), row \d, column 'prompt'"):  # fmt: skip
        load_preference_pairs(PreferenceDataArguments(dataset_name=str(path)), tokenizer, seed=0, max_length=None)
