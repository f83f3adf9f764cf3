"""Evaluation of a trained policy against its reference on held-out prompts.

    python scripts/evaluate.py --config configs/<model>/eval.yaml [--policy_name_or_path outputs/.../ppo]

Both models answer the same prompts (sampled as in training, fixed seed). Reported, all in one flat JSON file and in
W&B: reward per source (mean, std, quantiles) for both, win-rate of the policy per source, KL(policy ‖ reference) per
sequence on the policy's samples (k1 and k3, nats), perplexity of both on held-out text, response length, EOS rate,
distinct-1/2, and a table of prompts with both completions and their scores. Several checkpoints give a
reward-vs-KL curve per source.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate.utils import gather_object
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from recipes.config import RESOLVED_RECIPE_FILE, DataArguments, ModelArguments, RecipeParser, check_output_dir
from recipes.config import save_resolved_config
from recipes.data import PromptBatch, check_rows, collate_prompts, load_data_file, load_raw_prompts, tokenize_prompts
from recipes.devices import Shard, process_device, process_state
from recipes.errors import RecipeError
from recipes.generation import model_device, response_logprobs, sample_responses, sampling_config
from recipes.models import check_model_kind, contiguous_lm_head_input, load_tokenizer, locate_model, torch_dtype
from recipes.ppo.config import check_ranges
from recipes.ppo.core import cut_after_stop, kl_per_token, last_token_index, padding_masks
from recipes.rewards.sources import Episodes, FunctionSource, ModelSource, RewardSource, WeightedSum

RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "samples.jsonl"
SWEEP_FILE = "sweep.jsonl"
SWEEP_PLOT = "reward_vs_kl.png"
QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class EvalArguments:
    """What to evaluate, against what, judged by which reward sources."""

    policy_name_or_path: str | None = field(
        default=None, metadata={"help": "The trained policy: a PPO output folder (LoRA adapter or full), or a hub id."}
    )
    checkpoints: list[str] | None = field(
        default=None,
        metadata={"help": "Several policies (e.g. checkpoints of one or more runs): one row each in sweep.jsonl and "
                  "a reward-vs-KL plot. Replaces policy_name_or_path."},
    )
    reference_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The reference. Default: the base model of a LoRA policy, or the model_name_or_path of "
                  "the PPO recipe saved beside the policy."},
    )
    reward_models: list[str] | None = field(
        default=None, metadata={"help": "Reward models (one-label sequence classifiers), each with its own tokenizer."}
    )
    reward_functions: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions ('package.module:function' or a built-in: sentiment, length, ...)."},
    )
    perplexity_texts: str | None = field(
        default=None,
        metadata={"help": "A .jsonl/.json/.csv/.parquet file with a `text` column for perplexity. Default: the "
                  "reference's own completions of the held-out prompts (scored given their prompts)."},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="float32", metadata={"help": "dtype of the policy, reference and reward models (bfloat16 on GPUs)."}
    )
    response_length: int = field(default=48, metadata={"help": "Tokens sampled per completion at most."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (use the PPO recipe's)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation / scoring batch."})
    seed: int = field(
        default=42,
        metadata={"help": "Sampling seed; also the seed of the held-out split when the data has no test split "
                  "(use the PPO recipe's seed to get the same held-out prompts)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the results go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})
    report_to: Literal["wandb", "none"] = field(default="none", metadata={"help": "'wandb' or 'none'."})
    wandb_project: str = field(default="ppo-recipes", metadata={"help": "W&B project."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})

    def __post_init__(self):
        check_ranges(self, EVAL_RANGES)


EVAL_RANGES = {
    "response_length": (1, None, "at least 1 token"),
    "temperature": (1e-6, None, "above 0 (sampling divides the logits by it)"),
    "batch_size": (1, None, "at least 1"),
}


@dataclass
class Completions:
    """Sampled completions of one model. `query_responses` [B, W + T]: prompts left-padded in the first W columns,
    responses (ended at EOS, padded after it) in the last T."""

    query_responses: torch.Tensor
    prompt_width: int
    texts: list[str]
    lengths: list[int]
    """Response tokens up to and including EOS."""
    ended: list[bool]
    """Whether the response ended with EOS."""

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, T]: True at response tokens, False at padding."""
        responses = self.query_responses[:, self.prompt_width :]
        return torch.arange(responses.shape[1])[None, :] < torch.tensor(self.lengths)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def parse_eval_config(args: list[str]) -> tuple[DataArguments, EvalArguments, str | None]:
    (data, evaluation), source = RecipeParser((DataArguments, EvalArguments)).parse(args)
    return data, evaluation, source


