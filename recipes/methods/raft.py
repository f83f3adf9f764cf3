"""RAFT, or best-of-n fine-tuning (Dong et al., 2023): in each round, sample `completions_per_prompt` completions of
a slice of the prompts from the current policy with the kit's one sampler, keep each prompt's best by the kit's
reward (`best_of_k`), and fine-tune on them with the SFT stage (`recipes.methods.sft`); the next round samples from
the policy that leaves.

    accelerate launch scripts/raft.py --config configs/<model>/raft.yaml [--any_field value ...]

The recipe: the kit's `DataArguments` and `ModelArguments` (policy, LoRA, reward model and functions, as PPO) and
`RAFTConfig`: TRL's `SFTConfig` for each round's fine-tuning (learning rate, epochs over the round's examples, ...)
plus the sampling fields, named as PPO names them, and the budget, `total_episodes` completions sampled.
"""

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import set_seed

from recipes import REPO_ROOT
from recipes.config import METRICS_FILE, DataArguments, ModelArguments, check_output_dir
from recipes.data import PromptBatch, load_prompts
from recipes.errors import RecipeError
from recipes.generation import model_device, sample_responses, sampling_config
from recipes.methods.sft import SFTConfig, sft_trainer
from recipes.methods.trl_wiring import (
    PPO_ONLY_MODEL_FIELDS,
    MethodRecipe,
    describe_policy,
    open_outputs,
    parse_method_recipe,
    save_and_close,
)
from recipes.models import describe_reward, load_policy_for_training, load_reward, load_tokenizer
from recipes.ppo.core import cut_after_stop
from recipes.ppo.trainer import PromptOrder
from recipes.rewards.sources import Episodes, ModelSource, RewardSource, WeightedSum
from recipes.tracking import MetricsLog

DEFAULT_RAFT_RECIPE = str(REPO_ROOT / "configs" / "smollm2-135m" / "raft.yaml")
ROUNDS_DIR = "rounds"


