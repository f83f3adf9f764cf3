"""Records what TRL 1.12's PPOTrainer does on small deterministic CPU cases: the reference side of the fidelity
check between TRL's PPO and the kit's engine (tests/test_fidelity.py reads the file; it does not need TRL 1.12).

    make trl112-reference
    # which runs, from the repository root, in the TRL 1.12 environment (`make trl112-env`):
    .venv-trl112/bin/python bench/trl112/record_reference.py [--output tests/data/trl112_reference.json]

Each case is one TRL run of 2 updates, fp32, on one CPU thread, with the kit's tiny random models
(`recipes.tiny_models`, seed 0; one case has SmolLM2-135M-Instruct as policy). For every update it records the queries and the sampled responses (so the other
side can replay them instead of sampling), the mini-batch permutations TRL drew, TRL's logged metrics and a
fingerprint of the weights after the update. It also measures what fp32 operation order alone changes, which is
what the comparison's tolerance must allow. It only wraps TRL's functions to watch them: TRL's code runs unchanged.
Running it twice writes the same file (about 5 minutes on 2 cores, most of it the SmolLM2 case).
"""

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # recipes.tiny_models and recipes.padding; the kit itself is not installed here

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise

import accelerate  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402
from trl.experimental.utils import first_true_indices  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from recipes.model_cache import MARKER_FILE, resolve_model_path  # noqa: E402
from recipes.padding import unused_special_token  # noqa: E402
from recipes.tiny_models import DEFAULT_TOKENIZER, build_tiny_models  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "trl112_reference.json"
PROMPTS_FILE = REPO_ROOT / "data" / "sentiment_prompts" / "train.jsonl"
NUM_PROMPTS = 32  # the first 32 lines: k3_whiten's 2 updates of 16 episodes use each prompt once
MODEL_SEED = 0
UPDATES = 2
ATTENTION = "sdpa"  # transformers' default; the twin run uses "eager" to measure what operation order changes
TWIN_ATTENTION = "eager"

# The PPO fields all cases share: 8 optimizer steps per update (2 PPO epochs × 2 mini-batches × 1 micro-batch),
# a learning rate large enough that update 2 starts from visibly different weights.
COMMON_CONFIG = dict(
    gradient_accumulation_steps=1,
    num_mini_batches=2,
    num_ppo_epochs=2,
    response_length=12,
    temperature=0.7,
    learning_rate=3e-4,
    kl_coef=0.05,
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
    local_rollout_forward_batch_size=8,
    seed=42,
    bf16=False,
    report_to="none",
    num_sample_generations=0,
    save_strategy="no",
)
K1 = dict(
    per_device_train_batch_size=8,  # 8 episodes per update × 2 updates = 16; mini-batches of 8 / 2 = 4
    total_episodes=16,
    kl_estimator="k1",
    whiten_rewards=False,
    missing_eos_penalty=1.0,
)


@dataclass(frozen=True)
class Case:
    about: str
    config: dict  # PPOConfig fields on top of COMMON_CONFIG
    policy: str = "tiny"  # "tiny": recipes.tiny_models' policy/; else a hub id, resolved to the offline copy


CASES = {
    "k1": Case("The tiny policy, k1 KL estimator, missing-EOS penalty.", K1),
    "k3_whiten": Case(
        "The tiny policy, k3 KL estimator, whitened rewards, no missing-EOS penalty.",
        # Whitening needs local_mini_batch_size = per_device (16) × GA (1) / num_mini_batches (2) = 8 ≥ 8;
        # 16 episodes per update × 2 updates = 32.
        dict(K1, per_device_train_batch_size=16, total_episodes=32, kl_estimator="k3", whiten_rewards=True,
             missing_eos_penalty=None),
    ),
    "k1_smollm2": Case(
        "k1's settings but SmolLM2-135M-Instruct as policy and reference (value and reward models stay tiny) and a "
        "learning rate of 3e-5 (3e-4 wrecks it within update 1: approxkl 21): a policy that samples real text, so "
        "the stop token truncates several responses at different lengths, which the tiny random policy "
        "(near-uniform over 49k tokens) cannot do. About 20 times the CPU time of k1.",
        dict(K1, learning_rate=3e-5),
        policy=DEFAULT_TOKENIZER,
    ),
}