def load_policy_for_eval(name_or_path: str, dtype: str = "float32", device=None) -> PreTrainedModel:
    """A PPO output folder holding a LoRA adapter (loaded onto its base), a full model folder, or a hub id; in
    `dtype`, on `device` (default: the CPU)."""
    placement = {"dtype": torch_dtype(dtype), "device_map": _device_map(device)}
    adapter_config = Path(name_or_path) / "adapter_config.json"
    if adapter_config.is_file():
        base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(locate_model(base_name, "base_model_name_or_path"), **placement)
        return PeftModel.from_pretrained(contiguous_lm_head_input(base), name_or_path).eval()
    path = locate_model(name_or_path, "policy_name_or_path")
    return contiguous_lm_head_input(AutoModelForCausalLM.from_pretrained(path, **placement)).eval()


def check_policies(names: list[str], key: str) -> None:
    """Each policy to evaluate is a language model, or a LoRA adapter whose base is one: checked before anything is
    loaded, so that the last of several checkpoints cannot fail after the first has been evaluated."""
    for name in names:
        check_model_kind(name, key, "language model")
        adapter_config = Path(name) / "adapter_config.json"
        if adapter_config.is_file():
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if not base:
                raise RecipeError(f"{key}: {adapter_config} does not name its base_model_name_or_path")
            check_model_kind(base, f"{key} (the base of the adapter in {name})", "language model")


def _device_map(device) -> dict | None:
    """Weights loaded straight onto `device` (no full copy in CPU memory first)."""
    return {"": torch.device(device)} if device is not None else None


def default_reference(policy_name_or_path: str) -> str:
    """The base of a LoRA policy, else the policy model of the PPO recipe saved beside it."""
    folder = Path(policy_name_or_path)
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    if (folder / RESOLVED_RECIPE_FILE).is_file():
        recipe = yaml.safe_load((folder / RESOLVED_RECIPE_FILE).read_text()) or {}
        if recipe.get("ref_model_name_or_path") or recipe.get("model_name_or_path"):
            return recipe.get("ref_model_name_or_path") or recipe["model_name_or_path"]
    raise RecipeError(
        f"reference_name_or_path is not set and {policy_name_or_path} does not say its base model (it holds no "
        f"adapter_config.json or {RESOLVED_RECIPE_FILE}): set reference_name_or_path"
    )


def load_reward_sources(evaluation: EvalArguments, device=None) -> list[RewardSource]:
    """One named source per reward model and function: each is reported on its own. Reward models in the
    evaluation's dtype, on `device`."""
    sources = []
    for name in evaluation.reward_models or []:
        check_model_kind(name, "reward_models", "reward model")
        path = locate_model(name, "reward_models")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(evaluation.dtype), device_map=_device_map(device)
        ).eval()
        sources.append(ModelSource(model, AutoTokenizer.from_pretrained(path), name=Path(name).name))
    sources += [FunctionSource.from_spec(spec) for spec in evaluation.reward_functions or []]
    if not sources:
        raise RecipeError("no reward source: set reward_models and/or reward_functions")
    return sources


