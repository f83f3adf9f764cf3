"""Preference pairs labelled by a gold reward: the data a reward model learns from.

For each prompt the policy samples `completions_per_prompt` completions; the gold function scores them; every
two of them whose scores differ by at least `min_score_gap` make a pair, the higher-scored completion as
`chosen`. Four completions give up to six pairs at twice the sampling cost of two, which give one: the pairs of
one prompt share completions, but each compares a different two (InstructGPT's reward model trained on all pairs of
each prompt's ranked completions). Each split is written as JSON lines in TRL's conversational preference format,
with the gold scores beside the conversations:

    {"chosen":   [{"role": "user", "content": P}, {"role": "assistant", "content": A}],
     "rejected": [{"role": "user", "content": P}, {"role": "assistant", "content": B}],
     "chosen_score": 0.81, "rejected_score": -0.27}
"""

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from recipes.config import DataArguments, ModelArguments
from recipes.data import collate_prompts, load_raw_prompts, tokenize_prompts
from recipes.devices import Shard, process_device, process_state
from recipes.errors import RecipeError
from recipes.generation import model_device, sample_responses, sampling_config
from recipes.models import load_policy, load_tokenizer
from recipes.ppo.core import cut_after_stop
from recipes.rewards.sources import Episodes, FunctionSource, RewardSource
from reward_models.config import RewardRecipe

# The prompt loader's splits and the files their pairs go to: the test prompts' pairs validate the reward model.
SPLIT_FILES = {"train": "train.jsonl", "eval": "test.jsonl"}
SPLIT_NAMES = {"train": "train", "eval": "test"}


@dataclass
class SplitSummary:
    prompts: int
    completions: int
    pairs: int
    truncated: int
    """Completions that reached `max_new_tokens` before their end-of-turn token."""
    mean_gap: float
    """Mean gold-score difference (chosen − rejected) over the kept pairs."""


@dataclass
class PreferenceSummary:
    output_dir: Path
    splits: dict[str, SplitSummary]
    seconds: float

    def describe(self) -> str:
        parts = [
            f"{name}: {s.pairs} pairs from {s.prompts} prompts (mean gold gap {s.mean_gap:.2f}; "
            f"{s.truncated} of {s.completions} completions cut at max_new_tokens)"
            for name, s in self.splits.items()
        ]
        return f"preferences in {self.output_dir}: " + "; ".join(parts) + f"; {self.seconds:.0f} s"


def build_preferences(recipe: RewardRecipe) -> PreferenceSummary:
    """Samples, scores and writes the pairs of every split to `recipe.data.dataset_name` (a folder). Deterministic
    for `sampling_seed` and `generation_batch_size`, whatever the number of processes: under `accelerate launch` the
    processes share the batches of prompts, each with its own copy of the policy on its device (a GPU when there is
    one), and the main process scores and writes the pairs."""
    started = time.monotonic()
    state = process_state()
    args = recipe.preferences
    output_dir = _check_preferences_dir(recipe.data.dataset_name, args.overwrite_preferences)
    gold = FunctionSource.from_spec(args.gold_reward, "gold_reward")
    policy_args = ModelArguments(
        model_name_or_path=args.policy_name_or_path, dtype=args.policy_dtype, pad_token=recipe.model.pad_token
    )
    tokenizer = load_tokenizer(policy_args)
    prompt_args = DataArguments(
        dataset_name=args.prompts_name, prompt_column=args.prompts_column, prompt_as_user_message=True
    )
    splits = load_raw_prompts(prompt_args, seed=args.sampling_seed, key="prompts_name")
    if args.prompts_column not in splits["train"].column_names:
        raise RecipeError(
            f"prompts_column: '{args.prompts_name}' has no column '{args.prompts_column}' "
            f"(columns: {splits['train'].column_names})"
        )
    limits = {"train": args.max_train_prompts, "eval": args.max_test_prompts}
    policy = load_policy(policy_args).to(process_device(state)).eval()
    # Every process has checked the input before the main one writes into the output folder.
    state.wait_for_everyone()

    summaries = {}
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    first_batch = 0
    for split, dataset in splits.items():
        if limits[split] is not None:
            dataset = dataset.select(range(min(limits[split], len(dataset))))
        prompts, _ = tokenize_prompts(dataset, prompt_args, tokenizer)
        completions, truncated = sample_completions(
            policy, tokenizer, prompts, args.completions_per_prompt, args.temperature, args.max_new_tokens,
            args.generation_batch_size, SPLIT_NAMES[split], seed=args.sampling_seed, first_batch=first_batch,
            shard=Shard.of(state),
        )  # fmt: skip
        # Batches are numbered across the splits: each split's completions come from seeds of their own.
        first_batch += math.ceil(len(prompts) / args.generation_batch_size)
        if not state.is_main_process:
            continue
        rows = preference_rows(list(prompts["prompt"]), completions, gold, args.min_score_gap)
        write_jsonl(output_dir / SPLIT_FILES[split], rows)
        gaps = [row["chosen_score"] - row["rejected_score"] for row in rows]
        summaries[SPLIT_NAMES[split]] = SplitSummary(
            prompts=len(dataset),
            completions=len(dataset) * args.completions_per_prompt,
            pairs=len(rows),
            truncated=truncated,
            mean_gap=sum(gaps) / max(len(gaps), 1),
        )
    state.wait_for_everyone()
    return PreferenceSummary(output_dir=output_dir, splits=summaries, seconds=time.monotonic() - started)


