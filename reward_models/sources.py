"""Reward sources: prompts and completions in, one score per completion out, whatever is behind the score.

    source = WeightedSum([(1.0, ModelSource(model, its_tokenizer)), (0.5, FunctionSource.from_spec("length"))])
    scores = source(prompts, completions)          # tensor [batch]

TRL's PPOTrainer scores rollouts only through a sequence-classification model called on the policy's token ids
(`get_reward(model, query_responses, pad_token_id, context_length)`). `RewardSourceModel` presents any source
as such a model: it decodes the policy's tokens back to text, calls the source, and hands TRL the scores. TRL's
training loop is used unchanged.
"""

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from recipes.errors import RecipeError
from recipes.padding import unused_special_token

# Where `FunctionSource.from_spec` looks up a bare name such as "length".
BUILT_IN_FUNCTIONS_MODULE = "reward_models.functions"

SCORING_BATCH_SIZE = 16
"""Sequences per forward pass when a reward model scores token sequences."""


def scored_token_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict]) -> list[int]:
    """The ids a reward model reads for `conversation` (prompt turns, then one assistant turn), in training and in
    PPO alike: the prompt rendered with the generation prompt, the completion's tokens, EOS. The score is read at
    that EOS, which closes the assistant turn; whatever the template renders after it (a newline for SmolLM2) is
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
def sequence_scores(
    model: PreTrainedModel, sequences: list[list[int]], batch_size: int = SCORING_BATCH_SIZE
) -> torch.Tensor:
    """A one-label sequence classifier's score of each token sequence, read at its last token (the classifier
    finds it as the last one that is not `config.pad_token_id`): float32 [len(sequences)]."""
    model.eval()
    scores = []
    for input_ids, attention_mask, _ in padded_batches(sequences, model.config.pad_token_id, batch_size, model.device):
        scores.append(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


class RewardSource(nn.Module):
    """Scores completions: `source(prompts, completions)` → float tensor [batch], one score per completion.

    A module so that the models a source holds follow the trainer's `.to(device)` and `.eval()`."""

    name: str

    def forward(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def last_scores_by_part(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """For logging: the unweighted scores of each named part in the call that returned `scores`."""
        return {self.name: scores}


class FunctionSource(RewardSource):
    """A Python function `(prompts: list[str], completions: list[str]) -> list[float]` (or a tensor [batch])."""

    def __init__(self, function: Callable[[list[str], list[str]], Sequence[float]], name: str | None = None):
        super().__init__()
        self.function = function
        self.name = name or getattr(function, "__name__", "function")

    @classmethod
    def from_spec(cls, spec: str, key: str = "reward_functions") -> "FunctionSource":
        """Imports `spec`: "package.module:function", or the bare name of a built-in of `reward_models.functions`
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

    def forward(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        scores = torch.as_tensor(self.function(prompts, completions), dtype=torch.float32).flatten()
        if scores.numel() != len(completions):
            raise RecipeError(
                f"reward function '{self.name}' returned {scores.numel()} scores for {len(completions)} completions"
            )
        # A NaN or infinite score is passed on: the PPO loop skips and counts such updates (max_nonfinite_updates).
        return scores


class ModelSource(RewardSource):
    """A one-label sequence-classification reward model with its own tokenizer. Each (prompt, completion) becomes
    the ids the kit's reward training shows a model (`scored_token_ids`: [user: prompt] rendered with the
    generation prompt, the completion, EOS) when the tokenizer has a chat template, the plain concatenation
    prompt + completion otherwise; they are scored in batches of `batch_size`. Load the model quantized
    (recipes.models) to score in 8 or 4 bits."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str = "reward_model",
        batch_size: int = SCORING_BATCH_SIZE,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if tokenizer.chat_template and tokenizer.eos_token is None:
            raise RecipeError(f"{name}: the reward model's tokenizer has no EOS token to close the assistant turn")
        if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            # The classifier reads its score at the last token that is not padding: padding with EOS would read
            # it before the EOS that closes each completion.
            tokenizer.pad_token = unused_special_token(tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id

    def token_ids(self, prompt: str, completion: str) -> list[int]:
        """The ids the reward model reads for one completion."""
        if self.tokenizer.chat_template:
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return scored_token_ids(self.tokenizer, conversation)
        return self.tokenizer(prompt + completion)["input_ids"]

    def forward(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        sequences = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        return sequence_scores(self.model, sequences, self.batch_size)


class WeightedSum(RewardSource):
    """Σ weight × source(prompts, completions). Keeps each part's unweighted scores of the last call for logging;
    parts with the same name are told apart by a suffix (`length`, `length_2`)."""

    def __init__(self, parts: Sequence[tuple[float, RewardSource]], name: str = "weighted_sum"):
        super().__init__()
        if not parts:
            raise RecipeError("a weighted sum of reward sources needs at least one source")
        self.name = name
        self.weights = [float(weight) for weight, _ in parts]
        self.parts = nn.ModuleList(source for _, source in parts)
        self.part_names = _unique_names([source.name for source in self.parts])
        self.last_scores: dict[str, torch.Tensor] = {}

    def forward(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        total = torch.zeros(len(completions))
        self.last_scores = {}
        for weight, name, source in zip(self.weights, self.part_names, self.parts):
            self.last_scores[name] = source(prompts, completions).float().cpu()
            total += weight * self.last_scores[name]
        return total

    def last_scores_by_part(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.last_scores)


def _unique_names(names: list[str]) -> list[str]:
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate in unique:
            count += 1
            candidate = f"{name}_{count}"
        unique.append(candidate)
    return unique


@dataclass
class ScoringContext:
    """What `RewardSourceModel` cannot see in its inputs, set by the trainer for each batch of prompts it draws."""

    prompt_width: int | None = None
    """Columns of the batch's left-padded prompt block: TRL's `context_length`, where the completions start."""
    training: bool = True
    """Whether the batch is a training batch (its scores are logged) or an evaluation batch."""


class PolicyTextDecoder:
    """Turns rows of the policy's tokens back into the (prompt, completion) texts a reward source reads.

    The completion is decoded without special tokens (an EOS is dropped). The prompt is the original prompt text
    when it can be recovered: a plain prompt is decoded without special tokens; a prompt rendered as one user turn
    with the policy's chat template (`prompt_as_user_message`) gives back the user's text. Any other rendered
    conversation (a multi-turn `messages` prompt) is handed over as the rendered text, special tokens included."""

    # Stands in for the user's text when the chat template is rendered once to find what surrounds it.
    _PLACEHOLDER = "PROMPT_PLACEHOLDER_b7f3"

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) - {tokenizer.bos_token_id}
        self.special_tokens = [t for t in tokenizer.all_special_tokens if t != tokenizer.bos_token]
        self.user_turn = self._user_turn_frame()

    def _user_turn_frame(self) -> tuple[str, str] | None:
        """(text before, text after) the user's message in a one-turn prompt rendered with the generation prompt;
        None without a chat template or when the template does not render a placeholder verbatim."""
        if not self.tokenizer.chat_template:
            return None
        try:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": self._PLACEHOLDER}], add_generation_prompt=True, tokenize=False
            )
        except Exception:  # templates raise anything (jinja errors, their own exceptions) on an unusual turn
            return None
        if not isinstance(rendered, str) or rendered.count(self._PLACEHOLDER) != 1:
            return None
        before, after = rendered.split(self._PLACEHOLDER)
        return before, after

    def prompt(self, ids: list[int]) -> str:
        rendered = self.tokenizer.decode(ids, skip_special_tokens=False)
        if self.user_turn is not None:
            before, after = self.user_turn
            if rendered.startswith(before) and rendered.endswith(after) and len(rendered) >= len(before + after):
                user_text = rendered[len(before) : len(rendered) - len(after)]
                if not any(token in user_text for token in self.special_tokens):
                    return user_text
        if not self.special_ids.intersection(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return rendered

    def completion(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def split(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> tuple[list[str], list[str]]:
        """`input_ids`, `attention_mask`: [batch, seq], prompts left-padded in the first `prompt_width` columns,
        completions right-padded after them; padding is where `attention_mask` is 0."""
        prompts, completions = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            prompts.append(self.prompt([t for t, keep in zip(ids[:prompt_width], mask) if keep]))
            completions.append(
                self.completion([t for t, keep in zip(ids[prompt_width:], mask[prompt_width:]) if keep])
            )
        return prompts, completions


class RewardSourceModel(nn.Module):
    """Any `RewardSource` dressed as the sequence-classification model TRL's PPOTrainer scores with.

    TRL calls `getattr(model, model.base_model_prefix)` (here `scorer`) on the policy's tokens and reads
    `model.score(output.hidden_states[-1])` at each row's last response token; the scorer returns the scores
    broadcast over all positions [batch, seq, 1] and `score` is the identity, so whichever position TRL reads
    holds the score.

    `token_model`, when given, is a reward model sharing the policy's tokenizer: it scores the policy's tokens
    exactly as TRL does on its own, and `token_model_weight` × its score is added to the source's.

    Where the prompt ends is not in the inputs: `scoring_context.prompt_width` must hold the width of the prompt
    block of the batch being scored (`recipes.engine.RecipePPOTrainer` sets it as it draws each batch)."""

    base_model_prefix = "scorer"

    def __init__(
        self,
        source: RewardSource | None,
        policy_tokenizer: PreTrainedTokenizerBase,
        token_model: PreTrainedModel | None = None,
        token_model_weight: float = 1.0,
        token_model_name: str = "reward_model",
    ):
        super().__init__()
        self.scorer = SourceScorer(source, policy_tokenizer, token_model, token_model_weight, token_model_name)
        self.score = nn.Identity()
        self.eval().requires_grad_(False)

    @property
    def scoring_context(self) -> ScoringContext:
        return self.scorer.context

    def take_logged_sums(self) -> dict[str, tuple[float, int]]:
        """{part name: (sum of scores, number of completions)} over the training batches scored since the last
        call, then starts afresh. The trainer logs sum / count as `reward/<part name>`."""
        logged, self.scorer.logged = self.scorer.logged, {}
        return logged


class SourceScorer(nn.Module):
    """The backbone of `RewardSourceModel`: policy tokens → texts → source → scores shaped like hidden states."""

    def __init__(
        self,
        source: RewardSource | None,
        policy_tokenizer: PreTrainedTokenizerBase,
        token_model: PreTrainedModel | None,
        token_model_weight: float,
        token_model_name: str,
    ):
        super().__init__()
        if source is None and token_model is None:
            raise ValueError("RewardSourceModel needs a source, a token model or both")
        self.source = source
        self.decoder = PolicyTextDecoder(policy_tokenizer)
        self.token_model = token_model
        self.token_model_weight = token_model_weight
        self.token_model_name = token_model_name
        self.context = ScoringContext()
        self.logged: dict[str, tuple[float, int]] = {}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **token_model_kwargs) -> BaseModelOutput:
        """TRL's call: `input_ids`, `attention_mask` [batch, seq] (padding masked and replaced by id 0), plus
        `position_ids` and output flags, which only `token_model` reads. Returns `hidden_states=(scores [batch,
        seq, 1],)`, float32."""
        width = self.context.prompt_width
        if width is None or not 0 < width < input_ids.shape[1]:
            raise RuntimeError(
                f"RewardSourceModel: scoring_context.prompt_width is {width} for a batch of {input_ids.shape[1]} "
                "columns; set it to the prompt width (TRL's context_length) of the batch being scored"
            )
        if not attention_mask[:, width - 1].all():
            raise RuntimeError(
                f"RewardSourceModel: column {width - 1} is padding in some rows, so the left-padded prompts do not "
                f"end at scoring_context.prompt_width={width}: the scoring context is out of step with the batch"
            )
        batch, seq = input_ids.shape
        logits = torch.zeros(batch, seq, 1, device=input_ids.device)
        parts: dict[str, torch.Tensor] = {}
        if self.token_model is not None:
            model = self.token_model
            output = getattr(model, model.base_model_prefix)(
                input_ids=input_ids, attention_mask=attention_mask, **token_model_kwargs
            )
            token_logits = model.score(output.hidden_states[-1]).float()
            logits += self.token_model_weight * token_logits
            last = _last_response_index(attention_mask, width)
            parts[self.token_model_name] = token_logits[torch.arange(batch), last, 0]
        if self.source is not None:
            prompts, completions = self.decoder.split(input_ids, attention_mask, width)
            scores = self.source(prompts, completions)
            logits += scores.to(logits.device).view(batch, 1, 1)
            parts.update(self.source.last_scores_by_part(scores))
        if self.context.training:
            for name, scores in parts.items():
                total, count = self.logged.get(name, (0.0, 0))
                self.logged[name] = (total + scores.float().sum().item(), count + scores.numel())
        return BaseModelOutput(last_hidden_state=logits, hidden_states=(logits,))


def _last_response_index(attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Per row, the column TRL reads the score at: the one before the first padding after the prompt."""
    padding = ~attention_mask[:, prompt_width:].bool()
    first_padding = torch.where(padding.any(1), padding.int().argmax(1), padding.shape[1])
    return prompt_width + first_padding - 1