# Recorded from TrainingArguments/PPOConfig after PPOTrainer resolved them (derived batch sizes included).
RECORDED_CONFIG_FIELDS = [
    *COMMON_CONFIG,
    *K1,
    "stop_token",
    "stop_token_id",
    "world_size",
    "local_batch_size",
    "micro_batch_size",
    "batch_size",
    "mini_batch_size",
    "local_mini_batch_size",
    "num_total_batches",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "activation_checkpointing",
    "fp16",
]
NOT_COMPARED_METRICS = {
    "eps": "episodes per second since training started (an int): it depends on wall-clock time, so the file keeps "
    "the key with the value null, which keeps the file identical from run to run; compare the key only",
}
TOLERANCE = {
    "rule": "|kit - trl| <= abs + rel * |trl|",
    "metrics": {"abs": 1e-4, "rel": 1e-4},
    "weights_after": {
        # The sum of millions of weights that Adam moves by about ±lr each cancels: it is the noisiest fingerprint.
        "sum": {"abs": 1e-2, "rel": 0.0},
        # The norm hardly moves (SmolLM2's by 4e-4 in 2 updates): only an absolute tolerance tells anything.
        "l2": {"abs": 1e-5, "rel": 0.0},
        "l2_from_initial": {"abs": 1e-5, "rel": 1e-5},
    },
    "exact": ["queries", "responses", "truncated_responses", "response_lengths", "permutations",
              "val/num_eos_tokens", "episode"],
    "not_compared": sorted(NOT_COMPARED_METRICS),
}
MARGIN = 5  # the operation-order spread must stay this many times inside the tolerance, or the recorder stops


def log(message: str) -> None:
    print(f"[trl112-reference] {message}", file=sys.stderr, flush=True)


def as_list(tensor: torch.Tensor) -> list:
    return tensor.detach().cpu().tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Models, tokenizer, prompts
# ----------------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: Path):
    """SmolLM2's tokenizer with the kit's pad rule: its own pad token is EOS (<|im_end|>), so the kit picks a spare
    special token instead. Left padding: TRL appends the responses to the padded queries."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.pad_token = unused_special_token(tokenizer)
    return tokenizer


def load_models(policy_path: Path, reward_path: Path, pad_token_id: int, attention: str) -> dict:
    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32, attn_implementation=attention)

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(
            reward_path, num_labels=1, dtype=torch.float32, attn_implementation=attention
        )

    policy = causal_lm()
    # As the kit does: generation fills the rows that stopped early with the pad token, not with the saved
    # generation config's pad (EOS for the tiny policy, which TRL would then count in val/num_eos_tokens).
    policy.generation_config.pad_token_id = pad_token_id
    return {"policy": policy, "ref": causal_lm(), "value": classifier(), "reward": classifier()}


def prompt_dataset(tokenizer) -> Dataset:
    """The first NUM_PROMPTS prompts as one user turn of the chat template, ready for the reply (the template writes
    its special tokens itself, so none are added again)."""
    lines = PROMPTS_FILE.read_text().splitlines()[:NUM_PROMPTS]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": json.loads(line)["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        for line in lines
    ]
    return Dataset.from_dict({"input_ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]})


class WeightFingerprints:
    """Per model (policy, value): the float64 sum and L2 norm of all its parameters, and the L2 distance from its
    weights before training, which measures the updates themselves (a tied embedding counts once, as
    `parameters()` yields it)."""

    def __init__(self, models: dict):
        self.models = models
        self.initial = {name: [p.detach().clone() for p in model.parameters()] for name, model in models.items()}

    def __call__(self) -> dict:
        return {name: self.fingerprint(model, self.initial[name]) for name, model in self.models.items()}

    @staticmethod
    @torch.no_grad()
    def fingerprint(model: torch.nn.Module, initial: list) -> dict:
        total, squares, moved, count = 0.0, 0.0, 0.0, 0
        for param, start in zip(model.parameters(), initial):
            weights = param.detach().double()
            total += weights.sum().item()
            squares += weights.square().sum().item()
            moved += (weights - start.double()).square().sum().item()
            count += weights.numel()
        return {"sum": total, "l2": squares**0.5, "l2_from_initial": moved**0.5, "num_parameters": count}


# ----------------------------------------------------------------------------------------------------------------------
# Watching TRL: wrappers around the functions its train loop looks up by name, restored afterwards
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def wrapped(owner, name: str, make_wrapper):
    original = getattr(owner, name)
    setattr(owner, name, make_wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


class RecordingPPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, keeping what its train loop passes to `self.log`: exactly the metrics dict of an update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged = []

    def log(self, logs, start_time=None):
        self.logged.append(dict(logs))  # a copy: transformers adds `epoch` to the dict
        super().log(logs, start_time)


class FingerprintCallback(TrainerCallback):
    """TRL calls on_step_end once per update, after the update's optimizer steps."""

    def __init__(self, fingerprints: WeightFingerprints):
        self.fingerprints, self.taken = fingerprints, []

    def on_step_end(self, args, state, control, **kwargs):
        self.taken.append(self.fingerprints())