def held_out_prompts(data_args: DataArguments, tokenizer, seed: int):
    """The held-out prompts exactly as the PPO run holds them out (`recipes.data.load_prompts`: too-long prompts
    dropped, then at most `max_eval_prompts`): a dataset of `input_ids`, `prompt` and `messages`."""
    held_out = load_raw_prompts(data_args, seed=seed)["eval"]
    prompts, dropped = tokenize_prompts(held_out, data_args, tokenizer)
    if data_args.max_eval_prompts is not None:
        prompts = prompts.select(range(min(data_args.max_eval_prompts, len(prompts))))
    if len(prompts) == 0:
        raise RecipeError(
            f"dataset_name: no held-out prompts left after dropping {dropped} longer than max_prompt_length"
        )
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: PromptBatch, evaluation: EvalArguments, desc: str,
                       synced_gpus: bool = False, first_batch: int = 0) -> Completions:  # fmt: skip
    """One completion per prompt, sampled as PPO samples its rollouts (temperature alone), `batch_size` prompts per
    call. Batch k of the held-out prompts (`first_batch` is the index of the first given here) is sampled after
    seeding with `evaluation.seed + k`: a completion depends on the seed and its batch, not on what was sampled
    before it, so a model evaluated twice, or by several processes sharing the batches, gives the same completions."""
    queries = prompts.input_ids.to(model_device(model))
    config = sampling_config(evaluation.response_length, evaluation.temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id)  # fmt: skip
    chunks = []
    for offset, start in enumerate(range(0, len(queries), evaluation.batch_size)):
        torch.manual_seed(evaluation.seed + first_batch + offset)
        chunk = queries[start : start + evaluation.batch_size]
        chunks.append(sample_responses(model, chunk, config, len(chunk), synced_gpus))
    responses = cut_after_stop(torch.cat(chunks), tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths = (last_token_index(responses, tokenizer.pad_token_id) + 1).tolist()
    ended = (responses == tokenizer.eos_token_id).any(-1).tolist()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Completions(torch.cat([queries, responses], 1).cpu(), queries.shape[1], texts, lengths, ended)


@torch.no_grad()
def completion_logprobs(model, completions: Completions, pad_token_id: int, temperature: float,
                        batch_size: int) -> torch.Tensor:  # fmt: skip
    """log p(token | prefix) of each response token under `model` at `temperature`: [B, T] on the CPU, 0 at
    padding."""
    width = completions.query_responses.shape[1] - completions.prompt_width
    logprobs = response_logprobs(model, completions.query_responses.to(model_device(model)), pad_token_id, width, temperature,
                                 batch_size).cpu()  # fmt: skip
    return logprobs * completions.response_mask


def kl_per_sequence(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-sequence KL(policy ‖ reference) estimates on policy samples, in nats: the sums over each response of the
    per-token estimators PPO's reward uses (`recipes.ppo.core.kl_per_token`, k1 and k3). Inputs [B, T]."""
    return {
        estimator: (kl_per_token(policy_logprobs, reference_logprobs, estimator) * mask).sum(1)
        for estimator in ("k1", "k3")
    }


def perplexity_of_texts(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int) -> float:
    """exp(mean negative log-likelihood per predicted token) over all texts (each token after a text's first)."""
    return perplexity([text_nll(model, tokenizer, texts[start : start + batch_size])
                       for start in range(0, len(texts), batch_size)])  # fmt: skip


@torch.no_grad()
def text_nll(model: PreTrainedModel, tokenizer, texts: list[str]) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) of one batch of texts."""
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(model_device(model))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    predicted = mask[:, 1:] * mask[:, :-1]
    return (nll * predicted).double().sum().item(), int(predicted.sum().item())


def completion_nll(model, completions: Completions, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the completions' tokens given their prompts (temperature 1: the
    model's own distribution)."""
    logprobs = completion_logprobs(model, completions, pad_token_id, 1.0, batch_size)
    return -logprobs.double().sum().item(), int(completions.response_mask.sum())


def perplexity(parts: list[tuple[float, int]]) -> float:
    """exp(total negative log-likelihood / total tokens) of (nll, tokens) parts, added in the order given."""
    total_nll, total_tokens = sum(nll for nll, _ in parts), sum(tokens for _, tokens in parts)
    if total_tokens == 0:
        raise RecipeError("perplexity_texts: no tokens to score")
    return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def summary_stats(values: torch.Tensor | list[float], prefix: str) -> dict[str, float]:
    values = torch.as_tensor(values, dtype=torch.float64)
    stats = {f"{prefix}/mean": values.mean().item(), f"{prefix}/std": values.std(unbiased=False).item()}
    for q in QUANTILES:
        stats[f"{prefix}/p{round(q * 100)}"] = torch.quantile(values, q).item()
    return stats


def win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """Share of prompts where the policy's completion scores higher; ties count half."""
    wins = (policy_scores > reference_scores).double() + 0.5 * (policy_scores == reference_scores).double()
    return wins.mean().item()


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the completions' lower-cased words (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(texts: list[str], lengths: list[int], ended: list[bool], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}response_length/mean": sum(lengths) / len(lengths),
        f"{prefix}eos_rate": sum(ended) / len(ended),
        f"{prefix}distinct_1": distinct_n(texts, 1),
        f"{prefix}distinct_2": distinct_n(texts, 2),
    }