@dataclass
class RAFTConfig(SFTConfig):
    """TRL's `SFTConfig` for each round's fine-tuning, plus the rounds, the sampling and the budget."""

    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Completions to sample over all rounds (the budget, as PPO's total_episodes): "
                  "num_rounds × prompts per round × completions_per_prompt."},
    )
    num_rounds: int = field(
        default=4,
        metadata={"help": "Rounds of sample → keep the best → fine-tune, each sampling from the last round's "
                  "policy."},
    )
    completions_per_prompt: int = field(default=4, metadata={"help": "k: completions sampled per prompt."})
    min_best_score: float | None = field(
        default=None,
        metadata={"help": "Fine-tune only on prompts whose best completion scores at least this (default: every "
                  "prompt's best, however low)."},
    )
    response_length: int = field(default=53, metadata={"help": "Tokens sampled per completion at most (as PPO)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (no top-k, no top-p; as PPO)."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Completions per generate call and per scoring batch, on each process (as PPO)."}
    )
    save_strategy: str = field(
        default="no", metadata={"help": "RAFT saves the policy after every round itself (rounds/round-<n>)."}
    )

    RANGES: ClassVar[dict] = {
        **SFTConfig.RANGES,
        "total_episodes": (1, None, "at least 1"),
        "num_rounds": (1, None, "at least 1"),
        "completions_per_prompt": (1, None, "at least 1"),
        "min_best_score": (None, None, "a finite number, or null"),
        "response_length": (1, None, "at least 1 token"),
        "temperature": (1e-6, None, "above 0 (sampling divides the logits by it)"),
        "local_rollout_forward_batch_size": (1, None, "at least 1"),
    }

RAFT_NOT_READ = {
    **PPO_ONLY_MODEL_FIELDS,
    "reference": "RAFT's fine-tuning has no reference model",
    "save_strategy": "RAFT saves the policy after every round (rounds/round-<n>)",
    "save_steps": "RAFT saves the policy after every round (rounds/round-<n>)",
    "max_steps": "each round fine-tunes for num_train_epochs over its selected completions",
    "eval_strategy": "evaluate the saved policy and its rounds with scripts/evaluate.py (--checkpoints)",
    "eval_steps": "evaluate the saved policy and its rounds with scripts/evaluate.py (--checkpoints)",
}


def parse_raft_recipe(args: list[str], default_config: str | None = None) -> MethodRecipe:
    return parse_method_recipe(
        "raft", args, (DataArguments, ModelArguments, RAFTConfig), default_config, RAFT_NOT_READ
    )


# ---------------------------------------------------------------------------------------------------------------
# The selection


def best_of_k(scores: torch.Tensor, min_score: float | None = None) -> list[tuple[int, int]]:
    """RAFT's selection. `scores` [P, k]: the reward of each prompt's k completions. Returns (prompt, completion)
    for each prompt's highest-scored completion, the first of equal ones, in prompt order. A NaN score never wins;
    a prompt whose scores are all NaN, or whose best is below `min_score`, is left out."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [prompts, k ≥ 1], not {list(scores.shape)}")
    scores = scores.float().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    best_scores, best = scores.max(dim=1)  # the first maximum of each row
    kept = best_scores > -math.inf
    if min_score is not None:
        kept &= best_scores >= min_score
    return [(row, int(best[row])) for row in range(len(scores)) if kept[row]]


# ---------------------------------------------------------------------------------------------------------------
# The rounds


@dataclass(frozen=True)
class RoundPlan:
    """total_episodes = num_rounds × prompts per round × completions_per_prompt; each process samples its share of
    a round's prompts."""

    total_episodes: int
    num_rounds: int
    completions_per_prompt: int
    processes: int

    @classmethod
    def of(cls, config: RAFTConfig, processes: int, train_prompts: int) -> "RoundPlan":
        if config.total_episodes is None:
            raise RecipeError("total_episodes is not set: the completions to sample over all rounds (the budget)")
        plan = cls(config.total_episodes, config.num_rounds, config.completions_per_prompt, processes)
        per_round = config.num_rounds * config.completions_per_prompt
        if config.total_episodes % per_round:
            raise RecipeError(
                f"total_episodes={config.total_episodes} is not a whole number of prompts per round: it must be a "
                f"multiple of num_rounds × completions_per_prompt = {per_round}"
            )
        if plan.prompts_per_round % processes:
            raise RecipeError(
                f"{plan.prompts_per_round} prompts per round do not divide between {processes} processes: make "
                f"total_episodes a multiple of {per_round * processes}"
            )
        if plan.prompts_per_round > train_prompts:
            raise RecipeError(
                f"{plan.prompts_per_round} prompts per round, but only {train_prompts} training prompts: lower "
                "total_episodes or raise num_rounds"
            )
        return plan

    @property
    def prompts_per_round(self) -> int:
        return self.total_episodes // (self.num_rounds * self.completions_per_prompt)

    def describe(self, epochs: float) -> str:
        return (
            f"{self.num_rounds} rounds × {self.prompts_per_round} prompts × {self.completions_per_prompt} "
            f"completions = {self.total_episodes} completions; each round fine-tunes on at most "
            f"{self.prompts_per_round} (each prompt's best) for {epochs:g} epochs"
        )


@dataclass
class RoundSamples:
    """One process's share of a round: the completions sampled, their scores, and the best of each prompt."""

    examples: list[dict]
    """The kept completions in TRL's prompt-completion format (chat turns, or plain text)."""
    scores: list[float]
    best_scores: list[float]
    ended: list[bool]
    by_source: dict[str, list[float]]


@torch.no_grad()
def sample_round(policy, tokenizer, batch: PromptBatch, reward: RewardSource, config: RAFTConfig) -> RoundSamples:
    """Samples k completions of each prompt of `batch` with the kit's sampler (as PPO samples its rollouts), scores
    them with the kit's reward, and keeps each prompt's best (`best_of_k`)."""
    k, pad, eos = config.completions_per_prompt, tokenizer.pad_token_id, tokenizer.eos_token_id
    # A prompt's completions side by side: prompt i's are rows i·k … i·k + k − 1.
    queries = batch.input_ids.repeat_interleave(k, 0).to(model_device(policy))
    generation = sampling_config(config.response_length, config.temperature, eos, pad)
    policy.eval()
    responses = sample_responses(policy, queries, generation, config.local_rollout_forward_batch_size)
    responses = cut_after_stop(responses, eos, pad).cpu()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    conversations = [turns for turns in batch.conversations for _ in range(k)] if batch.conversations else None
    prompts = [prompt for prompt in batch.prompts for _ in range(k)]
    scored = reward.score(Episodes(prompts, texts, conversations, torch.cat([queries.cpu(), responses], 1), pad))
    scores = scored.total.view(-1, k)
    examples, best_scores = [], []
    for row, column in best_of_k(scores, config.min_best_score):
        completion = texts[row * k + column]
        if batch.conversations:
            turn = [{"role": "assistant", "content": completion}]
            examples.append({"prompt": batch.conversations[row], "completion": turn})
        else:
            examples.append({"prompt": batch.prompts[row], "completion": completion})
        best_scores.append(float(scores[row, column]))
    return RoundSamples(
        examples=examples,
        scores=scored.total.tolist(),
        best_scores=best_scores,
        ended=(responses == eos).any(dim=1).tolist(),
        by_source={name: values.tolist() for name, values in scored.by_source.items()},
    )


def round_metrics(shares: list[RoundSamples], episodes: int) -> dict[str, float]:
    """A round's figures over every process's share (at least one completion kept)."""
    scores = [s for share in shares for s in share.scores]
    best = [s for share in shares for s in share.best_scores]
    ended = [e for share in shares for e in share.ended]
    metrics = {
        "episodes": episodes,
        "reward/mean": sum(scores) / len(scores),
        "reward/best_mean": sum(best) / len(best),
        "selected": len(best),
        "eos_rate": sum(ended) / len(ended),
    }
    for name in shares[0].by_source if len(shares[0].by_source) > 1 else []:
        values = [v for share in shares for v in share.by_source[name]]
        metrics[f"reward/{name}"] = sum(values) / len(values)
    return metrics


def place(model, device: torch.device) -> None:
    """Moves `model` to `device`, unless it is quantized (bitsandbytes placed it when loading)."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        model.to(device)


def place_reward(source: RewardSource, device: torch.device) -> None:
    """Moves the reward models inside `source` to `device`."""
    for part in source.parts if isinstance(source, WeightedSum) else [source]:
        if isinstance(part, ModelSource):
            place(part.model, device)


def run_raft(recipe: MethodRecipe) -> Path:
    """Runs the rounds as the recipe says; returns the output folder: the last round's policy with its tokenizer,
    `rounds/round-<n>` (each earlier round's), recipe.yaml and metrics.jsonl (one line per round)."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir)
    tokenizer = load_tokenizer(model_args)
    prompts = load_prompts(recipe.data, tokenizer, seed=training.seed)
    plan = RoundPlan.of(training, state.num_processes, len(prompts.train))
    state.print(prompts.describe(recipe.data.max_prompt_length))
    state.print(f"budget: {plan.describe(training.num_train_epochs)}")
    order = PromptOrder(prompts.train, plan.prompts_per_round // state.num_processes, state.process_index,
                        state.num_processes, training.seed, tokenizer.pad_token_id)  # fmt: skip
    # LoRA matrices are drawn from the global generator: seeded, a run is reproducible.
    set_seed(training.seed)
    reward = load_reward(model_args, with_critic=False)
    policy = load_policy_for_training(model_args)
    place(policy, state.device)
    place_reward(reward, state.device)
    state.print(f"models: {describe_policy(model_args, policy)}, reward {describe_reward(model_args)}")
    open_outputs(recipe, output_dir)

    log = MetricsLog(output_dir / METRICS_FILE) if state.is_main_process else None
    # The run's W&B run gets one row per round from `log`; the stage's own per-step logs would step it out of order.
    stage_config = copy.copy(training)
    stage_config.report_to = []
    for round_number in range(1, plan.num_rounds + 1):
        started = time.perf_counter()
        # Each process its own stream, each round a new one: reproducible, and no two processes sample alike.
        set_seed(training.seed + 1_000 * round_number + state.process_index)
        share = sample_round(policy, tokenizer, order.batch(round_number), reward, training)
        shares = gather_object([share])
        sampled = time.perf_counter()
        examples = [example for s in shares for example in s.examples]
        if not examples:
            raise RecipeError(
                f"round {round_number}: no prompt's best completion scored at least min_best_score="
                f"{training.min_best_score}: lower it"
            )
        metrics = round_metrics(shares, round_number * plan.prompts_per_round * plan.completions_per_prompt)
        trainer = sft_trainer(policy, tokenizer, Dataset.from_list(examples), stage_config, callbacks=[])
        result = trainer.train()
        metrics.update({"sft/loss": result.training_loss, "sft/steps": result.global_step})
        if round_number < plan.num_rounds:
            trainer.save_model(str(output_dir / ROUNDS_DIR / f"round-{round_number}"))
        metrics.update({"time/sampling_s": sampled - started, "time/sft_s": time.perf_counter() - sampled})
        if log is not None:
            log(round_number, metrics)
        state.print(
            f"round {round_number}: reward {metrics['reward/mean']:+.3f}, best {metrics['reward/best_mean']:+.3f} "
            f"({metrics['selected']} kept), EOS rate {metrics['eos_rate']:.2f}"
        )
    save_and_close(trainer, output_dir)
    return output_dir
