"""Benchmark baseline (not a test): TRL 1.12's own PPOTrainer on the bench's standard workload, configured as TRL's
example script `examples/scripts/ppo/ppo.py` configures it when run with `--use_peft`.

    .venv-trl112/bin/python bench/trl112/ppo_baseline.py --updates 12 \
        --reward_model_path outputs/smollm2-135m/reward_model \
        --output outputs/bench/trl112/ppo_baseline.json --output_dir outputs/bench/trl112/ppo --overwrite_output_dir

Runs in TRL 1.12's environment (`make trl112-env`; TRL 1.13 removed the trainer), never in the kit's: it imports
only `recipes.model_cache` from the kit. The arguments are parsed as the example parses them (PPOConfig, ModelConfig
and their flags), after the flags below: `EXAMPLE_FLAGS` (what `--use_peft` turns on), `WORKLOAD_FLAGS` (the
workload of bench/ppo_bench.py) and `CPU_FLAGS`; any PPOConfig or ModelConfig flag on the command line overrides
them. Everything else is TRL's default, and the JSON records every value used.

Per update it measures: wall seconds, split by timing the module-level functions `PPOTrainer.train()` calls (its
file unchanged) into generation (inside `batch_generation`), scoring (the rollout's `forward` and `get_reward`
calls: reference, value and reward model), sample generations (TRL's `generate_completions` debug table, which the
example's defaults run every `max(1, updates // 10)` updates) and optimisation (the rest: the PPO epochs, and the
rollout's log-softmax, GAE and bookkeeping); the process's peak RSS; episodes/s; and the metrics TRL logs.

Two choices differ from a verbatim run of the example, both outside the algorithm: the runner seeds every random
generator at the start (the example never does: PPOTrainer skips `Trainer.__init__`, where the seed is set, so its
LoRA initialisation and its numpy mini-batch order change from run to run), and the policy folder it writes holds
the base tokenizer rather than the one with the example's `[PAD]` token (see `save_policy`).
"""

import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model comes from a local folder
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise

import accelerate
import peft
import torch
import transformers
import trl
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
)
from trl import ModelConfig, get_peft_config, get_quantization_config
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo

KIT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(KIT_ROOT))

from recipes.model_cache import resolve_model_path

POLICY = "HuggingFaceTB/SmolLM2-135M-Instruct"

# `--use_peft` → get_peft_config(ModelConfig): LoRA with ModelConfig's defaults (r 16, alpha 32, dropout 0.05,
# peft's default target modules for the architecture); the reference is then the policy with its adapter disabled
# (the example passes ref_policy=None).
EXAMPLE_FLAGS = ["--use_peft"]

# bench/ppo_bench.py's workload. The example names the policy twice (tokenizer from `--model_name_or_path`, weights
# from `--sft_model_path`) and loads both value and reward model from `--reward_model_path`.
WORKLOAD_FLAGS = [
    "--model_name_or_path", POLICY, "--sft_model_path", POLICY,
    "--reward_model_path", str(KIT_ROOT / "outputs/smollm2-135m/reward_model"),
    "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",  # 16 episodes per update
    "--local_rollout_forward_batch_size", "16",  # one generate call and one scoring chunk per update
    "--num_mini_batches", "2", "--response_length", "48", "--num_ppo_epochs", "4",
    "--temperature", "0.7", "--seed", "42", "--dtype", "float32",
    "--save_strategy", "no", "--report_to", "none",
    "--output_dir", str(KIT_ROOT / "outputs/bench/trl112/ppo"),
]  # fmt: skip

# PPOConfig's default bf16=True is refused by TrainingArguments on a machine with neither a bf16 GPU nor `use_cpu`
# (and PPOTrainer builds its own Accelerator, which never reads it); the workload is fp32.
CPU_FLAGS = ["--bf16", "false"]