class Recorder:
    """Collects what TRL's train loop computed in each update, through wrappers around its module-level functions."""

    def __init__(self, trainer: RecordingPPOTrainer):
        self.trainer = trainer
        self.rollouts = []  # one dict per update: queries, responses; for update 1 also the rollout tensors
        self.permutations = []  # every np.random.permutation TRL drew, in order

    @contextlib.contextmanager
    def watching(self):
        with (
            wrapped(trl_ppo, "batch_generation", self.wrap_generation),
            wrapped(trl_ppo, "get_reward", self.wrap_get_reward),
            wrapped(trl_ppo, "forward", self.wrap_forward),
            wrapped(np.random, "permutation", self.wrap_permutation),
        ):
            yield

    def wrap_generation(self, batch_generation):
        def generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
            query_responses, logitss = batch_generation(
                model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config
            )
            context_length = queries.shape[1]
            responses = query_responses[:, context_length:]
            rollout = {"queries": as_list(queries), "responses": as_list(responses)}
            if not self.rollouts:  # update 1: the rollout tensors and the noise floor
                rollout["logprobs"] = selective_log_softmax(logitss, responses)  # as TRL computes them next
                rollout["noise_floor"] = logprob_noise_floor(
                    model, query_responses, context_length, rollout["logprobs"], self.trainer
                )
            self.rollouts.append(rollout)
            return query_responses, logitss

        return generation

    def wrap_get_reward(self, get_reward):
        def reward(model, query_responses, pad_token_id, context_length):
            output = get_reward(model, query_responses, pad_token_id, context_length)
            if len(self.rollouts) == 1:
                rollout = self.rollouts[0]
                if model is self.trainer.reward_model:  # on the truncated responses, before any penalty
                    rollout.setdefault("scores", []).extend(as_list(output[1]))
                else:  # the value model, on the responses as sampled
                    values = output[0][:, context_length - 1 : -1].squeeze(-1)
                    rollout.setdefault("values", []).extend(as_list(values))
            return output

        return reward

    def wrap_forward(self, forward):
        def forward_and_record(model, query_responses, pad_token_id):
            output = forward(model, query_responses, pad_token_id)
            if len(self.rollouts) == 1 and model is self.trainer.ref_model:
                rollout = self.rollouts[0]
                context_length = len(rollout["queries"][0])
                logits = output.logits[:, context_length - 1 : -1] / (self.trainer.args.temperature + 1e-7)
                ref_logprobs = selective_log_softmax(logits, query_responses[:, context_length:])
                rollout.setdefault("ref_logprobs", []).extend(as_list(ref_logprobs))
            return output

        return forward_and_record

    def wrap_permutation(self, permutation):
        def permutation_and_record(x):
            drawn = permutation(x)
            self.permutations.append(drawn.tolist())
            return drawn

        return permutation_and_record


