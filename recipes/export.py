"""A model users can ship: a PPO run's policy (its final one, or one of its checkpoints) or a reward model the kit
trained, as one folder that `from_pretrained` loads without peft or bitsandbytes, with a model card; pushed to the
hub when asked.

    python scripts/export.py --model_dir outputs/<model>/ppo --output_dir outputs/<model>/export \
        [--eval_dir outputs/<model>/eval] [--push_to_hub true --hub_model_id <user>/<name>]

A LoRA policy is merged into its base, loaded from the base's own checkpoint in the recipe's `dtype` (for a QLoRA
run, the compute dtype: the adapter is not merged into 4-bit weights, which would round most of it away); a policy
trained in full, and a reward model (saved merged by scripts/train_reward.py), are copied. The card (README.md)
records the recipe (the resolved recipe.yaml beside the model), the reward, and the evaluation of the policy
(scripts/evaluate.py's eval_results.json, from --eval_dir or found beside the run) or the reward model's validation
accuracy. Everything is checked before anything is written; the folder is written under a hidden name and renamed
into place once complete.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.config import METRICS_FILE, RESOLVED_RECIPE_FILE, RecipeParser, parse_recipe
from recipes.errors import RecipeError
from recipes.evaluation import parse_eval_config
from recipes.models import describe_reward, locate_model, torch_dtype
from recipes.ppo.checkpoint import PROGRESS_FILE, VALUE_MODEL_DIR

CARD_FILE = "README.md"
# What a kit output holds beside the model's own files; left out of the exported folder.
KIT_FILES = {RESOLVED_RECIPE_FILE, METRICS_FILE, PROGRESS_FILE, CARD_FILE, "training_args.bin"}
# What scripts/evaluate.py writes: the last policy's results, every policy's of a sweep, its resolved config.
RESULTS_FILE, SWEEP_FILE, EVAL_CONFIG_FILE = "eval_results.json", "sweep.jsonl", "eval.yaml"


@dataclass
class ExportArguments:
    """What to export, where to, and whether to push it."""

    model_dir: str | None = field(
        default=None,
        metadata={"help": "A PPO output folder, one of its checkpoints (output_dir/checkpoints/update-N), or a "
                  "reward model folder written by scripts/train_reward.py."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the shippable folder goes (a new folder, or see overwrite_output_dir)."}
    )
    eval_dir: str | None = field(
        default=None,
        metadata={"help": "An evaluation folder (scripts/evaluate.py) of this policy, whose figures go into the card. "
                  "Default: a folder beside model_dir (or beside its run, for a checkpoint) that evaluated it, if "
                  "any."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace output_dir if it exists (once the new folder is complete)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the exported folder to hub_model_id."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "The hub repository to push to, '<user or org>/<name>' (created if absent)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the hub repository private."})


@dataclass
class KitOutput:
    """What `model_dir` holds: a policy (LoRA adapter or full weights) or a reward model, with its recipe."""

    path: Path
    kind: str
    """'policy' or 'reward_model'."""
    adapter: bool
    recipe_text: str
    progress: dict | None = None
    """A checkpoint's progress.json (its update and episode counts); None for a run's final policy."""

    @property
    def run_dir(self) -> Path:
        """The run's output folder: the checkpoint's grandparent, or the folder itself."""
        return self.path.parents[1] if self.progress is not None else self.path


@dataclass
class Evaluation:
    """One row of an evaluation folder's results, and what its sources were."""

    folder: Path
    results: dict[str, Any]
    reward_models: list[str]
    dataset_name: str | None


def parse_export_args(args: list[str]) -> ExportArguments:
    (export,), _ = RecipeParser((ExportArguments,)).parse(args)
    return export


