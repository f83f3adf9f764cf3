"""The PPO algorithm's fields: TRL's `PPOConfig` names and defaults (trl ≤ 1.12), carried by the kit's engine, on
transformers' `TrainingArguments` (optimizer, schedule, precision, seed, output folder, reporting).

    per_device_train_batch_size × gradient_accumulation_steps × processes = episodes per update
    episodes per update / num_mini_batches = episodes per optimizer step (a mini-batch)
    num_ppo_epochs × num_mini_batches = optimizer steps per update

A mini-batch is processed in micro-batches of at most `per_device_train_batch_size` episodes per process whose
gradients are averaged before the step. Parsing this module's fields loads no model and no engine.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from recipes.devices import apply_cpu_defaults
from recipes.errors import RecipeError


@dataclass
class PPOConfig(TrainingArguments):
    """TRL's PPO fields (same names, defaults and meaning) plus the kit's run fields, on `TrainingArguments`."""

    # -- TRL's PPOConfig ------------------------------------------------------------------------------------------
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW's learning rate (TRL's PPO default)."})
    num_mini_batches: int = field(
        default=1, metadata={"help": "Optimizer steps per PPO epoch: the update's episodes are split into this many."}
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Episodes (prompt + sampled response) to train on. Default: num_train_epochs × prompts."},
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Episodes per generate call and per scoring forward, on each process."}
    )
    num_sample_generations: int = field(
        default=10,
        metadata={"help": "How many times during the run to print (and log to W&B) a table of near-greedy "
                  "completions of held-out prompts with their scores (0: never)."},
    )
    response_length: int = field(default=53, metadata={"help": "Tokens sampled per response at most."})
    stop_token: Literal["eos"] | None = field(
        default=None,
        metadata={"help": "'eos': a response ends at the tokenizer's EOS (later tokens are padding, not trained on)."},
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "A token id that ends a response (instead of stop_token)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (no top-k, no top-p)."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of every response that does not contain the EOS token."},
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each update's episodes."})
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Scale the per-token rewards to unit variance over the update (mean kept) before GAE."},
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1",
        metadata={"help": "Per-token KL estimator in the reward: 'k1' (log p − log q; unbiased, can be negative) or "
                  "'k3' (never negative, lower variance)."},
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO's clip range ε of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value estimates."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor γ."})
    lam: float = field(default=0.95, metadata={"help": "GAE's λ."})
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Under DeepSpeed ZeRO-3, gather the policy's weights on every process for sampling "
                  "(fast); false samples layer by layer (slow, for policies larger than one device)."},
    )

    # -- defaults that differ from TrainingArguments ----------------------------------------------------------------
    logging_steps: float = field(
        default=1, metadata={"help": "Log every this many updates (a number below 1: a share of all updates)."}
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Clip the gradient norm of each optimizer step to this (0: no clipping, as TRL's PPO)."},
    )
    # TRL turns this deprecated alias on by default; None lets `activation_checkpointing` (off unless set) decide.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )

    # -- the kit's run fields ---------------------------------------------------------------------------------------
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` (its files are replaced, nothing is deleted)."},
    )
    wandb_project: str = field(
        default="ppo-recipes", metadata={"help": "W&B project, used when `report_to` includes wandb."}
    )
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})
    save_strategy: str = field(
        default="steps",
        metadata={"help": "Write a resumable checkpoint every `save_steps` updates ('steps') or only on SIGTERM ('no')."},
    )
    save_steps: float = field(
        default=25, metadata={"help": "Updates between checkpoints (a number below 1: a share of all updates)."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (the newest); null keeps all."}
    )
    max_nonfinite_updates: int = field(
        default=3,
        metadata={"help": "Stop after this many updates in a row skipped for a non-finite reward, advantage, loss or "
                  "gradient."},
    )
    eval_every_updates: int = field(
        default=0,
        metadata={"help": "Evaluate the policy against its reference on the held-out prompts every this many updates "
                  "and after the last (0: never); logged as eval/<key>. See recipes.evaluation.HeldOutEvaluation."},
    )
    eval_reward_functions: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions the held-out evaluation reports beside the PPO reward's own sources "
                  "(e.g. [sentiment], the gold the proxy reward model was learnt from)."},
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()
        check_ranges(self, PPO_RANGES)


# Fields of TrainingArguments the engine reads; setting any other one is an error (`unread_fields`), since the
# kit's loop, not transformers' Trainer, runs the training.
READ_TRAINING_FIELDS = {
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "num_train_epochs", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim",
    "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16", "tf32",
    "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "logging_steps", "report_to", "run_name", "seed", "full_determinism", "use_cpu",
    "save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint", "disable_tqdm", "ddp_timeout",
    "log_level", "local_rank",
}  # fmt: skip

# Where the kit does what these fields do in transformers' Trainer, and what to use instead.
REPLACED_TRAINING_FIELDS = {
    "eval_strategy": "eval_every_updates",
    "eval_steps": "eval_every_updates",
    "max_steps": "total_episodes",
    "deepspeed": "an accelerate launch config (configs/accelerate/deepspeed_zero*.yaml)",
    "fsdp": "an accelerate launch config (configs/accelerate/fsdp.yaml)",
    "fsdp_config": "an accelerate launch config (configs/accelerate/fsdp.yaml)",
    "push_to_hub": "scripts/export.py --push_to_hub",
}


def unread_fields(config: TrainingArguments, read: set[str], replaced: dict[str, str]) -> list[str]:
    """One message per `TrainingArguments` field that `config` sets differently from its class's defaults and that
    the kit's training does not read (fields beyond TrainingArguments', the class's own, are all read)."""
    defaults = default_instance(type(config))  # normalised by __post_init__ exactly as `config` was
    messages = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in read or getattr(config, f.name) == getattr(defaults, f.name):
            continue
        instead = f": use {replaced[f.name]}" if f.name in replaced else ""
        messages.append(f"'{f.name}' is a transformers TrainingArguments field that the kit does not read{instead}")
    return messages


