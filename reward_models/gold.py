"""Gold reward functions: programmatic scores that stand in for human judgement. They label the preference pairs
a reward model learns from, and measure what a PPO run really achieved.

Every gold function has the same signature, `(prompts, completions) -> scores`: one float per completion, the
completion judged in the context of its prompt (a function may ignore the prompt).
"""

from collections.abc import Callable
from functools import cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from recipes.errors import RecipeError

GoldReward = Callable[[list[str], list[str]], list[float]]


@cache
def _vader() -> SentimentIntensityAnalyzer:
    # Loading VADER's lexicon takes a moment; one analyser serves every call.
    return SentimentIntensityAnalyzer()


def sentiment(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER's compound score of each completion, in [-1, 1]: -1 most negative, 0 neutral (or empty), +1 most
    positive. The prompt is ignored: the task is to answer any request in a positive tone."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    analyser = _vader()
    return [analyser.polarity_scores(completion)["compound"] for completion in completions]


GOLD_REWARDS: dict[str, GoldReward] = {
    "sentiment": sentiment,
}


def gold_reward(name: str) -> GoldReward:
    """The gold function registered as `name` (the recipe key `gold_reward`)."""
    if name not in GOLD_REWARDS:
        raise RecipeError(f"gold_reward: unknown gold reward '{name}'; known: {', '.join(sorted(GOLD_REWARDS))}")
    return GOLD_REWARDS[name]
