"""The gold reward functions of reward_models.gold on hand-made completions."""

import pytest

from recipes.errors import RecipeError
from reward_models import GOLD_REWARDS, gold_reward, sentiment


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


def test_gold_reward_registry():
    assert gold_reward("sentiment") is sentiment
    assert set(GOLD_REWARDS) >= {"sentiment"}
    with pytest.raises(RecipeError, match="gold_reward: unknown gold reward 'toxicity'"):
        gold_reward("toxicity")