# ----------------------------------------------------------------------------------------------------------------------
# What fp32 operation order alone changes
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def logprob_noise_floor(policy, query_responses, context_length, generate_logprobs, trainer) -> dict:
    """TRL takes the rollout's log-probs from generate's scores (one token at a time, with a KV cache); an engine
    may recompute them with one forward over query and response: the same mathematics in another fp32 operation
    order. Measured on the policy that sampled them, over the response tokens that count (up to and including the
    stop token); also the same forward run one row at a time (batch composition)."""
    pad_token_id = trainer.processing_class.pad_token_id
    temperature = trainer.args.temperature + 1e-7

    def full_forward_logprobs(rows):
        logits = trl_ppo.forward(policy, rows, pad_token_id).logits[:, context_length - 1 : -1] / temperature
        return selective_log_softmax(logits, rows[:, context_length:])

    batched = full_forward_logprobs(query_responses)
    row_by_row = torch.cat([full_forward_logprobs(query_responses[i : i + 1]) for i in range(len(query_responses))])
    counted = ~response_padding_mask(query_responses[:, context_length:], trainer.stop_token_id, pad_token_id)
    return {
        "max_abs_logprob_generate_vs_full_forward": (generate_logprobs - batched).abs()[counted].max().item(),
        "max_abs_logprob_full_forward_batched_vs_row_by_row": (batched - row_by_row).abs()[counted].max().item(),
        "response_tokens_compared": int(counted.sum()),
    }


def response_padding_mask(responses: torch.Tensor, stop_token_id, pad_token_id) -> torch.Tensor:
    """TRL's padding_mask, [episodes, response_length]: True after the stop token (nothing when there is none)."""
    if stop_token_id is not None:
        responses = trl_ppo.truncate_response(stop_token_id, pad_token_id, responses)
    sequence_lengths = first_true_indices(responses == pad_token_id) - 1
    return torch.arange(responses.shape[1]).unsqueeze(0) > sequence_lengths.unsqueeze(1)


def operation_order_spread(reference: dict, twin: dict) -> dict:
    """The same case run again with eager attention instead of sdpa: the same mathematics, another fp32 operation
    order in every forward and backward. The largest difference per metric and weight fingerprint over the updates
    is what an exact reimplementation may still differ by (given the same responses)."""
    same_samples = [a["responses"] for a in reference["rollouts"]] == [b["responses"] for b in twin["rollouts"]]
    if not same_samples:
        return {"same_responses": False}
    metrics = {}
    for ours, theirs in zip(reference["metrics"], twin["metrics"]):
        for key, value in ours.items():
            if key not in NOT_COMPARED_METRICS:
                metrics[key] = max(metrics.get(key, 0.0), abs(value - theirs[key]))
    weights = {}
    for ours, theirs in zip(reference["weights_after"], twin["weights_after"]):
        for model in ours:
            for stat in ("sum", "l2", "l2_from_initial"):
                key = f"{model}/{stat}"
                weights[key] = max(weights.get(key, 0.0), abs(ours[model][stat] - theirs[model][stat]))
    return {"same_responses": True, "max_abs_metric_difference": metrics, "max_abs_weight_difference": weights}


# ----------------------------------------------------------------------------------------------------------------------
# One TRL run
# ----------------------------------------------------------------------------------------------------------------------


def run_trl(case: Case, stop_token_id, tiny_paths: dict, work_dir: Path, attention: str = ATTENTION) -> dict:
    """TRL 1.12's PPOTrainer on one case for its 2 updates; returns what it did."""
    transformers.set_seed(COMMON_CONFIG["seed"])  # PPOTrainer seeds torch itself, but not numpy's permutations
    tokenizer = load_tokenizer(tiny_paths["policy"])  # the same tokenizer as SmolLM2's, saved with the tiny models
    policy_path = tiny_paths["policy"] if case.policy == "tiny" else resolve_model_path(case.policy)
    models = load_models(policy_path, tiny_paths["reward"], tokenizer.pad_token_id, attention)
    dataset = prompt_dataset(tokenizer)
    args = PPOConfig(output_dir=str(work_dir / "trl"), stop_token_id=stop_token_id, **{**COMMON_CONFIG, **case.config})
    fingerprints = WeightFingerprints({"policy": models["policy"], "value": models["value"]})
    weights_before, after_updates = fingerprints(), FingerprintCallback(fingerprints)
    trainer = RecordingPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=models["policy"],
        ref_model=models["ref"],
        reward_model=models["reward"],
        value_model=models["value"],
        train_dataset=dataset,
        eval_dataset=dataset,  # unused (num_sample_generations 0), but TRL builds a loader for it
        callbacks=[after_updates],
    )
    recorder = Recorder(trainer)
    with recorder.watching():
        trainer.train()
    assert len(trainer.logged) == len(recorder.rollouts) == args.num_total_batches == UPDATES
    assert len(recorder.permutations) == UPDATES * args.num_ppo_epochs
    return {
        "tokenizer": tokenizer,
        "args": args,
        "trainer": trainer,
        "policy_activation_checkpointing": models["policy"].is_activation_checkpointing,
        "rollouts": recorder.rollouts,
        "permutations": recorder.permutations,
        "metrics": trainer.logged,
        "weights_before": weights_before,
        "weights_after": after_updates.taken,
    }


