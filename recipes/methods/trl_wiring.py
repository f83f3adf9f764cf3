"""What the kit's rivals to PPO share: TRL's own config dataclasses with the kit's run fields beside them, recipes
parsed strictly and refused when they set what the kit does not honour, the policy and tokenizer loaded as PPO
loads them, the kit's reward as one TRL reward function, the prompts as TRL's online trainers read them, and the
output folder every method leaves: a policy `scripts/evaluate.py` loads (LoRA adapter or full weights, with the
tokenizer), `recipe.yaml` and `metrics.jsonl`.

    recipe = parse_method_recipe("grpo", sys.argv[1:], (DataArguments, ModelArguments, GRPOConfig), ...)
    output_dir = check_output_dir(...); ...load and check everything...; open_outputs(recipe, output_dir)
    trainer = GRPOTrainer(..., callbacks=[MetricsFileCallback(output_dir / METRICS_FILE)]); trainer.train()
    save_and_close(trainer, output_dir)

TRL's trainers run as they are: the kit hands them loaded models, datasets in TRL's formats and callables.
"""

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments, set_seed
from trl import get_peft_config

from recipes.config import (
    METRICS_FILE,
    RESOLVED_RECIPE_FILE,
    ModelArguments,
    RecipeParser,
    check_output_dir,
    resolved_config,
    save_resolved_config,
)
from recipes.data import load_prompts
from recipes.devices import apply_cpu_defaults
from recipes.errors import RecipeError
from recipes.models import describe_reward, load_policy, load_reward, load_tokenizer, reference_mode
from recipes.ppo.config import TRAINING_RANGES, check_ranges, default_instance
from recipes.ppo.distributed import Backend
from recipes.rewards.sources import Episodes, RewardSource
from recipes.tracking import MetricsFileCallback, finish_wandb_run, start_wandb_run

# ---------------------------------------------------------------------------------------------------------------
# The training section: TRL's config plus the kit's run fields