def _check_preferences_dir(dataset_name: str | None, overwrite: bool) -> Path:
    """The pairs go to a folder: new, or without preference files unless `overwrite_preferences`."""
    if not dataset_name:
        raise RecipeError("dataset_name is not set: name the folder the preference pairs are written to")
    path = Path(dataset_name)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"dataset_name: {dataset_name} exists and is not a folder; the builder writes a folder")
    existing = [name for name in SPLIT_FILES.values() if (path / name).exists()]
    if existing and not overwrite:
        raise RecipeError(
            f"dataset_name: {dataset_name} already holds {', '.join(existing)}; choose another folder or pass "
            "--overwrite_preferences true"
        )
    return path


@torch.no_grad()
def sample_completions(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts,
    completions_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "sampling",
    seed: int = 0,
    first_batch: int = 0,
    shard: Shard = Shard(),
) -> tuple[list[list[str]], int]:
    """Returns (for each prompt its `completions_per_prompt` completions as text, how many of them were cut at
    `max_new_tokens`). `prompts`: tokenised prompts (`recipes.data.tokenize_prompts`), sampled with the shared
    sampler as PPO samples its rollouts (the temperature alone), `batch_size` prompts per call. Batch k (counted
    from `first_batch`) is sampled after seeding with `seed + k`, by the process `shard` gives it to; every process
    returns all the completions."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = sampling_config(max_new_tokens, temperature, eos_id, pad_id)
    starts = range(0, len(prompts), batch_size)
    sampled = []
    for k in tqdm(shard.mine(len(starts)), desc=f"{desc} completions", unit="batch", disable=shard.index != 0):
        batch = collate_prompts([prompts[i] for i in range(starts[k], min(starts[k] + batch_size, len(prompts)))],
                                pad_id)  # fmt: skip
        # A prompt's completions side by side: prompt i's are rows i·k … i·k + k − 1.
        queries = batch.input_ids.repeat_interleave(completions_per_prompt, 0).to(model_device(policy))
        torch.manual_seed(seed + first_batch + k)
        responses = cut_after_stop(sample_responses(policy, queries, config, len(queries)), eos_id, pad_id)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        groups = [texts[i : i + completions_per_prompt] for i in range(0, len(texts), completions_per_prompt)]
        sampled.append((k, groups, int((~(responses == eos_id).any(dim=1)).sum())))
    if shard.count > 1:
        sampled = gather_object(sampled)
    sampled.sort(key=lambda part: part[0])
    return [group for _, groups, _ in sampled for group in groups], sum(cut for _, _, cut in sampled)


def preference_rows(
    prompts: list[str], completions: list[list[str]], gold: RewardSource, min_score_gap: float
) -> list[dict]:
    """For each prompt, one row per two of its completions whose gold scores differ by at least `min_score_gap`
    (in the order the completions came: first with second, first with third, ...); the higher scored is `chosen`
    (the earlier one on a tie, which only a gap of 0 keeps)."""
    flat_prompts = [prompt for prompt, group in zip(prompts, completions) for _ in group]
    flat_completions = [completion for group in completions for completion in group]
    scores = iter(gold.score(Episodes(flat_prompts, flat_completions)).total.tolist())
    rows = []
    for prompt, group in zip(prompts, completions):
        scored = [(completion, next(scores)) for completion in group]
        user = {"role": "user", "content": prompt}
        for (first, first_score), (second, second_score) in itertools.combinations(scored, 2):
            if abs(first_score - second_score) < min_score_gap:
                continue
            if second_score > first_score:
                first, second, first_score, second_score = second, first, second_score, first_score
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": first}],
                    "rejected": [user, {"role": "assistant", "content": second}],
                    "chosen_score": round(first_score, 6),  # float32 scores, written without float noise
                    "rejected_score": round(second_score, 6),
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