# ---------------------------------------------------------------------------------------------------------------
# One evaluation


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts,
    sources: list[RewardSource],
    evaluation: EvalArguments,
    perplexity_texts: list[str] | None = None,
    synced_gpus: bool = False,
    shard: Shard = Shard(),
    reference_cache: dict | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (flat results, one sample row per prompt). `prompts`: the tokenised held-out prompts
    (`held_out_prompts`). Each batch of `batch_size` prompts is evaluated on its own (`evaluate_batch`); `shard`
    shares the batches among processes (`scripts/evaluate.py` under `accelerate launch`). `synced_gpus` when the
    models' weights are sharded over processes, which then all evaluate every batch (PPO's held-out evaluation).
    `reference_cache`: a dict kept across calls with the same reference, prompts, sources and settings (a sweep over
    checkpoints, PPO's evaluations during one run): the reference's side of each batch is computed once."""
    # Padded to the widest of all the prompts, so that a batch is the same tensor whichever process samples it.
    everything = collate_prompts(list(prompts), tokenizer.pad_token_id)
    starts = range(0, len(everything.prompts), evaluation.batch_size)
    records = []
    for k in tqdm(shard.mine(len(starts)), desc="evaluation batches", leave=False, disable=shard.index != 0):
        rows = slice(starts[k], starts[k] + evaluation.batch_size)
        batch = PromptBatch(everything.input_ids[rows], everything.prompts[rows],
                            everything.conversations[rows] if everything.conversations else None)  # fmt: skip
        records.append(evaluate_batch(k, batch, policy, reference, tokenizer, sources, evaluation, synced_gpus,
                                      reference_cache))  # fmt: skip
    text_nll_parts = []
    if perplexity_texts is not None:
        text_starts = range(0, len(perplexity_texts), evaluation.batch_size)
        for k in shard.mine(len(text_starts)):
            texts = perplexity_texts[text_starts[k] : text_starts[k] + evaluation.batch_size]
            text_nll_parts.append((k, {name: text_nll(model, tokenizer, texts)
                                       for name, model in (("policy", policy), ("reference", reference))}))  # fmt: skip
    if shard.count > 1:
        records, text_nll_parts = gather_object(records), gather_object(text_nll_parts)
    records.sort(key=lambda record: record["batch"])
    text_nll_parts.sort(key=lambda part: part[0])
    return summarise(records, [part for _, part in text_nll_parts] if perplexity_texts is not None else None)


def evaluate_batch(index: int, batch: PromptBatch, policy, reference, tokenizer, sources: list[RewardSource],
                   evaluation: EvalArguments, synced_gpus: bool = False,
                   reference_cache: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """What batch `index` of the held-out prompts contributes, per prompt: both models' completions (text, length,
    ended), the KL estimates on the policy's completions, each source's scores for both sides; and both models'
    negative log-likelihood of the reference's completions (for perplexity). Plain values: records travel between
    processes. The reference's side does not depend on the policy: it comes from `reference_cache` when there."""
    pad = tokenizer.pad_token_id
    cached = reference_cache.get(index) if reference_cache is not None else None
    if cached is None:
        reference_out = sample_completions(reference, tokenizer, batch, evaluation, "reference samples", synced_gpus,
                                           index)  # fmt: skip
        cached = (reference_out, side_record(reference, reference_out, reference_out, batch, sources, evaluation, pad))
        if reference_cache is not None:
            reference_cache[index] = cached
    reference_out, reference_record = cached
    policy_out = sample_completions(policy, tokenizer, batch, evaluation, "policy samples", synced_gpus, index)
    kl = kl_per_sequence(
        completion_logprobs(policy, policy_out, pad, evaluation.temperature, evaluation.batch_size),
        completion_logprobs(reference, policy_out, pad, evaluation.temperature, evaluation.batch_size),
        policy_out.response_mask,
    )
    return {
        "batch": index,
        "prompts": batch.prompts,
        "kl": {name: values.tolist() for name, values in kl.items()},
        "policy": side_record(policy, policy_out, reference_out, batch, sources, evaluation, pad),
        "reference": reference_record,
    }