def export_model(args: ExportArguments) -> Path:
    """Checks everything, writes the exported folder, pushes it when asked; returns the folder."""
    target = _check_target(args)
    _check_push(args)
    source = read_kit_output(args.model_dir)
    evaluation = find_evaluation(source, args.eval_dir)
    recipe = parse_recipe(["--config", str(source.path / RESOLVED_RECIPE_FILE)]) if source.kind == "policy" else None
    base_name = _adapter_base(source) if source.adapter else None
    if base_name is not None:
        locate_model(base_name, "base_model_name_or_path")  # fails here, before anything is written

    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        how = _merge_adapter(source, recipe, base_name, staging) if source.adapter else _copy_weights(source, staging)
        name = args.hub_model_id or target.name
        card = model_card(source, recipe, evaluation, name, how)
        (staging / CARD_FILE).write_text(card)
        _replace(target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {source.kind.replace('_', ' ')} {source.path} → {target} ({how})")
    if evaluation is not None:
        print(f"model card: evaluation of {evaluation.folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(target, args.hub_model_id, args.hub_private, source)}")
    return target


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _check_target(args: ExportArguments) -> Path:
    if not args.output_dir:
        raise RecipeError("output_dir is not set: name the folder the exported model goes to")
    if not args.model_dir:
        raise RecipeError("model_dir is not set: name a PPO output folder, one of its checkpoints or a reward model")
    target = Path(args.output_dir)
    model_dir = Path(args.model_dir).resolve()
    if target.resolve() == model_dir or model_dir in target.resolve().parents:
        raise RecipeError(f"output_dir: {args.output_dir} is inside model_dir; export to a folder of its own")
    if target.exists() and not target.is_dir():
        raise RecipeError(f"output_dir: {args.output_dir} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite_output_dir:
        raise RecipeError(
            f"output_dir: {args.output_dir} is not empty; choose a new output_dir or pass --overwrite_output_dir true"
        )
    return target


def _check_push(args: ExportArguments) -> None:
    """Everything a push needs that can be known before the export: an id of the right form, the hub allowed, a
    token."""
    if not args.push_to_hub:
        if args.hub_model_id or args.hub_private:
            raise RecipeError("hub_model_id/hub_private are set but push_to_hub is not: add --push_to_hub true")
        return
    if not args.hub_model_id:
        raise RecipeError("hub_model_id: --push_to_hub needs the repository to push to, e.g. --hub_model_id user/name")
    try:
        validate_repo_id(args.hub_model_id)
    except HFValidationError as error:
        raise RecipeError(f"hub_model_id: '{args.hub_model_id}' is not a repository id: {error}") from error
    if "/" not in args.hub_model_id:
        raise RecipeError(f"hub_model_id: '{args.hub_model_id}' needs its owner: '<user or org>/{args.hub_model_id}'")
    if constants.HF_HUB_OFFLINE:
        raise RecipeError("push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or export only")
    if get_token() is None:
        raise RecipeError("push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")


def read_kit_output(model_dir: str) -> KitOutput:
    """What `model_dir` is, from its files; errors name model_dir and say what the kit writes."""
    path = Path(model_dir)
    if not path.is_dir():
        raise RecipeError(f"model_dir: no folder at {model_dir}")
    recipe = path / RESOLVED_RECIPE_FILE
    has_weights = (path / "config.json").is_file()
    adapter = (path / "adapter_config.json").is_file()
    if not recipe.is_file():
        raise RecipeError(
            f"model_dir: {model_dir} is not an output of this kit (no {RESOLVED_RECIPE_FILE} beside the model); give "
            "a PPO output folder, one of its checkpoints (checkpoints/update-N) or a reward model folder"
        )
    progress = json.loads((path / PROGRESS_FILE).read_text()) if (path / PROGRESS_FILE).is_file() else None
    if (path / VALUE_MODEL_DIR).is_dir() and (adapter or has_weights):
        return KitOutput(path, "policy", adapter, recipe.read_text(), progress)
    if has_weights and _is_one_score_classifier(path / "config.json"):
        return KitOutput(path, "reward_model", False, recipe.read_text())
    checkpoints = sorted((path / "checkpoints").glob("update-*"))
    if checkpoints:
        raise RecipeError(
            f"model_dir: {model_dir} holds no final policy (the run has not finished); export one of its checkpoints, "
            f"e.g. {checkpoints[-1]}"
        )
    raise RecipeError(
        f"model_dir: {model_dir} holds neither a PPO policy (adapter or weights beside {VALUE_MODEL_DIR}/) nor a "
        "one-score reward model"
    )


def _is_one_score_classifier(config_file: Path) -> bool:
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures) and (
        len(config.get("id2label", {"0": ""})) == 1
    )


def _adapter_base(source: KitOutput) -> str:
    return json.loads((source.path / "adapter_config.json").read_text())["base_model_name_or_path"]


# ---------------------------------------------------------------------------------------------------------------
# The evaluation that goes into the card


def find_evaluation(source: KitOutput, eval_dir: str | None) -> Evaluation | None:
    """The evaluation of this policy: from `eval_dir`, or else the newest folder beside the model (or beside its
    run, for a checkpoint) whose eval_results.json or sweep.jsonl has a row for it."""
    if eval_dir is not None:
        if source.kind != "policy":
            raise RecipeError(
                "eval_dir: evaluations are of policies; a reward model's card has its validation accuracy"
            )
        folder = Path(eval_dir)
        if not (folder / RESULTS_FILE).is_file():
            raise RecipeError(f"eval_dir: no {RESULTS_FILE} in {eval_dir} (scripts/evaluate.py writes it)")
        evaluation = _evaluation_of(folder, source.path)
        if evaluation is None:
            evaluated = json.loads((folder / RESULTS_FILE).read_text()).get("policy")
            raise RecipeError(f"eval_dir: {eval_dir} evaluated {evaluated}, not {source.path}")
        return evaluation
    if source.kind != "policy":
        return None
    found = []
    for parent in dict.fromkeys([source.path.parent, source.run_dir.parent]):
        for folder in sorted(p for p in parent.iterdir() if (p / RESULTS_FILE).is_file()):
            evaluation = _evaluation_of(folder, source.path)
            if evaluation is not None:
                found.append(evaluation)
    return max(found, key=lambda e: (e.folder / RESULTS_FILE).stat().st_mtime, default=None)


def _evaluation_of(folder: Path, policy: Path) -> Evaluation | None:
    """The row of `folder`'s results for `policy` (eval_results.json holds the last policy evaluated, sweep.jsonl
    every one of a sweep), or None."""
    rows = [json.loads((folder / RESULTS_FILE).read_text())]
    if (folder / SWEEP_FILE).is_file():
        rows += [json.loads(line) for line in (folder / SWEEP_FILE).read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r.get("policy") and Path(r["policy"]).resolve() == policy.resolve()), None)
    if row is None:
        return None
    reward_models, dataset_name = [], None
    if (folder / EVAL_CONFIG_FILE).is_file():
        data, evaluation, _ = parse_eval_config(["--config", str(folder / EVAL_CONFIG_FILE)])
        reward_models, dataset_name = [Path(name).name for name in evaluation.reward_models or []], data.dataset_name
    return Evaluation(folder, row, reward_models, dataset_name)