def choose_stop_token(case: Case, tiny_paths: dict, work_dir: Path) -> dict:
    """A probe run without a stop token gives the responses TRL samples in update 1, which the real run samples
    too (a row that stops is padded, the sampler still draws for every row); update 2 depends on what update 1
    learnt, so only update 1 counts. The stop token is the one in the most of them; among those, the one that cuts
    a response nearest its middle (counted tokens before it, padding after it), then the smallest id. The random
    tiny policy samples almost uniformly from 49k tokens, so there every token is in one response at most, and EOS
    (the natural stop) in none."""
    probe = run_trl(case, None, tiny_paths, work_dir)
    responses = probe["rollouts"][0]["responses"]
    rows_with, first_position = collections.Counter(), {}
    for response in responses:
        rows_with.update(set(response))
        for position, token in enumerate(response):
            first_position.setdefault(token, position)
    most = max(rows_with.values())
    middle = COMMON_CONFIG["response_length"] // 2
    candidates = [token for token, rows in rows_with.items() if rows == most]
    stop_token_id = min(candidates, key=lambda token: (abs(first_position[token] - middle), token))
    return {
        "id": stop_token_id,
        "token": probe["tokenizer"].convert_ids_to_tokens(stop_token_id),
        "probe_update_1_responses_containing_it": most,
        "probe_update_1_responses": len(responses),
        "probe_update_1_distinct_tokens": len(rows_with),
        "probe_update_1_responses_containing_eos": rows_with[probe["tokenizer"].eos_token_id],
    }


def record_case(name: str, case: Case, tiny_paths: dict, work_dir: Path) -> dict:
    log(f"{name}: probe run for the stop token")
    stop = choose_stop_token(case, tiny_paths, work_dir)
    log(f"{name}: stop_token_id {stop['id']} ({stop['token']!r}); reference run")
    run = run_trl(case, stop["id"], tiny_paths, work_dir)
    log(f"{name}: the same with {TWIN_ATTENTION} attention, for the operation-order spread")
    twin = run_trl(case, stop["id"], tiny_paths, work_dir, attention=TWIN_ATTENTION)
    args, tokenizer = run["args"], run["tokenizer"]
    updates = []
    for index, (rollout, metrics) in enumerate(zip(run["rollouts"], run["metrics"])):
        padding = response_padding_mask(torch.tensor(rollout["responses"]), stop["id"], tokenizer.pad_token_id)
        truncated = int(padding.any(dim=1).sum())
        epochs = args.num_ppo_epochs
        updates.append(
            {
                "update": index + 1,
                "queries": rollout["queries"],
                "responses": rollout["responses"],
                "truncated_responses": truncated,
                "response_lengths": as_list((~padding).sum(dim=1)),  # tokens that count, the stop token included
                "permutations": run["permutations"][index * epochs : (index + 1) * epochs],
                "metrics": {key: None if key in NOT_COMPARED_METRICS else value for key, value in metrics.items()},
                "weights_after": run["weights_after"][index],
            }
        )
        log(f"{name}: update {index + 1}: {truncated} of {len(padding)} responses truncated")
    first = run["rollouts"][0]
    return {
        "about": case.about,
        "policy": "recipes.tiny_models policy/" if case.policy == "tiny" else f"{case.policy} (offline copy)",
        "config": {field: getattr(args, field) for field in RECORDED_CONFIG_FIELDS},
        "policy_activation_checkpointing": run["policy_activation_checkpointing"],
        "optimizer": optimizer_record(run["trainer"]),
        "stop_token": stop,
        "weights_before": run["weights_before"],
        "updates": updates,
        "rollout_update_1": {
            "logprobs": as_list(first["logprobs"]),
            "ref_logprobs": first["ref_logprobs"],
            "values": first["values"],
            "scores": first["scores"],
        },
        "noise_floor_update_1": first["noise_floor"],
        "operation_order_spread": operation_order_spread(run, twin),
    }


