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
from typing import Any

import torch
import yaml
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from recipes.config import DataArguments, ModelArguments, RecipeParser, save_resolved_config
from recipes.data import load_raw_prompts, prompt_texts
from recipes.errors import RecipeError
from recipes.models import load_tokenizer, locate_model, torch_dtype
from recipes.config import RESOLVED_RECIPE_FILE, check_output_dir

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
    dtype: str = field(default="float32", metadata={"help": "dtype of the policy and reference (bfloat16 on GPUs)."})
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
    report_to: str = field(default="none", metadata={"help": "'wandb' or 'none'."})
    wandb_project: str = field(default="ppo-recipes", metadata={"help": "W&B project."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})


@dataclass
class Completions:
    """Sampled completions of one model. Token tensors are [batch, prompt_width + response_length]: prompts
    left-padded in the first `prompt_width` columns, responses right-padded after them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    texts: list[str]
    lengths: list[int]
    """Response tokens up to and including EOS."""
    ended: list[bool]
    """Whether the response ended with EOS."""


# ---------------------------------------------------------------------------------------------------------------
# Loading


def parse_eval_config(args: list[str]) -> tuple[DataArguments, EvalArguments, str | None]:
    (data, evaluation), source = RecipeParser((DataArguments, EvalArguments)).parse(args)
    return data, evaluation, source


def load_policy_for_eval(name_or_path: str, dtype: str = "float32") -> PreTrainedModel:
    """A PPO output folder holding a LoRA adapter (loaded onto its base), a full model folder, or a hub id."""
    adapter_config = Path(name_or_path) / "adapter_config.json"
    if adapter_config.is_file():
        base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(locate_model(base_name, "base_model_name_or_path"), dtype=torch_dtype(dtype))
        return PeftModel.from_pretrained(base, name_or_path).eval()
    path = locate_model(name_or_path, "policy_name_or_path")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).eval()


def default_reference(policy_name_or_path: str) -> str:
    """The base of a LoRA policy, else the policy model of the PPO recipe saved beside it."""
    folder = Path(policy_name_or_path)
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    if (folder / RESOLVED_RECIPE_FILE).is_file():
        recipe = yaml.safe_load((folder / RESOLVED_RECIPE_FILE).read_text()) or {}
        if recipe.get("ref_model_name_or_path") or recipe.get("model_name_or_path"):
            return recipe.get("ref_model_name_or_path") or recipe["model_name_or_path"]
    raise RecipeError(f"reference_name_or_path is not set and {policy_name_or_path} does not say its base model")


def load_reward_sources(evaluation: EvalArguments) -> list:
    """One named source per reward model and function: each is reported on its own."""
    from reward_models.sources import FunctionSource, ModelSource

    sources = []
    for name in evaluation.reward_models or []:
        path = locate_model(name, "reward_models")
        model = AutoModelForSequenceClassification.from_pretrained(path)
        if model.config.num_labels != 1:
            raise RecipeError(f"reward_models: '{name}' has {model.config.num_labels} labels; it needs one")
        sources.append(ModelSource(model, AutoTokenizer.from_pretrained(path), name=Path(name).name))
    sources += [FunctionSource.from_spec(spec) for spec in evaluation.reward_functions or []]
    if not sources:
        raise RecipeError("no reward source: set reward_models and/or reward_functions")
    return sources


def held_out_prompts(data_args: DataArguments, tokenizer, seed: int) -> tuple[list[str], list[str], bool]:
    """The held-out prompts (at most `max_eval_prompts`): as reward sources read them, as the models continue them
    (chat template applied), and whether the tokenizer adds its special tokens to the latter."""
    held_out = load_raw_prompts(data_args, seed=seed)["eval"]
    if data_args.max_eval_prompts is not None:
        held_out = held_out.select(range(min(data_args.max_eval_prompts, len(held_out))))
    add_special_tokens = data_args.prompt_column in held_out.column_names and not data_args.prompt_as_user_message
    return user_prompts(held_out, data_args), prompt_texts(held_out, data_args, tokenizer), add_special_tokens


def user_prompts(dataset, data_args: DataArguments) -> list[str]:
    """The prompts as a reward source reads them: the plain prompt, or a chat's last user message."""
    if data_args.prompt_column in dataset.column_names:
        return list(dataset[data_args.prompt_column])
    return [next(m["content"] for m in reversed(chat) if m["role"] == "user") for chat in dataset[data_args.messages_column]]