def side_record(model, out: Completions, reference_out: Completions, batch: PromptBatch, sources: list[RewardSource],
                evaluation: EvalArguments, pad: int) -> dict[str, Any]:  # fmt: skip
    """One model's side of a batch: its completions `out`, each source's scores of them, and the model's negative
    log-likelihood of the reference's completions."""
    episodes = Episodes(batch.prompts, out.texts, batch.conversations, out.query_responses, pad)
    scores = {}
    for source in sources:
        scores.update({name: values.tolist() for name, values in source.score(episodes).by_source.items()})
    return {"texts": out.texts, "lengths": out.lengths, "ended": out.ended, "scores": scores,
            "nll": completion_nll(model, reference_out, pad, evaluation.batch_size)}  # fmt: skip


def summarise(records: list[dict[str, Any]], text_nll_parts: list[dict] | None = None
              ) -> tuple[dict[str, float], list[dict[str, Any]]]:  # fmt: skip
    """The flat results and sample rows of all batches' records (in batch order). Perplexity is of
    `text_nll_parts` (per batch of texts, per model) when given, else of the reference's completions."""
    def joined(side: str, key: str) -> list:
        return [value for record in records for value in record[side][key]]

    prompts = [prompt for record in records for prompt in record["prompts"]]
    results: dict[str, float] = {"num_prompts": len(prompts)}
    kl = {name: torch.tensor([v for record in records for v in record["kl"][name]]) for name in records[0]["kl"]}
    for name, values in kl.items():
        results.update(summary_stats(values, f"kl/{name}"))
    for side in ("policy", "reference"):
        parts = ([part[side] for part in text_nll_parts] if text_nll_parts is not None
                 else [record[side]["nll"] for record in records])  # fmt: skip
        results[f"perplexity/{side}"] = perplexity(parts)
    for side, prefix in (("policy", ""), ("reference", "reference/")):
        results.update(text_stats(joined(side, "texts"), joined(side, "lengths"), joined(side, "ended"), prefix))

    samples = [
        {"prompt": p, "policy": pc, "reference": rc, "kl_k1": k}
        for p, pc, rc, k in zip(prompts, joined("policy", "texts"), joined("reference", "texts"), kl["k1"].tolist())
    ]
    for name in records[0]["policy"]["scores"]:
        policy_scores = torch.tensor([v for r in records for v in r["policy"]["scores"][name]], dtype=torch.float64)
        reference_scores = torch.tensor([v for r in records for v in r["reference"]["scores"][name]],
                                        dtype=torch.float64)  # fmt: skip
        results.update(summary_stats(policy_scores, f"reward/{name}"))
        results.update(summary_stats(reference_scores, f"reference/reward/{name}"))
        results[f"win_rate/{name}"] = win_rate(policy_scores, reference_scores)
        for row, ps, rs in zip(samples, policy_scores.tolist(), reference_scores.tolist()):
            row[f"policy_{name}"], row[f"reference_{name}"] = ps, rs
    return results, samples