@dataclass
class BaselineArguments:
    """What the example takes from its dataset arguments, and what the measurement needs."""

    updates: int = field(default=12, metadata={"help": "PPO updates; total_episodes = updates × episodes per update."})
    output: str = field(
        default=str(KIT_ROOT / "outputs/bench/trl112/ppo_baseline.json"),
        metadata={"help": "Where to write the per-update figures and the configuration (JSON)."},
    )
    train_prompts: str = field(
        default=str(KIT_ROOT / "data/sentiment_prompts/train.jsonl"),
        metadata={"help": "Training prompts (JSON lines with a `prompt` column), each rendered as one user turn."},
    )
    eval_prompts: str = field(
        default=str(KIT_ROOT / "data/sentiment_prompts/test.jsonl"),
        metadata={"help": "Held-out prompts: the example's eval_dataset, read only by TRL's sample table."},
    )
    max_prompt_length: int = field(default=64, metadata={"help": "Prompts longer than this many tokens are dropped."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write over a non-empty output_dir (the example deletes it; this refuses)."}
    )


# -- measurement -------------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class UpdateClock:
    """Each update's wall time and its phases, from wrappers around the functions `PPOTrainer.train()` calls. The
    outermost timed call owns its time, so the generation and reward calls inside TRL's sample table count as
    sample generations. An update runs from one rollout's `batch_generation` to the next (the first from the start
    of training, the last to its end), so the sample table and the bookkeeping after `log` fall in their update."""

    def __init__(self, total: int, episodes: int):
        self.total, self.episodes = total, episodes
        self.active: str | None = None
        self.opened: float | None = None
        self.cpu_at_open = 0.0
        self.generated = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.logs: list[dict] = []
        self.updates: list[dict] = []

    def timed(self, function, phase_of):
        """`function` with its time added to the phase `phase_of(*args)` returns (None: not timed)."""

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            phase = phase_of(*args) if self.active is None else None
            if phase is None:
                return function(*args, **kwargs)
            if phase == "generation":
                if self.generated:
                    self.close()
                    self.open()
                self.generated = True
            self.active, started = phase, time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self.active = None

        return wrapper

    def open(self) -> None:
        self.opened, self.generated, self.seconds = time.perf_counter(), False, defaultdict(float)
        self.cpu_at_open = time.process_time()

    def close(self) -> None:
        if self.opened is None:
            return
        wall = time.perf_counter() - self.opened
        phases = {p: self.seconds[p] for p in ("generation", "scoring", "sample_generations")}
        phases["optimisation"] = wall - sum(phases.values())
        number = len(self.updates) + 1
        record = {
            "update": number,
            "wall_s": wall,
            **{f"{phase}_s": seconds for phase, seconds in phases.items()},
            "episodes_per_second": self.episodes / wall,
            "peak_rss_gib": peak_rss_gib(),
            # CPU seconds of this process (all threads) and the machine's load: other work on the machine shows as
            # a load above the thread count and CPU seconds well below threads × wall.
            "process_cpu_s": time.process_time() - self.cpu_at_open,
            "load_average_1min": os.getloadavg()[0],
            "trl_metrics": self.logs[number - 1] if len(self.logs) >= number else {},
        }
        self.updates.append(record)
        self.opened = None
        m = record["trl_metrics"]
        print(
            f"update {number}/{self.total}: {wall:.1f} s = generation {phases['generation']:.1f} + scoring "
            f"{phases['scoring']:.1f} + optimisation {phases['optimisation']:.1f} + sample table "
            f"{phases['sample_generations']:.1f}; peak RSS {record['peak_rss_gib']:.2f} GiB; load "
            f"{record['load_average_1min']:.1f}; "
            f"score {m.get('objective/scores', float('nan')):.3f}, kl {m.get('objective/kl', float('nan')):.3f}",
            flush=True,
        )


class ClockCallback(TrainerCallback):
    """Opens the first update, keeps what TRL logs (once per update), and closes the last update."""

    def __init__(self, clock: UpdateClock):
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.open()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.clock.logs.append(dict(logs or {}))

    def on_train_end(self, args, state, control, **kwargs):
        self.clock.close()


def instrument(trainer: PPOTrainer, clock: UpdateClock) -> None:
    """Routes TRL's module-level functions (looked up by `train()` at each call) and the trainer's sample table
    through the clock. `forward` serves both the rollout (no gradients: scoring) and the PPO epochs (optimisation,
    the untimed rest)."""
    trl_ppo.batch_generation = clock.timed(trl_ppo.batch_generation, lambda *a: "generation")
    trl_ppo.get_reward = clock.timed(trl_ppo.get_reward, lambda *a: "scoring")
    trl_ppo.forward = clock.timed(trl_ppo.forward, lambda *a: None if torch.is_grad_enabled() else "scoring")
    trainer.generate_completions = clock.timed(trainer.generate_completions, lambda *a: "sample_generations")


# -- the example's setup -----------------------------------------------------------------------------------------


def prompt_dataset(path: str, tokenizer, max_length: int) -> tuple[Dataset, int]:
    """The workload's prompts: each row's `prompt` rendered as one user turn with the chat template and its
    generation prompt (the example tokenizes its dataset's ready-made text column instead), tokenised without added
    special tokens (the rendered text holds them), unpadded, as the example's `prepare_dataset` leaves them."""
    rows = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]
    chats = [[{"role": "user", "content": row}] for row in rows]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    ids = tokenizer(texts, padding=False, add_special_tokens=False)["input_ids"]
    kept = [row for row in ids if len(row) <= max_length]
    return Dataset.from_dict({"input_ids": kept}), len(ids) - len(kept)