# ---------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel, tokenizer, prompts: list[str], evaluation: EvalArguments, add_special_tokens: bool, desc: str
) -> Completions:
    """Samples one completion per prompt (temperature, top-k 0, top-p 1: the PPO trainer's sampling), batched,
    seeded with `evaluation.seed` so that a model evaluated twice gives the same completions."""
    torch.manual_seed(evaluation.seed)
    encoded = tokenizer(prompts, padding=True, add_special_tokens=add_special_tokens, return_tensors="pt")
    width = encoded["input_ids"].shape[1]
    rows, masks = [], []
    for start in tqdm(range(0, len(prompts), evaluation.batch_size), desc=desc, leave=False):
        ids = encoded["input_ids"][start : start + evaluation.batch_size].to(model.device)
        mask = encoded["attention_mask"][start : start + evaluation.batch_size].to(model.device)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=evaluation.response_length,
            do_sample=True,
            temperature=evaluation.temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        response = output[:, width:]
        response = torch.nn.functional.pad(response, (0, evaluation.response_length - response.shape[1]), value=tokenizer.pad_token_id)
        rows.append(torch.cat([ids, response], 1).cpu())
        masks.append(torch.cat([mask, response_mask(response, tokenizer.eos_token_id)], 1).cpu())
    input_ids, attention_mask = torch.cat(rows), torch.cat(masks)
    response_ids, kept = input_ids[:, width:], attention_mask[:, width:].bool()
    lengths = kept.sum(1).tolist()
    ended = [bool(length) and row[length - 1].item() == tokenizer.eos_token_id for row, length in zip(response_ids, lengths)]
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(response_ids, lengths)]
    return Completions(input_ids, attention_mask, width, texts, lengths, ended)


