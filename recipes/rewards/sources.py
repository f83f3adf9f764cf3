"""Reward sources: one interface for every score a run uses, in the PPO rollout, the evaluation, the preference
builder and reward-model training alike.

    source = WeightedSum([(1.0, ModelSource(model, its_tokenizer)), (0.5, FunctionSource.from_spec("length"))])
    scores = source.score(episodes)      # Scores: .total [B] and .by_source {name: [B]}, float32 on the CPU

An `Episodes` batch carries what any source may read: the prompts and completions as text, the prompt as chat
turns, and the policy's own token ids. A function reads the texts; a reward model with its own tokenizer renders
the chat turns with its template (`scored_token_ids`, the same ids its training scored); a reward model sharing the
policy's tokenizer reads the policy's tokens as they were sampled.
"""

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from recipes.errors import RecipeError
from recipes.generation import model_device
from recipes.padding import unused_special_token

# Where `FunctionSource.from_spec` looks up a bare name such as "length".
BUILT_IN_FUNCTIONS_MODULE = "recipes.rewards.functions"

SCORING_BATCH_SIZE = 16
"""Sequences per forward pass when a reward model scores token sequences."""


@dataclass
class Episodes:
    """A batch of B prompts with one completion each, in every form a reward source may read."""

    prompts: list[str]
    """What a reward function reads: the plain prompt, or the last user message of a chat prompt."""
    completions: list[str]
    """Each response as text, special tokens left out, ended at the stop token."""
    conversations: list[list[dict]] | None = None
    """Each prompt as chat turns ({role, content}), for sources that render a chat template; None for plain-text
    prompts (a source then concatenates prompt and completion)."""
    token_ids: torch.Tensor | None = None
    """[B, W + T] the policy's tokens: left-padded prompts, then the responses (ended at the stop token) padded."""
    pad_token_id: int | None = None

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class Scores:
    """What a source gives for a batch: the total it stands for, and each named part unweighted (for logging)."""

    total: torch.Tensor
    by_source: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardSource:
    """Scores episodes: `score(episodes)` → `Scores` with one float32 score per completion, on the CPU."""

    name: str

    def score(self, episodes: Episodes) -> Scores:
        raise NotImplementedError


class FunctionSource(RewardSource):
    """A Python function `(prompts: list[str], completions: list[str]) -> list[float]` (or a tensor [B])."""

    def __init__(self, function: Callable[[list[str], list[str]], Sequence[float]], name: str | None = None):
        self.function = function
        self.name = name or getattr(function, "__name__", "function")

    @classmethod
    def from_spec(cls, spec: str, key: str = "reward_functions") -> "FunctionSource":
        """Imports `spec`: "package.module:function", or the bare name of a built-in of `recipes.rewards.functions`
        ("sentiment", "length", "ends_with_punctuation"). `key` names the recipe field in errors."""
        module_name, colon, function_name = spec.partition(":")
        if not colon:
            module_name, function_name = BUILT_IN_FUNCTIONS_MODULE, spec
        if not module_name or not function_name.isidentifier():
            raise RecipeError(f"{key}: '{spec}' is not of the form 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a missing module, or any error raised while importing it
            raise RecipeError(
                f"{key}: cannot import module '{module_name}' for '{spec}': {type(error).__name__}: {error}"
            ) from error
        function = getattr(module, function_name, None)
        if function is None:
            builtin = " (not a built-in: use 'package.module:function')" if ":" not in spec else ""
            raise RecipeError(f"{key}: module '{module_name}' has no function '{function_name}'{builtin}")
        if not callable(function):
            raise RecipeError(f"{key}: '{spec}' is not callable (its type is {type(function).__name__})")
        return cls(function, name=function_name)

    def score(self, episodes: Episodes) -> Scores:
        try:
            returned = self.function(episodes.prompts, episodes.completions)
        except Exception as error:  # the user's code: whatever it raises is one error line naming the function
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RecipeError(f"reward function '{self.name}' raised {type(error).__name__}: {text}") from error
        try:
            scores = torch.as_tensor(returned, dtype=torch.float32).flatten().cpu()
        except (TypeError, ValueError, RuntimeError) as error:
            raise RecipeError(
                f"reward function '{self.name}' returned {type(returned).__name__} {str(returned)[:60]}, not one "
                f"number per completion"
            ) from error
        if scores.numel() != len(episodes):
            raise RecipeError(
                f"reward function '{self.name}' returned {scores.numel()} scores for {len(episodes)} completions"
            )
        # A NaN or infinite score is passed on: the PPO loop skips and counts such updates (max_nonfinite_updates).
        return Scores(scores, {self.name: scores})


def scored_token_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict]) -> list[int]:
    """The ids a reward model reads for `conversation` (prompt turns, then one assistant turn), in training, PPO and
    evaluation alike: the prompt rendered with the generation prompt, the completion's tokens, EOS. The score is read
    at that EOS, which closes the assistant turn; whatever the template renders after it (a newline for SmolLM2) is
    left out, as a policy's sampled response ends at EOS. Rendered text holds its special tokens, so none are
    added."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids += tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def padded_batches(
    sequences: list[list[int]], pad_id: int, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches: (input_ids [batch, longest], attention_mask [batch, longest], lengths [batch])."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        lengths = torch.tensor([len(ids) for ids in chunk])
        input_ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        yield input_ids.to(device), attention_mask.to(device), lengths.to(device)


@torch.no_grad()
def last_token_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden state a one-label classifier's score head reads for each row: at its last attended token
    (padding may be on either side: positions count from each row's first token). [B, hidden], in the model's
    dtype. The classifier may sit in a DeepSpeed engine or a DDP wrapper (its `module`)."""
    classifier = getattr(model, "module", model)
    attention_mask = attention_mask.bool()
    hidden = getattr(classifier, classifier.base_model_prefix)(
        input_ids=input_ids.masked_fill(~attention_mask, 0),
        attention_mask=attention_mask,
        position_ids=attention_mask.cumsum(1) - attention_mask.long(),
    ).last_hidden_state
    # The last attended token, found from the mask: the classifier's own search goes by its config's pad id,
    # which a tokenizer that pads with EOS would make the wrong position.
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).int().argmax(1)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