# ---------------------------------------------------------------------------------------------------------------
# Writing the model


def merge_dtype(recipe) -> torch.dtype | str:
    """The dtype the base is loaded in for the merge: the recipe's `dtype`, the compute dtype of a 4- or 8-bit
    base (float32 when the recipe leaves it to 'auto', as the kit's quantization config does)."""
    dtype = torch_dtype(recipe.model.dtype)
    quantized = recipe.model.load_in_4bit or recipe.model.load_in_8bit
    if quantized and not isinstance(dtype, torch.dtype):
        return torch.float32
    return dtype if dtype is not None else "auto"


def _merge_adapter(source: KitOutput, recipe, base_name: str, staging: Path) -> str:
    """The base (unquantized, in `merge_dtype`) with the adapter merged in; the run's tokenizer (its pad token)."""
    dtype = merge_dtype(recipe)
    base = AutoModelForCausalLM.from_pretrained(
        locate_model(base_name, "base_model_name_or_path"), dtype=dtype, revision=recipe.model.model_revision
    )
    merged = PeftModel.from_pretrained(base, source.path).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    dtype_name = str(next(merged.parameters()).dtype).removeprefix("torch.")
    quantized = "a 4-bit" if recipe.model.load_in_4bit else "an 8-bit" if recipe.model.load_in_8bit else None
    trained_on = f", trained on {quantized} copy of it" if quantized else ""
    return f"LoRA adapter merged into {base_name} in {dtype_name}{trained_on}"