def response_mask(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for the response tokens up to and including the first EOS, 0 after it. [batch, response_len]"""
    after_eos = (response == eos_token_id).long().cumsum(1) - (response == eos_token_id).long()
    return (after_eos == 0).long()


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel, completions: Completions, temperature: float, batch_size: int
) -> torch.Tensor:
    """log p(token | prefix) of each response token under `model`, logits divided by `temperature` (the
    distribution sampled from). [batch, response_len], 0 where the response is padding."""
    outputs = []
    width = completions.prompt_width
    for start in range(0, len(completions.texts), batch_size):
        ids = completions.input_ids[start : start + batch_size].to(model.device)
        mask = completions.attention_mask[start : start + batch_size].to(model.device)
        # Left padding: positions count from each row's first real token.
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, width - 1 : -1]
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        taken = logprobs.gather(-1, ids[:, width:].unsqueeze(-1)).squeeze(-1)
        outputs.append((taken * mask[:, width:]).cpu())
    return torch.cat(outputs)


def kl_per_sequence(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-sequence KL(policy ‖ reference) estimates on policy samples, in nats: k1 = Σ (log p − log q), k3 = Σ
    (r − 1 − log r) with r = q/p (unbiased, never negative per token). Inputs [batch, response_len]."""
    log_ratio = (reference_logprobs - policy_logprobs) * mask
    k1 = (-log_ratio * mask).sum(1)
    k3 = ((log_ratio.exp() - 1 - log_ratio) * mask).sum(1)
    return {"k1": k1, "k3": k3}


@torch.no_grad()
def perplexity_of_texts(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int) -> float:
    """exp(mean negative log-likelihood per predicted token) over all texts (each token after a text's first)."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt").to(model.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        predicted = mask[:, 1:] * mask[:, :-1]
        total_nll += (nll * predicted).sum().item()
        total_tokens += int(predicted.sum().item())
    if total_tokens == 0:
        raise RecipeError("perplexity_texts: no tokens to score")
    return math.exp(total_nll / total_tokens)


def perplexity_of_completions(model: PreTrainedModel, completions: Completions, batch_size: int) -> float:
    """Perplexity of the completions' tokens given their prompts (temperature 1: the model's own distribution)."""
    logprobs = response_logprobs(model, completions, temperature=1.0, batch_size=batch_size)
    tokens = completions.attention_mask[:, completions.prompt_width :].sum().item()
    return math.exp(-logprobs.sum().item() / max(tokens, 1))


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


def text_stats(completions: Completions, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}response_length/mean": sum(completions.lengths) / len(completions.lengths),
        f"{prefix}eos_rate": sum(completions.ended) / len(completions.ended),
        f"{prefix}distinct_1": distinct_n(completions.texts, 1),
        f"{prefix}distinct_2": distinct_n(completions.texts, 2),
    }


# ---------------------------------------------------------------------------------------------------------------
# One evaluation


def evaluate_policy(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    rendered_prompts: list[str],
    add_special_tokens: bool,
    sources: list,
    evaluation: EvalArguments,
    perplexity_texts: list[str] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Returns (flat results, one sample row per prompt). `prompts` are what reward sources read, and
    `rendered_prompts` what the models continue."""
    policy_out = sample_completions(policy, tokenizer, rendered_prompts, evaluation, add_special_tokens, "policy samples")
    reference_out = sample_completions(reference, tokenizer, rendered_prompts, evaluation, add_special_tokens, "reference samples")
    mask = policy_out.attention_mask[:, policy_out.prompt_width :]
    kl = kl_per_sequence(
        response_logprobs(policy, policy_out, evaluation.temperature, evaluation.batch_size),
        response_logprobs(reference, policy_out, evaluation.temperature, evaluation.batch_size),
        mask,
    )
    results: dict[str, float] = {"num_prompts": len(prompts)}
    for name, values in kl.items():
        results.update(summary_stats(values, f"kl/{name}"))
    if perplexity_texts is not None:
        results["perplexity/policy"] = perplexity_of_texts(policy, tokenizer, perplexity_texts, evaluation.batch_size)
        results["perplexity/reference"] = perplexity_of_texts(reference, tokenizer, perplexity_texts, evaluation.batch_size)
    else:
        results["perplexity/policy"] = perplexity_of_completions(policy, reference_out, evaluation.batch_size)
        results["perplexity/reference"] = perplexity_of_completions(reference, reference_out, evaluation.batch_size)
    results.update(text_stats(policy_out, ""))
    results.update(text_stats(reference_out, "reference/"))

    samples = [
        {"prompt": p, "policy": pc, "reference": rc, "kl_k1": k}
        for p, pc, rc, k in zip(prompts, policy_out.texts, reference_out.texts, kl["k1"].tolist())
    ]
    for source in sources:
        policy_scores = source(prompts, policy_out.texts).double()
        reference_scores = source(prompts, reference_out.texts).double()
        results.update(summary_stats(policy_scores, f"reward/{source.name}"))
        results.update(summary_stats(reference_scores, f"reference/reward/{source.name}"))
        results[f"win_rate/{source.name}"] = win_rate(policy_scores, reference_scores)
        for row, ps, rs in zip(samples, policy_scores.tolist(), reference_scores.tolist()):
            row[f"policy_{source.name}"], row[f"reference_{source.name}"] = ps, rs
    return results, samples