@dataclass
class KitRunFields:
    """The run fields every method adds to its TRL config (as the PPO and reward recipes do), the ranges of its
    numbers (`RANGES`, as `recipes.ppo.config.check_ranges` reads them) and the kit's CPU defaults. Listed first
    among a method config's bases, so that its fields win."""

    RANGES: ClassVar[dict] = TRAINING_RANGES

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` (its files are replaced, nothing is deleted)."},
    )
    wandb_project: str = field(default="ppo-recipes", metadata={"help": "W&B project, when `report_to` has wandb."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})
    # TRL turns this deprecated alias on by default; None lets `activation_checkpointing` (off unless set) decide:
    # recomputing activations costs a third more time, and the kit's models do not need the memory.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )

    def __post_init__(self):
        # Before TRL's and TrainingArguments' own checks, some of which fail on such values with a bare
        # ZeroDivisionError or only once training has started.
        check_ranges(self, self.RANGES)
        apply_cpu_defaults(self)
        super().__post_init__()


GENERATION_BATCH_FIELDS = ("generation_batch_size", "steps_per_generation")
"""TRL derives whichever of the two is unset from the other and the number of processes."""


@dataclass
class OnlineRunFields(KitRunFields):
    """RLOO's and GRPO's budget in the kit's unit, completions sampled (PPO's `total_episodes`), beside TRL's own
    `max_steps`, which it sets."""

    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Completions to sample over the run (the budget, as PPO's total_episodes); sets max_steps. "
                  "Default: TRL's max_steps or num_train_epochs."},
    )

    RANGES: ClassVar[dict] = {
        **TRAINING_RANGES,
        "total_episodes": (1, None, "at least 1"),
        "num_generations": (2, None, "at least 2 (a completion's advantage compares it with its prompt's others)"),
        "max_completion_length": (1, None, "at least 1 token"),
        "temperature": (1e-6, None, "above 0 (sampling divides the logits by it)"),
        "beta": (0, None, "at least 0 (0: no KL term)"),
        "num_iterations": (1, None, "at least 1"),
        "epsilon": (1e-9, None, "above 0"),
        "generation_batch_size": (1, None, "at least 1"),
        "steps_per_generation": (1, None, "at least 1"),
    }

    def __post_init__(self):
        given = {name for name in GENERATION_BATCH_FIELDS if getattr(self, name) is not None}
        super().__post_init__()
        # Derived values depend on the number of processes: a saved recipe keeps only what was given.
        self._derived_fields = [name for name in GENERATION_BATCH_FIELDS if name not in given]
        if self.total_episodes is not None:
            if self.max_steps > 0:
                raise RecipeError("total_episodes and max_steps are both set: give the budget as one of them")
            self.max_steps = GenerationPlan.of(self).optimizer_steps
            self._derived_fields.append("max_steps")


@dataclass(frozen=True)
class GenerationPlan:
    """How RLOO's and GRPO's trainers in TRL count: every `steps_per_generation × num_iterations` micro-batches the
    policy samples one generation batch (`generation_batch_size` completions over all processes: prompts ×
    `num_generations` each); `gradient_accumulation_steps` micro-batches make an optimizer step."""

    generation_batch_size: int
    num_generations: int
    steps_per_generation: int
    num_iterations: int
    gradient_accumulation_steps: int
    total_episodes: int

    @classmethod
    def of(cls, config) -> "GenerationPlan":
        plan = cls(
            generation_batch_size=config.generation_batch_size,
            num_generations=config.num_generations,
            steps_per_generation=config.steps_per_generation,
            num_iterations=config.num_iterations,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            total_episodes=config.total_episodes,
        )
        if plan.total_episodes % plan.generation_batch_size:
            raise RecipeError(
                f"total_episodes={plan.total_episodes} is not a whole number of generation batches of "
                f"{plan.generation_batch_size} completions (per_device_train_batch_size × processes × "
                "steps_per_generation)"
            )
        if plan.generations * plan.micro_batches_per_generation % plan.gradient_accumulation_steps:
            raise RecipeError(
                f"total_episodes={plan.total_episodes} gives {plan.generations} generations × "
                f"{plan.micro_batches_per_generation} micro-batches, not a whole number of optimizer steps of "
                f"{plan.gradient_accumulation_steps} (gradient_accumulation_steps)"
            )
        return plan

    @property
    def generations(self) -> int:
        return self.total_episodes // self.generation_batch_size

    @property
    def micro_batches_per_generation(self) -> int:
        return self.steps_per_generation * self.num_iterations

    @property
    def optimizer_steps(self) -> int:
        return self.generations * self.micro_batches_per_generation // self.gradient_accumulation_steps

    def describe(self) -> str:
        prompts = self.generation_batch_size // self.num_generations
        return (
            f"{self.generation_batch_size} completions per generation ({prompts} prompts × {self.num_generations}); "
            f"{self.total_episodes} completions → {self.generations} generations × {self.steps_per_generation} "
            f"steps × {self.num_iterations} iterations / {self.gradient_accumulation_steps} accumulation = "
            f"{self.optimizer_steps} optimizer steps"
        )


def describe_steps(config: TrainingArguments, processes: int, examples: int, unit: str) -> str:
    """The batch arithmetic of an offline trainer (SFT, DPO) over `examples` rows, as the config files write it."""
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
    if config.max_steps > 0:
        total = f"max_steps → {config.max_steps} steps ({config.max_steps * per_step} {unit})"
    else:
        batches = math.ceil(examples / (config.per_device_train_batch_size * processes))
        steps = math.ceil(config.num_train_epochs * max(batches // config.gradient_accumulation_steps, 1))
        total = f"{examples} {unit} × {config.num_train_epochs:g} epochs → {steps} steps"
    return (
        f"{config.per_device_train_batch_size} {unit} per device × {config.gradient_accumulation_steps} accumulation "
        f"× {processes} processes = {per_step} {unit} per optimizer step; {total}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Recipes


@dataclass
class MethodRecipe:
    """A parsed recipe of one method: its data, model and training sections."""

    method: str
    data: Any
    model: ModelArguments
    training: TrainingArguments
    source: str | None = None
    """The YAML file it came from (None: defaults and flags only)."""

    @property
    def parts(self) -> tuple:
        return (self.data, self.model, as_given(self.training))

    def to_dict(self) -> dict[str, Any]:
        return resolved_config(self.parts)

    def save_yaml(self, path: str | Path) -> None:
        save_resolved_config(self.parts, self.source, path)


def as_given(training):
    """`training` with the fields its `__post_init__` derived (`_derived_fields`) back at their defaults, so that
    a saved recipe reruns the same way on another number of processes."""
    derived = getattr(training, "_derived_fields", [])
    if not derived:
        return training
    given, defaults = copy.copy(training), default_instance(type(training))
    for name in derived:
        setattr(given, name, getattr(defaults, name))
    return given


# Fields of TRL's configs whose job the kit does itself, for every method, and what to do instead.
NOT_READ_BY_ANY = {
    "model_init_kwargs": "the kit loads the policy from the model section (dtype, attn_implementation, quantization)",
    "trust_remote_code": "the kit loads models without remote code",
    "deepspeed": "use an accelerate launch config (configs/accelerate/deepspeed_zero*.yaml)",
    "fsdp": "use an accelerate launch config (configs/accelerate/fsdp.yaml)",
    "fsdp_config": "use an accelerate launch config (configs/accelerate/fsdp.yaml)",
    "resume_from_checkpoint": "the kit's methods start afresh; rerun with a new output_dir",
}

# PPO's model fields: a critic, and a reference other than the policy's own base.
PPO_ONLY_MODEL_FIELDS = {
    "value_model_init": "it is PPO's critic, which this method does not have",
    "value_use_peft": "it is PPO's critic, which this method does not have",
    "ref_model_name_or_path": "TRL's trainers take the reference from the policy (its base with the LoRA adapter "
    "disabled, or a copy of model_name_or_path)",
    "ref_quantization": "TRL's trainers take the reference from the policy (its base with the LoRA adapter "
    "disabled, or a copy of model_name_or_path)",
}

# How the kit's online methods sample and score; changing these would make their completions another distribution
# than the one scripts/evaluate.py (and PPO) sample from, or drop the columns the kit's reward reads.
ONLINE_NOT_READ = {
    **PPO_ONLY_MODEL_FIELDS,
    "top_p": "the kit samples from softmax(logits / temperature) alone, as PPO and scripts/evaluate.py do",
    "top_k": "the kit samples from softmax(logits / temperature) alone, as PPO and scripts/evaluate.py do",
    "min_p": "the kit samples from softmax(logits / temperature) alone, as PPO and scripts/evaluate.py do",
    "repetition_penalty": "the kit samples from softmax(logits / temperature) alone, as PPO and scripts/evaluate.py do",
    "generation_kwargs": "the kit samples from softmax(logits / temperature) alone, as PPO and scripts/evaluate.py do",
    "remove_unused_columns": "the kit's reward reads the prompt columns beside `prompt`",
    "eval_strategy": "evaluate the saved policy and its checkpoints with scripts/evaluate.py (--checkpoints)",
    "eval_steps": "evaluate the saved policy and its checkpoints with scripts/evaluate.py (--checkpoints)",
}


REWARD_MODEL_FIELDS = ("reward_model_name_or_path", "reward_quantization", "reward_model_tokenizer",
                       "reward_functions", "reward_weights")  # fmt: skip


def parse_method_recipe(
    method: str,
    args: list[str],
    dataclass_types: tuple[type, type, type],
    default_config: str | None,
    not_read: dict[str, str],
) -> MethodRecipe:
    """Parses `--config file.yaml` (or `default_config`) plus command-line overrides into (data, model, training);
    a field of `not_read` (or of `NOT_READ_BY_ANY`) set differently from its default is an error naming it."""
    (data, model, training), source = RecipeParser(dataclass_types).parse(args, default_config=default_config)
    where = f" (recipe {source})" if source else ""
    for part in (data, model, training):
        defaults = default_instance(type(part))
        for name, why in {**NOT_READ_BY_ANY, **not_read}.items():
            if hasattr(part, name) and getattr(part, name) != getattr(defaults, name):
                raise RecipeError(f"'{name}' is not read by the {method} recipe: {why}{where}")
    return MethodRecipe(method=method, data=data, model=model, training=training, source=source)


def check_reference(model_args: ModelArguments, method: str) -> str:
    """What TRL's trainers take as the reference: the LoRA policy with its adapter disabled, or (full fine-tuning)
    a frozen copy of the policy's base. A recipe asking for anything else is refused."""
    mode = reference_mode(model_args)
    if mode == "separate" and model_args.use_peft:
        raise RecipeError(
            f"reference: 'separate' with LoRA is not how TRL's {method} trainer works (it disables the adapter); "
            "use reference: auto"
        )
    return "the policy with its adapter disabled" if mode == "adapter_disabled" else "a frozen copy of the policy"


# ---------------------------------------------------------------------------------------------------------------
# The kit's reward and prompts in TRL's terms


class RewardFunction:
    """The kit's reward (`recipes.models.load_reward`: a reward model and/or reward functions, weighted) as one TRL
    reward function, scored through `RewardSource.score` as PPO scores: TRL calls it with the prompts as its dataset
    holds them, the completions (text, or one assistant turn) and their token ids; the kit's columns beside `prompt`
    (`trl_prompt_dataset`) give the prompt as reward functions read it and the policy's prompt tokens. Each source's
    mean goes to TRL's metrics as `rewards/<source>/mean` when the reward has several."""

    def __init__(self, source: RewardSource, pad_token_id: int):
        self.source = source
        self.pad_token_id = pad_token_id
        self.__name__ = source.name  # TRL logs the total as rewards/<__name__>/mean
        self.completions_scored = 0

    def __call__(self, prompts, completions, completion_ids, reward_prompt, prompt_ids, log_metric=None, **_):
        chat = isinstance(prompts[0], list)
        episodes = Episodes(
            prompts=list(reward_prompt),
            completions=[completion[-1]["content"] for completion in completions] if chat else list(completions),
            conversations=[list(prompt) for prompt in prompts] if chat else None,
            token_ids=policy_tokens(prompt_ids, completion_ids, self.pad_token_id),
            pad_token_id=self.pad_token_id,
        )
        scores = self.source.score(episodes)
        if log_metric is not None and len(scores.by_source) > 1:
            for name, values in scores.by_source.items():
                log_metric(f"rewards/{name}/mean", values.float().mean().item())
        self.completions_scored += len(episodes)
        return scores.total.tolist()


def policy_tokens(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """[B, W + T] in the kit's layout (`recipes.generation`): prompts left-padded to W, completions (ended at the
    stop token) right-padded to T."""
    width, length = max(map(len, prompt_ids)), max(1, max(map(len, completion_ids)))
    rows = torch.full((len(prompt_ids), width + length), pad_token_id, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        rows[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
        rows[row, width : width + len(completion)] = torch.tensor(completion, dtype=torch.long)
    return rows


def capped_splits(raw: dict, columns: list[str], limits: dict, dataset_name: str, what: str,
                  rename: dict | None = None) -> tuple[Dataset, Dataset]:
    """(train, held-out) from `raw` ({"train", "eval"}): only `columns` (renamed by `rename`), each split cut to
    its entry in `limits` (None: all of it); an empty training split is refused, naming the `what` it lacks."""
    splits = {}
    for split, dataset in raw.items():
        dataset = dataset.select_columns(columns).rename_columns(rename or {})
        if limits[split] is not None:
            dataset = dataset.select(range(min(limits[split], len(dataset))))
        splits[split] = dataset
    if len(splits["train"]) == 0:
        raise RecipeError(f"dataset_name: '{dataset_name}' has no training {what}")
    return splits["train"], splits["eval"]


def trl_prompt_dataset(prompts: Dataset) -> Dataset:
    """The kit's tokenised prompts (`recipes.data.load_prompts`: `input_ids`, `prompt`, `messages`) as TRL's online
    trainers read them: `prompt` holds the chat turns when the kit renders them with the chat template (TRL then
    renders and tokenises them exactly so), the plain text otherwise (tokenised as the kit does); `reward_prompt`
    and `prompt_ids` are read by `RewardFunction`."""
    chat = all(len(messages) > 0 for messages in prompts["messages"])
    return Dataset.from_dict(
        {
            "prompt": list(prompts["messages"] if chat else prompts["prompt"]),
            "reward_prompt": list(prompts["prompt"]),
            "prompt_ids": list(prompts["input_ids"]),
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# The output folder


def open_outputs(recipe: MethodRecipe, output_dir: Path) -> None:
    """Once everything has been checked on every process: the main one creates the output folder with the
    resolved `recipe.yaml` and an empty `metrics.jsonl`, and starts the W&B run (which transformers' W&B callback
    then logs to)."""
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.save_yaml(output_dir / RESOLVED_RECIPE_FILE)
        (output_dir / METRICS_FILE).write_text("")
        training = recipe.training
        if "wandb" in (training.report_to or []):
            start_wandb_run(training.wandb_project, training.run_name, training.wandb_tags, recipe.to_dict())


def save_and_close(trainer, output_dir: Path) -> None:
    """Saves the trained policy (LoRA adapter naming its base, or full weights) with the tokenizer to `output_dir`
    (every process takes part: sharded weights are gathered first) and ends the W&B run."""
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        finish_wandb_run()
    trainer.accelerator.print(f"saved the policy, {RESOLVED_RECIPE_FILE} and {METRICS_FILE} to {output_dir}")


def describe_policy(model_args: ModelArguments, policy: PreTrainedModel) -> str:
    layers = getattr(policy.config.get_text_config(), "num_hidden_layers", "?")
    return f"policy {model_args.model_name_or_path} ({layers} layers, {'LoRA' if model_args.use_peft else 'full'})"


# ---------------------------------------------------------------------------------------------------------------
# RLOO and GRPO: one run, two trainers


def run_online_method(recipe: MethodRecipe, trainer_class) -> Path:
    """Trains the policy with TRL's RLOO or GRPO trainer against the kit's reward, on the kit's prompts; returns
    the output folder. Everything that can be wrong with the input is checked before the folder is touched."""
    state = PartialState()
    training, model_args = recipe.training, recipe.model
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir)
    reference = check_reference(model_args, recipe.method) if training.beta else "none (beta: 0)"
    tokenizer = load_tokenizer(model_args)
    prompts = load_prompts(recipe.data, tokenizer, seed=training.seed)
    state.print(prompts.describe(recipe.data.max_prompt_length))
    if training.total_episodes is not None:
        state.print(f"budget: {GenerationPlan.of(training).describe()}")
    # LoRA matrices are drawn from the global generator: seeded, a run is reproducible.
    set_seed(training.seed)
    reward = RewardFunction(load_reward(model_args, with_critic=False), tokenizer.pad_token_id)
    policy = load_policy(model_args)
    state.print(
        f"models: {describe_policy(model_args, policy)}, reference {reference}, reward {describe_reward(model_args)}"
    )
    open_outputs(recipe, output_dir)

    trainer = trainer_class(
        model=policy,
        reward_funcs=reward,
        args=training,
        train_dataset=trl_prompt_dataset(prompts.train),
        processing_class=tokenizer,
        # TRL wraps the policy itself: a PeftModel handed over ready-made would get a frozen copy of its adapter
        # as the reference instead of the adapter disabled.
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsFileCallback(output_dir / METRICS_FILE)],
    )
    Backend(trainer.accelerator).prepare_reward(reward.source)
    trainer.train()
    scored = trainer.accelerator.reduce(torch.tensor(reward.completions_scored, device=trainer.accelerator.device))
    state.print(f"{int(scored)} completions sampled and scored in {trainer.state.global_step} optimizer steps")
    save_and_close(trainer, output_dir)
    return output_dir