def source_names(sources: list[RewardSource]) -> list[str]:
    """The names results are reported under: each part of a weighted sum on its own."""
    names = []
    for source in sources:
        names += source.part_names if isinstance(source, WeightedSum) else [source.name]
    return names


@dataclass
class HeldOutEvaluation:
    """The evaluation above, run inside a PPO run every `every` updates on the recipe's held-out prompts
    (`eval_every_updates`; at most `max_eval_prompts`): the policy against its reference, judged by the PPO reward's
    own sources (each on its own) and the recipe's `eval_reward_functions` (e.g. a gold function), sampled as in
    training. The trainer logs the results as `eval/<key>`, e.g. `eval/reward/sentiment/mean`, `eval/kl/k1/mean`."""

    every: int
    tokenizer: Any
    prompts: Any
    sources: list[RewardSource]
    evaluation: EvalArguments
    reference_cache: dict = field(default_factory=dict)
    """The reference's side of each held-out batch, computed at the first evaluation: the reference does not train."""

    @classmethod
    def for_ppo_recipe(cls, recipe, tokenizer, reward: RewardSource) -> "HeldOutEvaluation | None":
        """`reward`: the PPO run's own reward, scored through rather than loaded again."""
        training = recipe.training
        if not training.eval_every_updates:
            return None
        evaluation = EvalArguments(
            reward_functions=training.eval_reward_functions,
            response_length=training.response_length,
            temperature=training.temperature,
            batch_size=training.per_device_eval_batch_size,
            seed=training.seed,
        )
        prompts = held_out_prompts(recipe.data, tokenizer, training.seed)
        sources = [reward] + [FunctionSource.from_spec(spec, "eval_reward_functions")
                              for spec in training.eval_reward_functions or []]  # fmt: skip
        return cls(training.eval_every_updates, tokenizer, prompts, sources, evaluation)

    def due(self, update: int, last_update: int) -> bool:
        return update % self.every == 0 or update == last_update

    def __call__(self, policy, reference, synced_gpus: bool = False) -> dict[str, float]:
        results, _ = evaluate_policy(policy, reference, self.tokenizer, self.prompts, self.sources, self.evaluation,
                                     synced_gpus=synced_gpus, reference_cache=self.reference_cache)  # fmt: skip
        return results


# ---------------------------------------------------------------------------------------------------------------
# The script


def run_evaluation(data_args: DataArguments, evaluation: EvalArguments, source: str | None) -> Path:
    """Evaluates one policy (or each of `checkpoints`) and writes the results; returns the output folder. Under
    `accelerate launch` the processes share the held-out prompts (`Shard`), each with its own copy of the models on
    its device (a GPU when there is one), and the main process writes the results."""
    state = process_state()
    policies = evaluation.checkpoints or ([evaluation.policy_name_or_path] if evaluation.policy_name_or_path else [])
    if not policies:
        raise RecipeError("policy_name_or_path is not set (or give checkpoints)")
    check_policies(policies, "checkpoints" if evaluation.checkpoints else "policy_name_or_path")
    output_dir = check_output_dir(evaluation.output_dir, evaluation.overwrite_output_dir)
    reference_name = evaluation.reference_name_or_path or default_reference(policies[0])
    check_model_kind(reference_name, "reference_name_or_path", "language model")
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=_tokenizer_source(policies[0], reference_name)))
    device = process_device(state)
    sources = load_reward_sources(evaluation, device)
    prompts = held_out_prompts(data_args, tokenizer, evaluation.seed)
    perplexity_texts = _load_texts(evaluation.perplexity_texts) if evaluation.perplexity_texts else None
    reference = AutoModelForCausalLM.from_pretrained(
        locate_model(reference_name, "reference_name_or_path"),
        dtype=torch_dtype(evaluation.dtype),
        device_map=_device_map(device),
    )
    reference = contiguous_lm_head_input(reference).eval()
    shard = Shard.of(state)
    # Every process has checked the input before the main one writes into the output folder.
    state.wait_for_everyone()

    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config((data_args, evaluation), source, output_dir / "eval.yaml")
    rows, reference_cache = [], {}
    for policy_name in policies:
        policy = load_policy_for_eval(policy_name, evaluation.dtype, device)
        results, samples = evaluate_policy(policy, reference, tokenizer, prompts, sources, evaluation, perplexity_texts,
                                           shard=shard, reference_cache=reference_cache)  # fmt: skip
        rows.append({"policy": policy_name, **results})
        state.print(format_summary(policy_name, results, source_names(sources)))
    if state.is_main_process:
        _write_results(output_dir, rows, samples, evaluation, source_names(sources))
    state.wait_for_everyone()
    return output_dir