@functools.cache
def default_instance(config_class: type):
    """`config_class()`, made once: constructing a TrainingArguments sets up (and first resets) the process's
    accelerate state, which must not happen again once a run's accelerator exists."""
    return config_class()


def check_ranges(config, ranges: dict[str, tuple[float | None, float | None, str]]) -> None:
    """Raises a RecipeError naming the first field of `config` outside its range: {field: (low, high, what)},
    bounds inclusive, None unbounded, a None value accepted (the field is unset); NaN and infinity never are."""
    for name, (low, high, what) in ranges.items():
        value = getattr(config, name)
        if value is None or isinstance(value, bool):
            continue
        if (low is not None and value < low) or (high is not None and value > high) or not math.isfinite(value):
            raise RecipeError(f"{name}: {value} is out of range; it must be {what}")


# Ranges of the transformers `TrainingArguments` fields the kit's trainers read: PPO's engine, and TRL's trainers
# (reward model, SFT, DPO, RLOO, GRPO, RAFT), whose configs add their own (`recipes.methods`, `reward_models.config`).
TRAINING_RANGES = {
    "per_device_train_batch_size": (1, None, "at least 1"),
    "per_device_eval_batch_size": (1, None, "at least 1"),
    "gradient_accumulation_steps": (1, None, "at least 1"),
    "num_train_epochs": (1e-9, None, "above 0"),
    "learning_rate": (0, None, "at least 0"),
    "max_grad_norm": (0, None, "at least 0 (0: no clipping)"),
    "save_steps": (1e-9, None, "above 0"),
    "save_total_limit": (1, None, "at least 1, or null to keep every checkpoint"),
    "logging_steps": (1e-9, None, "above 0"),
    "warmup_steps": (0, None, "at least 0"),
    "weight_decay": (0, None, "at least 0"),
}

