"""The built-in reward functions of recipes.rewards.functions on hand-made completions, and how a recipe names them
(the gold `sentiment` among them: a gold reward is any reward-function spec)."""

import pytest

from recipes.errors import RecipeError
from recipes.rewards import functions
from recipes.rewards.functions import LENGTH_TARGET_WORDS, ends_with_punctuation, length, sentiment
from recipes.rewards.sources import Episodes, FunctionSource


def test_sentiment_signs_and_range():
    completions = [
        "I love this bakery, the bread is wonderful and the staff are so kind.",
        "The bus was late again, the driver was rude and I hated every minute.",
        "The kettle is white and holds one litre.",
        "",
    ]
    happy, unhappy, neutral, empty = sentiment(["Write something."] * len(completions), completions)
    assert happy > 0.5
    assert unhappy < -0.5
    assert neutral == 0.0
    assert empty == 0.0
    assert all(-1.0 <= score <= 1.0 for score in (happy, unhappy, neutral, empty))


def test_sentiment_reads_the_completion_not_the_prompt():
    scores = sentiment(["Describe the worst, most awful day of your life."] * 2, ["What a lovely day!", "It rained."])
    assert scores[0] > 0.0
    assert scores[1] == 0.0


def test_sentiment_handles_negation_and_matches_vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    text = "The soup was not bad at all."
    (score,) = sentiment(["Review the soup."], [text])
    assert score > 0.0
    assert score == SentimentIntensityAnalyzer().polarity_scores(text)["compound"]


def test_sentiment_wants_one_prompt_per_completion():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        sentiment(["a", "b"], ["c"])


def test_length_counts_words_up_to_the_target():
    prompts = [""] * 5
    completions = ["", "one", "one two  three\nfour", " ".join(["w"] * LENGTH_TARGET_WORDS), " ".join(["w"] * 40)]
    assert length(prompts, completions) == pytest.approx([0.0, 1 / LENGTH_TARGET_WORDS, 4 / LENGTH_TARGET_WORDS, 1.0,
                                                          1.0])  # fmt: skip


def test_ends_with_punctuation():
    endings = ["Done.", "not done", 'She said "yes!"  ', "", "Really?)", "Wait…", "***", "3.5 km"]
    assert ends_with_punctuation([""] * len(endings), endings) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", functions.__all__)
def test_built_ins_resolve_by_bare_name_and_by_module_path(name):
    function = getattr(functions, name)
    assert FunctionSource.from_spec(name).function is function
    assert FunctionSource.from_spec(f"recipes.rewards.functions:{name}").function is function
    assert FunctionSource.from_spec(name).name == name


def test_the_gold_reward_scores_through_the_one_interface():
    completions = ["What a wonderful, happy day!", "This is terrible and sad."]
    gold = FunctionSource.from_spec("sentiment", "gold_reward")
    scores = gold.score(Episodes(prompts=["p", "q"], completions=completions))
    assert scores.total.tolist() == pytest.approx(sentiment(["p", "q"], completions))
    assert list(scores.by_source) == ["sentiment"]
    happy, sad = scores.total.tolist()
    assert happy > 0.5 and sad < -0.5


@pytest.mark.parametrize("key", ["gold_reward", "eval_reward_functions"])
def test_an_unknown_gold_reward_names_the_field(key):
    with pytest.raises(RecipeError, match=rf"^{key}: module 'recipes.rewards.functions' has no function 'toxicity' "
                                          r"\(not a built-in"):  # fmt: skip
        FunctionSource.from_spec("toxicity", key)