def _tokenizer_source(policy: str, reference: str) -> str:
    """A PPO output folder holds the tokenizer the policy was trained with (its pad token included)."""
    return policy if (Path(policy) / "tokenizer_config.json").is_file() else reference


def _load_texts(path: str) -> list[str]:
    dataset = load_data_file(path, "perplexity_texts")
    if "text" not in dataset.column_names:
        raise RecipeError(f"perplexity_texts: {path} has no 'text' column (columns: {dataset.column_names})")
    check_rows(dataset, {"text": "text"}, f"perplexity_texts: {path}")
    return list(dataset["text"])


def format_summary(policy_name: str, results: dict[str, float], source_names: list[str]) -> str:
    """A short before/after table: reference vs policy per reward source, then KL and perplexity."""
    lines = [f"evaluation of {policy_name} on {results['num_prompts']} held-out prompts", f"{'':28}{'reference':>12}{'policy':>12}"]
    for name in source_names:
        lines.append(
            f"{'reward/' + name:28}{results[f'reference/reward/{name}/mean']:12.3f}{results[f'reward/{name}/mean']:12.3f}"
            f"   win-rate {results[f'win_rate/{name}']:.2f}"
        )
    lines.append(f"{'perplexity':28}{results['perplexity/reference']:12.2f}{results['perplexity/policy']:12.2f}")
    lines.append(f"{'KL(policy ‖ reference), k1':28}{'':12}{results['kl/k1/mean']:12.3f} nats")
    return "\n".join(lines)


def _write_results(output_dir: Path, rows: list[dict], samples: list[dict], evaluation: EvalArguments, names: list[str]) -> None:
    (output_dir / RESULTS_FILE).write_text(json.dumps(rows[-1], indent=2) + "\n")
    with (output_dir / SAMPLES_FILE).open("w") as file:
        for row in samples:
            file.write(json.dumps(row) + "\n")
    if len(rows) > 1:
        with (output_dir / SWEEP_FILE).open("w") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
        plot_reward_vs_kl(rows, names, output_dir / SWEEP_PLOT)
    if evaluation.report_to == "wandb":
        _log_to_wandb(output_dir, rows, samples, evaluation, names)


def plot_reward_vs_kl(rows: list[dict], source_names: list[str], path: Path) -> None:
    """One line per reward source: mean reward against mean KL (k1), one point per policy, in the given order.
    Over-optimisation shows as a proxy rising while a gold source falls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    kls = [row["kl/k1/mean"] for row in rows]
    for name in source_names:
        axes.plot(kls, [row[f"reward/{name}/mean"] for row in rows], marker="o", label=name)
    axes.set_xlabel("KL(policy ‖ reference), k1, nats per sequence")
    axes.set_ylabel("mean reward")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _log_to_wandb(output_dir: Path, rows: list[dict], samples: list[dict], evaluation: EvalArguments, names: list[str]) -> None:
    import wandb

    from recipes.tracking import finish_wandb_run, start_wandb_run

    start_wandb_run(evaluation.wandb_project, evaluation.run_name, evaluation.wandb_tags, {"evaluation": vars(evaluation)})
    for step, row in enumerate(rows):
        wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
    wandb.run.summary.update({k: v for k, v in rows[-1].items() if isinstance(v, (int, float))})
    columns = list(samples[0])
    wandb.log({"samples": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in samples])})
    if (output_dir / SWEEP_PLOT).is_file():
        wandb.log({"reward_vs_kl": wandb.Image(str(output_dir / SWEEP_PLOT))})
    finish_wandb_run()