PPO_RANGES = {
    **TRAINING_RANGES,
    "num_train_epochs": (0, None, "at least 0 (total_episodes, when set, is the budget)"),
    "num_mini_batches": (1, None, "at least 1"),
    "num_ppo_epochs": (1, None, "at least 1"),
    "total_episodes": (1, None, "at least 1"),
    "local_rollout_forward_batch_size": (1, None, "at least 1"),
    "num_sample_generations": (0, None, "at least 0"),
    "response_length": (1, None, "at least 1 token"),
    "temperature": (1e-6, None, "above 0 (sampling divides the logits by it)"),
    "kl_coef": (0, None, "at least 0"),
    "cliprange": (1e-9, None, "above 0"),
    "cliprange_value": (1e-9, None, "above 0"),
    "vf_coef": (0, None, "at least 0"),
    "gamma": (0, 1, "between 0 and 1"),
    "lam": (0, 1, "between 0 and 1"),
    "max_nonfinite_updates": (1, None, "at least 1"),
    "eval_every_updates": (0, None, "at least 0 (0: never)"),
}


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of one PPO run, checked before anything is loaded or written."""

    micro_batch: int
    """per_device_train_batch_size: episodes per forward-backward on one process (at most a mini-batch)."""
    grad_accumulation: int
    processes: int
    num_mini_batches: int
    num_ppo_epochs: int
    total_episodes: int

    @property
    def local_episodes(self) -> int:
        """Episodes one process samples per update."""
        return self.micro_batch * self.grad_accumulation

    @property
    def episodes_per_update(self) -> int:
        return self.local_episodes * self.processes

    @property
    def local_mini_batch(self) -> int:
        """Episodes of one mini-batch (one optimizer step) on one process."""
        return self.local_episodes // self.num_mini_batches

    @property
    def micro_batches_per_step(self) -> int:
        """Forward-backward passes whose gradients one optimizer step averages, on each process."""
        return math.ceil(self.local_mini_batch / self.micro_batch)

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    @property
    def updates(self) -> int:
        return math.ceil(self.total_episodes / self.episodes_per_update)

    def describe(self) -> str:
        micro = self.micro_batches_per_step
        return (
            f"{self.micro_batch} per device × {self.grad_accumulation} accumulation × {self.processes} processes = "
            f"{self.episodes_per_update} episodes per update; {self.num_mini_batches} mini-batches of "
            f"{self.local_mini_batch * self.processes} episodes ({micro} micro-batch{'es' if micro > 1 else ''} of "
            f"{min(self.micro_batch, self.local_mini_batch)} per process); {self.num_ppo_epochs} PPO epochs → "
            f"{self.optimizer_steps_per_update} optimizer steps per update; {self.total_episodes} episodes → "
            f"{self.updates} updates"
        )


def plan_batches(config: PPOConfig, processes: int, train_prompts: int) -> BatchPlan:
    """The batch arithmetic of `config` on `processes` processes with `train_prompts` training prompts; a
    RecipeError naming the field when it does not add up."""
    total = config.total_episodes or int(config.num_train_epochs * train_prompts)
    plan = BatchPlan(
        micro_batch=config.per_device_train_batch_size,
        grad_accumulation=config.gradient_accumulation_steps,
        processes=processes,
        num_mini_batches=config.num_mini_batches,
        num_ppo_epochs=config.num_ppo_epochs,
        total_episodes=total,
    )
    if plan.local_episodes % plan.num_mini_batches:
        raise RecipeError(
            f"num_mini_batches={plan.num_mini_batches} must divide per_device_train_batch_size × "
            f"gradient_accumulation_steps = {plan.local_episodes}"
        )
    if config.whiten_rewards and plan.local_mini_batch < 8:
        raise RecipeError("whiten_rewards needs at least 8 episodes per mini-batch on each process")
    if total < 1:
        raise RecipeError("total_episodes (or num_train_epochs × prompts) must be at least 1")
    if train_prompts < plan.episodes_per_update:
        raise RecipeError(
            f"only {train_prompts} training prompts, fewer than the {plan.episodes_per_update} episodes of one "
            "update: add prompts or lower per_device_train_batch_size / gradient_accumulation_steps"
        )
    return plan