def _copy_weights(source: KitOutput, staging: Path) -> str:
    """The model's own files (weights, config, tokenizer), without the kit's (recipe, metrics, value model...)."""
    for file in sorted(source.path.iterdir()):
        if file.is_file() and file.name not in KIT_FILES:
            shutil.copy2(file, staging / file.name)
    return "weights copied"


def _replace(target: Path, staging: Path) -> None:
    """`staging` renamed to `target`; an existing `target` (overwrite_output_dir) is moved aside first and removed
    only once the new folder is in place."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The model card


def model_card(source: KitOutput, recipe, evaluation: Evaluation | None, name: str, how: str) -> str:
    """README.md: metadata (base model, tags, the evaluation's figures as model-index results) and text."""
    if source.kind == "policy":
        base_name = recipe.model.model_name_or_path
        body = _policy_text(source, recipe, evaluation, name, how)
    else:
        base_name = (yaml.safe_load(source.recipe_text) or {}).get("model_name_or_path")
        body = _reward_model_text(source, name, how)
    data = ModelCardData(
        model_name=name,
        base_model=base_name if base_name and _is_hub_id(base_name) else None,
        library_name="transformers",
        pipeline_tag="text-generation" if source.kind == "policy" else "text-classification",
        tags=["ppo-recipes", "rlhf", "ppo" if source.kind == "policy" else "reward-model"],
        eval_results=_eval_results(evaluation) if evaluation is not None else None,
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _is_hub_id(name: str) -> bool:
    """A hub id (the card's `base_model` must be one), not a local folder."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def headline_figures(results: dict[str, Any]) -> list[str]:
    """The keys of eval_results.json the card reports: each source's mean reward for both models and win-rate,
    the KL estimates and both perplexities."""
    sources = [key.removeprefix("reward/").removesuffix("/mean") for key in results
               if key.startswith("reward/") and key.endswith("/mean")]  # fmt: skip
    keys = []
    for source in sources:
        keys += [f"reward/{source}/mean", f"reference/reward/{source}/mean", f"win_rate/{source}"]
    keys += ["kl/k1/mean", "kl/k3/mean", "perplexity/policy", "perplexity/reference"]
    return [key for key in keys if key in results]


def _eval_results(evaluation: Evaluation) -> list[EvalResult]:
    dataset = evaluation.dataset_name or "held-out prompts"
    return [
        EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=f"{dataset} (held out)",
                   metric_type=key, metric_name=key, metric_value=evaluation.results[key])
        for key in headline_figures(evaluation.results)
    ]  # fmt: skip


def _policy_text(source: KitOutput, recipe, evaluation: Evaluation | None, name: str, how: str) -> str:
    model_args, training = recipe.model, recipe.training
    stage = (f"update {source.progress['update']} ({source.progress['episode']} episodes) of"
             if source.progress is not None else "the end of")  # fmt: skip
    lines = [
        f"# {name}",
        "",
        f"`{model_args.model_name_or_path}` trained with PPO by the PPO recipe kit: the policy at {stage} the run "
        f"in `{source.run_dir}` ({how}).",
    ]
    if model_args.load_in_4bit or model_args.load_in_8bit:
        lines += ["", "The adapter was trained against a quantized copy of the base; merged into the base's own "
                  "weights, this model differs from the policy as trained by the base's quantization error."]
    lines += [
        "",
        "## Reward",
        "",
        f"PPO maximised {describe_reward(model_args)}, less {training.kl_coef:g} × the KL to the reference "
        "(`kl_coef`).",
    ]
    reward_model = model_args.reward_model_name_or_path
    accuracy = _validation_accuracy(Path(reward_model)) if reward_model else None
    if accuracy is not None:
        lines += ["", f"The reward model was trained by the kit: validation accuracy {accuracy}."]
    lines += ["", "## Evaluation", ""]
    if evaluation is None:
        lines.append("Not evaluated (no evaluation folder given or found beside the run).")
    else:
        lines += _evaluation_table(evaluation)
    lines += ["", "## Recipe", "", f"The resolved recipe of the run (`{RESOLVED_RECIPE_FILE}`):", "", "```yaml",
              source.recipe_text.rstrip(), "```", "", *_usage(name, "AutoModelForCausalLM")]  # fmt: skip
    return "\n".join(lines) + "\n"


def _reward_model_text(source: KitOutput, name: str, how: str) -> str:
    accuracy = _validation_accuracy(source.path)
    lines = [
        f"# {name}",
        "",
        "A reward model (one score per conversation, read at the EOS that closes the assistant's turn) trained on "
        f"preference pairs by the PPO recipe kit (`scripts/train_reward.py`, `{source.path}`; {how}).",
        "",
        "## Validation",
        "",
        f"Accuracy {accuracy}." if accuracy is not None else f"No final validation figures in its {METRICS_FILE}.",
        "",
        "## Recipe",
        "",
        f"The resolved recipe of the run (`{RESOLVED_RECIPE_FILE}`):",
        "",
        "```yaml",
        source.recipe_text.rstrip(),
        "```",
        "",
        *_usage(name, "AutoModelForSequenceClassification"),
    ]
    return "\n".join(lines) + "\n"


def _validation_accuracy(folder: Path) -> str | None:
    """'0.874 (chosen scored above rejected in 250 held-out pairs; mean margin 1.2)' from a kit-trained reward
    model's metrics.jsonl, or None for a reward model the kit did not train (or not found here)."""
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        return None
    final = {}
    for line in metrics.read_text().splitlines():
        if line.strip():
            final.update({k: v for k, v in json.loads(line).items() if k.startswith("final/eval/")})
    if "final/eval/accuracy" not in final:
        return None
    return (f"{final['final/eval/accuracy']:.3f} (chosen scored above rejected in {final['final/eval/pairs']} "
            f"held-out pairs; mean margin {final['final/eval/margin']:.3f})")  # fmt: skip


def _evaluation_table(evaluation: Evaluation) -> list[str]:
    results = evaluation.results
    sources = [key.removeprefix("reward/").removesuffix("/mean") for key in headline_figures(results)
               if key.startswith("reward/")]  # fmt: skip
    lines = [
        f"On {results.get('num_prompts', '?')} held-out prompts"
        + (f" of `{evaluation.dataset_name}`" if evaluation.dataset_name else "")
        + f", sampled from the policy and from its reference (`scripts/evaluate.py`, `{evaluation.folder}`):",
        "",
        "| reward | kind | policy | reference | win-rate |",
        "|---|---|---|---|---|",
    ]
    for source in sources:
        kind = "reward model (proxy)" if source in evaluation.reward_models else "reward function"
        lines.append(
            f"| {source} | {kind} | {results[f'reward/{source}/mean']:.4g} | "
            f"{results[f'reference/reward/{source}/mean']:.4g} | {results[f'win_rate/{source}']:.4g} |"
        )
    lines += [
        "",
        f"KL(policy ‖ reference) per completion: {results['kl/k1/mean']:.4g} nats (k1), {results['kl/k3/mean']:.4g} "
        f"(k3). Perplexity: policy {results['perplexity/policy']:.4g}, "
        f"reference {results['perplexity/reference']:.4g}.",
    ]
    return lines


def _usage(name: str, auto_class: str) -> list[str]:
    return ["## Use", "", "```python", f"from transformers import {auto_class}, AutoTokenizer", "",
            f'model = {auto_class}.from_pretrained("{name}")', f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            "```"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Pushing


def push_folder(folder: Path, repo_id: str, private: bool, source: KitOutput) -> str:
    """Uploads `folder` to the hub repository `repo_id` (created if absent) with huggingface_hub's HfApi, which
    reads HF_ENDPOINT and the token; returns the commit's url."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                   commit_message=f"Export of {source.path} by the PPO recipe kit")  # fmt: skip
    except (HfHubHTTPError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            f"push_to_hub: could not push to '{repo_id}' ({api.endpoint}): {first_line}; the export in {folder} is "
            "complete: push it again with `hf upload {repo_id} {folder}`"
        ) from error
    return commit.commit_url
