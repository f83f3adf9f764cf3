"""The kit's sentiment prompt set: deterministic, held-out subjects never in train, short, and the committed files
are what the generator writes."""

import json

import pytest
from transformers import AutoTokenizer

from recipes.errors import RecipeError
from recipes.model_cache import resolve_model_path
from recipes.sentiment_prompts import KINDS, sentiment_prompt_splits, write_prompt_splits
from recipes.tiny_models import DEFAULT_TOKENIZER

from conftest import REPO_ROOT

PROMPT_DIR = REPO_ROOT / "data" / "sentiment_prompts"


def _subject_of(prompt: str) -> str:
    """The subject a prompt was made from: the one (template, subject) of the generator that gives it."""
    made_from = {
        s for kind in KINDS.values() for t in kind.templates for s in kind.subjects if t.format(subject=s) == prompt
    }
    assert len(made_from) == 1, prompt
    return made_from.pop()


def test_committed_prompt_files_are_the_generators_output(tmp_path):
    write_prompt_splits(tmp_path, sentiment_prompt_splits())
    for name in ("train.jsonl", "test.jsonl"):
        assert (PROMPT_DIR / name).read_text() == (tmp_path / name).read_text()


def test_splits_are_deterministic_distinct_and_subject_disjoint():
    splits = sentiment_prompt_splits(seed=0)
    assert splits == sentiment_prompt_splits(seed=0)
    assert splits != sentiment_prompt_splits(seed=1)
    assert (len(splits.train), len(splits.test)) == (400, 100)
    assert len(set(splits.train)) == 400 and len(set(splits.test)) == 100
    # Subjects are held out whole: no test prompt's subject is in a training prompt.
    assert not {_subject_of(p) for p in splits.test} & {_subject_of(p) for p in splits.train}


def test_prompts_are_short():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_TOKENIZER))
    for name in ("train.jsonl", "test.jsonl"):
        prompts = [json.loads(line)["prompt"] for line in (PROMPT_DIR / name).read_text().splitlines()]
        assert max(len(tokenizer(p)["input_ids"]) for p in prompts) < 30


def test_asking_for_more_prompts_than_exist_is_an_error():
    with pytest.raises(RecipeError, match="test_size: 5000 is more than"):
        sentiment_prompt_splits(test_size=5000)