def save_policy(trainer: PPOTrainer, output_dir: str, model_args: ModelConfig, tokenizer_path: str) -> None:
    """The example's `trainer.save_model(output_dir)` (the LoRA adapter and the tokenizer), made loadable by the
    kit's evaluation: the adapter names its base by the hub id (the weights came from the offline copy's folder),
    and the tokenizer is the base one. The example's `[PAD]` token has id 49152, one past SmolLM2's 49152
    embeddings (the example never resizes them); TRL masks it to 0 before every forward, but anything else that
    pads with it indexes past the embedding table."""
    trainer.save_model(output_dir)
    adapter_config = Path(output_dir) / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = model_args.model_name_or_path
    adapter_config.write_text(json.dumps(config, indent=2) + "\n")
    AutoTokenizer.from_pretrained(tokenizer_path, padding_side="left").save_pretrained(output_dir)


def observed(trainer: PPOTrainer, tokenizer) -> dict:
    """What TRL 1.12 actually set up, read from the trainer after `__init__`."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    policy, value = unwrapped.policy, unwrapped.value_model
    dropouts = [m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    lora = policy.peft_config["default"]
    args = trainer.args
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    return {
        "gradient_checkpointing_applied": {
            "policy": policy.get_base_model().is_gradient_checkpointing,
            "value_model": value.is_gradient_checkpointing,
        },
        "lora_target_modules": sorted(lora.target_modules),
        "lora_dropout_in_effect": max(dropouts, default=0.0),
        "trainable_parameters": {
            "policy_lora": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "value_model": sum(p.numel() for p in value.parameters() if p.requires_grad),
        },
        "optimizer": type(optimizer).__name__,
        "reference": "policy, adapter disabled" if trainer.ref_model is None else type(trainer.ref_model).__name__,
        "tokens": {
            "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "embedding_rows": policy.get_input_embeddings().num_embeddings, "tokenizer_length": len(tokenizer),
        },
        "stop_token_id": trainer.stop_token_id,
        "generation_stops_at": policy.generation_config.eos_token_id,
        "batches": {
            "episodes_per_update": args.batch_size,
            "mini_batch_size": args.local_mini_batch_size,
            # train() slices each mini-batch into per_device_train_batch_size rows: at most the mini-batch
            "micro_batch_size": min(args.per_device_train_batch_size, args.local_mini_batch_size),
            "updates": args.num_total_batches,
            "sample_table_every_updates": getattr(trainer, "sample_generations_freq", None),
        },
    }  # fmt: skip


def json_default(value):
    """Sets (peft's target modules) as sorted lists; anything else JSON lacks (enums, dtypes) as its text."""
    return sorted(value) if isinstance(value, set) else str(value)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summary(updates: list[dict], episodes: int) -> dict:
    """Min, median and max over the updates. Seconds are also given without TRL's sample table, which the kit's
    recipes turn off (num_sample_generations 0): that is the like-for-like figure."""
    walls = [u["wall_s"] for u in updates]
    without_samples = [u["wall_s"] - u["sample_generations_s"] for u in updates]
    phases = ("generation", "scoring", "optimisation", "sample_generations")
    return {
        "updates": len(updates),
        "seconds_per_update": spread(walls),
        "seconds_per_update_without_sample_table": spread(without_samples),
        "phases_s": {phase: spread([u[f"{phase}_s"] for u in updates]) for phase in phases},
        "episodes_per_second": episodes / statistics.median(walls),
        "episodes_per_second_without_sample_table": episodes / statistics.median(without_samples),
        "peak_rss_gib": max(u["peak_rss_gib"] for u in updates),
        "load_average_1min": spread([u["load_average_1min"] for u in updates]),
        "process_cpu_per_wall": spread([u["process_cpu_s"] / u["wall_s"] for u in updates]),
        "training_wall_s": sum(walls),
    }


def main() -> None:
    command_line = sys.argv[1:]
    if "--total_episodes" in command_line:
        sys.exit("--total_episodes is set from --updates (updates × per_device_train_batch_size × accumulation)")
    parser = HfArgumentParser((BaselineArguments, PPOConfig, ModelConfig))
    flags = [*EXAMPLE_FLAGS, *WORKLOAD_FLAGS, *CPU_FLAGS, *command_line]
    baseline, training_args, model_args = parser.parse_args_into_dataclasses(args=flags)
    training_args.total_episodes = (
        baseline.updates * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    )
    output_dir = Path(training_args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not baseline.overwrite_output_dir:
        sys.exit(f"output_dir {output_dir} is not empty: pass --overwrite_output_dir to write over it")
    if not (Path(training_args.reward_model_path) / "config.json").is_file():
        sys.exit(f"--reward_model_path {training_args.reward_model_path} has no config.json: run `make reward-model`")
    transformers.set_seed(training_args.seed)

    # Model & Tokenizer, as the example loads them
    tokenizer_path = resolve_model_path(model_args.model_name_or_path)
    policy_path = resolve_model_path(training_args.sft_model_path)
    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    model_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation}
    model_kwargs["dtype"] = dtype
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="left")
    # As the example, unconditionally: SmolLM2 pads with EOS, which TRL's masks would drop from every response.
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    reward_path = training_args.reward_model_path
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, **model_kwargs)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, **model_kwargs)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, **model_kwargs)
    peft_config = get_peft_config(model_args)
    ref_policy = AutoModelForCausalLM.from_pretrained(policy_path, **model_kwargs) if peft_config is None else None

    # Dataset
    train_dataset, dropped_train = prompt_dataset(baseline.train_prompts, tokenizer, baseline.max_prompt_length)
    eval_dataset, dropped_eval = prompt_dataset(baseline.eval_prompts, tokenizer, baseline.max_prompt_length)
    print(
        f"prompts: {len(train_dataset)} train, {len(eval_dataset)} held out; dropped as longer than "
        f"{baseline.max_prompt_length} tokens: {dropped_train} train, {dropped_eval} held out",
        flush=True,
    )

    # Training
    episodes = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    clock = UpdateClock(baseline.updates, episodes)
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=[ClockCallback(clock)],
    )
    instrument(trainer, clock)
    setup = observed(trainer, tokenizer)
    print("TRL 1.12 set up: " + json.dumps(setup), flush=True)
    trainer.train()
    save_policy(trainer, training_args.output_dir, model_args, tokenizer_path)

    result = {
        "runner": "bench/trl112/ppo_baseline.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "versions": {module.__name__: module.__version__ for module in (trl, transformers, torch, peft, accelerate)},
        "summary": summary(clock.updates, episodes),
        "updates": clock.updates,
        "configuration": {
            "flags": flags,
            "baseline": asdict(baseline),
            "model_config": asdict(model_args),
            "lora": peft_config.to_dict() if peft_config else None,  # sets are written as lists (json_default)
            "ppo_config": training_args.to_dict(),
            "folders_loaded": {"policy": policy_path, "tokenizer": tokenizer_path, "value_and_reward": reward_path},
            "data": {"train_prompts": len(train_dataset), "eval_prompts": len(eval_dataset)},
            "observed": setup,
        },
        "policy_saved_to": str(output_dir.resolve()),
    }
    Path(baseline.output).parent.mkdir(parents=True, exist_ok=True)
    Path(baseline.output).write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    s, median = result["summary"], {p: v["median"] for p, v in result["summary"]["phases_s"].items()}
    print(
        f"{s['updates']} updates, median seconds per update {s['seconds_per_update']['median']:.1f} = generation "
        f"{median['generation']:.1f} + scoring {median['scoring']:.1f} + optimisation {median['optimisation']:.1f} "
        f"+ sample table {median['sample_generations']:.1f}; {s['episodes_per_second']:.3f} episodes/s "
        f"({s['episodes_per_second_without_sample_table']:.3f} without the sample table); peak RSS "
        f"{s['peak_rss_gib']:.2f} GiB. Figures: {baseline.output}; policy: {output_dir}",
        flush=True,
    )


if __name__ == "__main__":
    main()