@dataclass
class HeldOutEvaluation:
    """The evaluation above, run inside a PPO run every `every` updates on the recipe's held-out prompts
    (`eval_every_updates`; at most `max_eval_prompts`): the policy against its reference, judged by the PPO reward's
    sources and the recipe's `eval_reward_functions` (e.g. a gold function), sampled as in training. The trainer
    logs the results as `eval/<key>`, e.g. `eval/reward/sentiment/mean`, `eval/kl/k1/mean`."""

    every: int
    tokenizer: Any
    prompts: list[str]
    rendered_prompts: list[str]
    add_special_tokens: bool
    sources: list
    evaluation: EvalArguments

    @classmethod
    def for_ppo_recipe(cls, recipe, tokenizer, reward_model=None) -> "HeldOutEvaluation | None":
        """`reward_model`: the PPO run's own, scored through rather than loaded again when it is a plain
        classifier that reads the policy's tokens."""
        from reward_models.sources import ModelSource

        training, model_args = recipe.training, recipe.model
        if not training.eval_every_updates:
            return None
        reward_path = model_args.reward_model_name_or_path
        shared = reward_path and model_args.reward_model_tokenizer == "policy" and isinstance(reward_model, PreTrainedModel)
        evaluation = EvalArguments(
            reward_models=[reward_path] if reward_path and not shared else None,
            reward_functions=[*(model_args.reward_functions or []), *(training.eval_reward_functions or [])] or None,
            response_length=training.response_length,
            temperature=training.temperature,
            batch_size=training.per_device_eval_batch_size,
            seed=training.seed,
        )
        prompts, rendered, add_special_tokens = held_out_prompts(recipe.data, tokenizer, training.seed)
        if not prompts:
            raise RecipeError("eval_every_updates: the recipe has no held-out prompts (dataset_test_split)")
        sources = [ModelSource(reward_model, tokenizer, name=Path(reward_path).name)] if shared else []
        if evaluation.reward_models or evaluation.reward_functions:
            sources += load_reward_sources(evaluation)
        return cls(training.eval_every_updates, tokenizer, prompts, rendered, add_special_tokens, sources, evaluation)

    def due(self, update: int, last_update: int) -> bool:
        return update % self.every == 0 or update == last_update

    def __call__(self, policy, reference) -> dict[str, float]:
        results, _ = evaluate_policy(
            policy, reference, self.tokenizer, self.prompts, self.rendered_prompts, self.add_special_tokens,
            self.sources, self.evaluation,
        )  # fmt: skip
        return {f"eval/{key}": value for key, value in results.items()}


# ---------------------------------------------------------------------------------------------------------------
# The script


def run_evaluation(data_args: DataArguments, evaluation: EvalArguments, source: str | None) -> Path:
    """Evaluates one policy (or each of `checkpoints`) and writes the results; returns the output folder."""
    policies = evaluation.checkpoints or ([evaluation.policy_name_or_path] if evaluation.policy_name_or_path else [])
    if not policies:
        raise RecipeError("policy_name_or_path is not set (or give checkpoints)")
    output_dir = check_output_dir(evaluation.output_dir, evaluation.overwrite_output_dir)
    reference_name = evaluation.reference_name_or_path or default_reference(policies[0])
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=_tokenizer_source(policies[0], reference_name)))
    sources = load_reward_sources(evaluation)
    prompts, rendered, add_special_tokens = held_out_prompts(data_args, tokenizer, evaluation.seed)
    perplexity_texts = _load_texts(evaluation.perplexity_texts) if evaluation.perplexity_texts else None
    reference_path = locate_model(reference_name, "reference_name_or_path")
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch_dtype(evaluation.dtype)).eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config((data_args, evaluation), source, output_dir / "eval.yaml")
    rows = []
    for policy_name in policies:
        policy = load_policy_for_eval(policy_name, evaluation.dtype)
        results, samples = evaluate_policy(
            policy, reference, tokenizer, prompts, rendered, add_special_tokens, sources, evaluation, perplexity_texts
        )
        rows.append({"policy": policy_name, **results})
        print(format_summary(policy_name, results, [s.name for s in sources]))
    _write_results(output_dir, rows, samples, evaluation, [s.name for s in sources])
    return output_dir


def _tokenizer_source(policy: str, reference: str) -> str:
    """A PPO output folder holds the tokenizer the policy was trained with (its pad token included)."""
    return policy if (Path(policy) / "tokenizer_config.json").is_file() else reference


def _load_texts(path: str) -> list[str]:
    from datasets import load_dataset

    from recipes.data import FILE_FORMATS

    suffix = Path(path).suffix
    if suffix not in FILE_FORMATS or not Path(path).is_file():
        raise RecipeError(f"perplexity_texts: no .jsonl/.json/.csv/.parquet file at {path}")
    dataset = load_dataset(FILE_FORMATS[suffix], data_files=path, split="train")
    if "text" not in dataset.column_names:
        raise RecipeError(f"perplexity_texts: {path} has no 'text' column (columns: {dataset.column_names})")
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