def optimizer_record(trainer) -> dict:
    """What create_optimizer_and_scheduler built from the config's defaults (one optimizer for policy and value)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, if any
    defaults = {key: value for key, value in optimizer.defaults.items() if isinstance(value, (int, float, bool, tuple))}
    return {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "defaults": {key: list(value) if isinstance(value, tuple) else value for key, value in defaults.items()},
        "param_groups": [
            {"lr": group["initial_lr"], "weight_decay": group["weight_decay"], "num_tensors": len(group["params"])}
            for group in optimizer.param_groups
        ],
        "scheduler": type(trainer.lr_scheduler).__name__,
        "scheduler_steps": "once per update, after its optimizer steps (lr is the same for all 8 of them)",
    }


# ----------------------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------------------

DOCUMENTATION = {
    "about": "TRL 1.12 PPOTrainer, recorded by bench/trl112/record_reference.py (make trl112-reference; see "
    "bench/trl112/README.md); tests/test_fidelity.py compares the kit's engine with it.",
    "updates": "queries: the left-padded input_ids TRL fed the update; responses: as sampled, before truncation "
    "(a row that sampled the stop token is padded after it by generate); response_lengths: the tokens TRL counts, "
    "up to and including the first stop token; truncated_responses: the responses shorter than response_length "
    "(a stop token in the last position changes nothing); permutations: np.random.permutation(local_batch_size) of each PPO "
    "epoch, cut into mini-batches in order; metrics: the dict TRL passed to self.log; weights_after: per model "
    "(policy, value), the float64 sum and L2 norm of all parameters and their L2 distance from the weights before "
    "training, after the update's optimizer steps.",
    "rollout_update_1": "TRL's per-episode rollout tensors of update 1, before masking: logprobs from generate's "
    "scores, ref_logprobs from the reference model's forward, values from the value model on the responses as "
    "sampled ([episodes, response_length] each), scores from the reward model on the truncated responses before "
    "the missing-EOS penalty ([episodes]).",
    "stop_token": "the case's stop_token_id: the token in the most of update 1's responses in a probe run without "
    "one, nearest the middle of a response among those (choose_stop_token). The tiny random policy samples almost "
    "uniformly from 49k tokens and never EOS, so there it cuts one response; SmolLM2's text repeats words.",
    "noise_floor_update_1": "max |log-prob| difference on update 1's counted response tokens between generate's "
    "scores (TRL) and one full forward, and between a batched and a row-by-row full forward.",
    "operation_order_spread": "the largest difference of each metric and weight fingerprint between this run and "
    "the same run with eager attention (same responses): what fp32 operation order alone moves.",
}


def allowance(tolerance: dict, value: float) -> float:
    return tolerance["abs"] + tolerance["rel"] * abs(value)


def check_tolerance(cases: dict) -> None:
    """Stops if what operation order alone moved (operation_order_spread) is not well inside the tolerance: a
    tolerance an exact reimplementation could fail is no tolerance."""
    for name, case in cases.items():
        spread = case["operation_order_spread"]
        if not spread["same_responses"]:
            raise SystemExit(f"error: {name}: the eager-attention twin sampled other responses; no spread measured")
        for update in case["updates"]:
            for key, difference in spread["max_abs_metric_difference"].items():
                limit = allowance(TOLERANCE["metrics"], update["metrics"][key])
                if difference * MARGIN > limit:
                    raise SystemExit(f"error: {name}: {key} moved {difference:.3g} with operation order alone; "
                                     f"the tolerance allows {limit:.3g}: widen TOLERANCE['metrics']")
            for model, stats in update["weights_after"].items():
                for stat, tolerance in TOLERANCE["weights_after"].items():
                    difference = spread["max_abs_weight_difference"][f"{model}/{stat}"]
                    limit = allowance(tolerance, stats[stat])
                    if difference * MARGIN > limit:
                        raise SystemExit(f"error: {name}: {model} {stat} moved {difference:.3g} with operation "
                                         f"order alone; the tolerance allows {limit:.3g}: widen TOLERANCE")


def tolerance_why(cases: dict) -> str:
    floor = max(case["noise_floor_update_1"]["max_abs_logprob_generate_vs_full_forward"] for case in cases.values())
    spreads = [case["operation_order_spread"] for case in cases.values()]
    metric_spread = max(max(spread["max_abs_metric_difference"].values()) for spread in spreads)
    sum_spread = max(max(v for k, v in s["max_abs_weight_difference"].items() if k.endswith("/sum")) for s in spreads)
    return (
        f"On these cases the rollout log-probs TRL takes from generate's scores and those of one full forward differ "
        f"by up to {floor:.2g} nats (noise_floor_update_1), and TRL itself run with eager instead of sdpa attention "
        f"moves the metrics by up to {metric_spread:.2g} and the weights' sums by up to {sum_spread:.2g} "
        "(operation_order_spread): the same fp32 mathematics in another operation order. An engine that is right "
        "differs from TRL by about that much: its log-probs, ratios and KL come from another forward, and its "
        "reductions, whitening, GAE sums and (fused or not) Adam run in another order. The tolerance (abs + rel × "
        f"|TRL's value|; metrics 1e-4 + 1e-4) keeps the measured spread at least {MARGIN} times inside it (the "
        "recorder checks this) and stays below what the mistakes it is there to catch should move (estimated, not "
        "measured: a value or log-prob mask one token off moves a loss by about one token's share, 1e-3 here; k3 "
        "for k1 or a missed penalty, 1e-2 to 1). The absolute part matters: update 1's objective/kl and "
        "non_score_reward are pure noise (policy = reference), about 1e-7 (k3's rounds to 0). The clip fractions "
        "count tokens, so a ratio sitting on a clip boundary would move them by a whole token; none did here. Of "
        "the weight fingerprints, l2_from_initial is the one that measures the updates; the sum cancels and the "
        "norm hardly moves, hence their absolute tolerances. Token ids, permutations, episode and "
        "val/num_eos_tokens are exact."
    )


def record(output: Path) -> None:
    if not (Path(resolve_model_path(DEFAULT_TOKENIZER)) / MARKER_FILE).is_file():
        raise SystemExit(f"error: no offline copy of {DEFAULT_TOKENIZER}: run `make model` first")
    torch.set_num_threads(1)  # one operation order for the reference, whatever the machine's core count
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        tiny_paths = build_tiny_models(work_dir / "models", seed=MODEL_SEED)
        tokenizer = load_tokenizer(tiny_paths["policy"])
        cases = {name: record_case(name, case, tiny_paths, work_dir) for name, case in CASES.items()}
    check_tolerance(cases)
    reference = {
        **DOCUMENTATION,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "numpy": np.__version__,
        },
        "torch_num_threads": torch.get_num_threads(),
        "dtype": "float32",
        "attention": ATTENTION,
        "models": {
            "builder": "recipes.tiny_models.build_tiny_models",
            "seed": MODEL_SEED,
            "policy": "the case's policy (AutoModelForCausalLM), trained in full (no PEFT)",
            "ref_model": "the case's policy loaded again",
            "value_model": "tiny reward/ as AutoModelForSequenceClassification, num_labels=1",
            "reward_model": "tiny reward/ as AutoModelForSequenceClassification, num_labels=1",
            "policy_generation_config_pad_token_id": tokenizer.pad_token_id,
        },
        "tokenizer": {
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
            "pad_rule": "recipes.padding.unused_special_token (the saved pad token is EOS)",
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "padding_side": tokenizer.padding_side,
        },
        "prompts": {
            "file": str(PROMPTS_FILE.relative_to(REPO_ROOT)),
            "lines": f"the first {NUM_PROMPTS}",
            "rendering": "chat template, one user turn, add_generation_prompt=True, tokenized with "
            "add_special_tokens=False, as TRL's dataset column input_ids; TRL's dataloader shuffles them",
        },
        "seeding": "transformers.set_seed(seed) before building the trainer (for numpy's permutations; TRL seeds "
        "torch itself: manual_seed(seed) before accelerator.prepare, then manual_seed(seed + 100003 × process index))",
        "not_compared_metrics": NOT_COMPARED_METRICS,
        "tolerance": {**TOLERANCE, "why": tolerance_why(cases)},
        "cases": cases,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    record(parser.parse_args().output)


if __name__ == "__main__":
    main()
