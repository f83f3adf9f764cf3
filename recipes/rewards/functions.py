"""Built-in reward functions, named in a recipe by their bare name (or as `recipes.rewards.functions:<name>`):

    reward_functions: [sentiment, length, ends_with_punctuation]

Each has the signature of every reward function, `(prompts: list[str], completions: list[str]) -> list[float]`:
one score per completion, judged with its prompt (these three ignore the prompt). `sentiment` is the default task's
gold reward: it labels the preference pairs a proxy reward model learns from, and measures what PPO achieved.
"""

from functools import cache

from recipes.errors import RecipeError

__all__ = ["ends_with_punctuation", "length", "sentiment"]

LENGTH_TARGET_WORDS = 20
"""`length` gives full marks from this many words on."""

SENTENCE_ENDINGS = ".!?…"
CLOSING_MARKS = "\"'”’)]*"
"""Closing quotes, brackets and emphasis that may follow a sentence's final mark."""


@cache
def _vader():
    # Loading VADER's lexicon takes a moment; one analyser serves every call.
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise RecipeError("reward function 'sentiment' needs vaderSentiment: pip install 'ppo-recipes[demo]'") from error
    return SentimentIntensityAnalyzer()


def sentiment(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER's compound score of each completion, in [-1, 1]: -1 most negative, 0 neutral (or empty), +1 most
    positive. The prompt is ignored: the task is to answer any request in a positive tone."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    analyser = _vader()
    return [analyser.polarity_scores(completion)["compound"] for completion in completions]


def length(prompts: list[str], completions: list[str]) -> list[float]:
    """min(1, words / LENGTH_TARGET_WORDS), in [0, 1]: words are whitespace-separated. With a negative weight,
    a reward for brevity."""
    return [min(1.0, len(completion.split()) / LENGTH_TARGET_WORDS) for completion in completions]


def ends_with_punctuation(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion (trailing whitespace ignored) ends a sentence (`.`, `!`, `?`, `…`, possibly inside
    closing quotes or brackets), 0.0 otherwise: a format check for responses cut off mid-sentence."""
    return [float(_ends_sentence(completion)) for completion in completions]


def _ends_sentence(text: str) -> bool:
    text = text.rstrip().rstrip(CLOSING_MARKS)
    return bool(text) and text[-1] in SENTENCE_ENDINGS