@torch.no_grad()
def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A one-label classifier's score of each row, read at its last attended token: float32 [B]."""
    classifier = getattr(model, "module", model)
    return classifier.score(last_token_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


@torch.no_grad()
def sequence_scores(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = SCORING_BATCH_SIZE):
    """A one-label classifier's score of each token sequence, read at its last token: float32 [len(sequences)] on
    the CPU."""
    scores = [
        last_token_scores(model, input_ids, attention_mask).cpu()
        for input_ids, attention_mask, _ in padded_batches(sequences, pad_token_id, batch_size, model_device(model))
    ]
    return torch.cat(scores) if scores else torch.zeros(0)


class ModelSource(RewardSource):
    """A one-label sequence-classification reward model (frozen).

    `tokenizer=None`: it shares the policy's tokenizer and reads the policy's tokens as sampled (the score at the
    response's last token). With its own `tokenizer`: each episode becomes the ids its training scored
    (`scored_token_ids`: the prompt's chat turns rendered with the generation prompt, the completion, EOS) when the
    tokenizer has a chat template, the plain concatenation prompt + completion otherwise."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str = "reward_model",
        batch_size: int = SCORING_BATCH_SIZE,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if tokenizer is not None:
            if tokenizer.chat_template and tokenizer.eos_token is None:
                raise RecipeError(f"{name}: the reward model's tokenizer has no EOS token to close the assistant turn")
            if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
                # Padding must be told apart from the EOS that closes each completion.
                tokenizer.pad_token = unused_special_token(tokenizer)

    def token_ids(self, prompt: str, completion: str, conversation: list[dict] | None = None) -> list[int]:
        """The ids the reward model reads for one completion (own tokenizer)."""
        if self.tokenizer.chat_template:
            turns = conversation or [{"role": "user", "content": prompt}]
            return scored_token_ids(self.tokenizer, [*turns, {"role": "assistant", "content": completion}])
        return self.tokenizer(prompt + completion)["input_ids"]

    def score(self, episodes: Episodes) -> Scores:
        if self.tokenizer is None:
            if episodes.token_ids is None:
                raise ValueError(f"{self.name} reads the policy's tokens, which these episodes do not carry")
            scores = []
            for start in range(0, len(episodes), self.batch_size):
                rows = episodes.token_ids[start : start + self.batch_size].to(model_device(self.model))
                scores.append(last_token_scores(self.model, rows, rows != episodes.pad_token_id).cpu())
            total = torch.cat(scores)
        else:
            conversations = episodes.conversations or [None] * len(episodes)
            sequences = [
                self.token_ids(prompt, completion, conversation)
                for prompt, completion, conversation in zip(
                    episodes.prompts, episodes.completions, conversations, strict=True
                )
            ]
            total = sequence_scores(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size)
        return Scores(total, {self.name: total})


class WeightedSum(RewardSource):
    """Σ weight × source. Each part's unweighted scores are reported under its name; parts with the same name are
    told apart by a suffix (`length`, `length_2`)."""

    def __init__(self, parts: Sequence[tuple[float, RewardSource]], name: str = "weighted_sum"):
        if not parts:
            raise RecipeError("a weighted sum of reward sources needs at least one source")
        self.name = name
        self.weights = [float(weight) for weight, _ in parts]
        self.parts = [source for _, source in parts]
        self.part_names = unique_names([source.name for source in self.parts])

    def score(self, episodes: Episodes) -> Scores:
        total = torch.zeros(len(episodes))
        by_source = {}
        for weight, name, source in zip(self.weights, self.part_names, self.parts):
            part = source.score(episodes).total
            by_source[name] = part
            total = total + weight * part
        return Scores(total, by_source)


def unique_names(names: list[str]) -> list[str]:
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate in unique:
            count += 1
            candidate = f"{name}_{count}"
        unique.append(candidate)
    return unique
