"""Fidelity to TRL 1.12's PPOTrainer: the kit's engine, given what TRL sampled, computes the same metrics and ends
with the same weights, update after update.

tests/data/trl112_reference.json was recorded by bench/trl112/record_reference.py (`make trl112-reference`), which
runs TRL 1.12's own PPOTrainer (removed in trl 1.13) in an environment of its own (bench/trl112/README.md). For each
case it holds the prompts TRL drew, the responses it sampled, the order of each PPO epoch's episodes, every metric
TRL logged and fingerprints of the weights after each update. Here the kit's engine starts from the same models,
scores those responses, optimises in that order and must land within the file's tolerance: |kit − TRL| ≤ abs + rel ×
|TRL| (1e-4 + 1e-4 for metrics), justified there by TRL's own spread under another attention kernel (≤ 1.5e-5) and
by the difference between log-probs from `generate`'s scores and from one forward (≤ 2.3e-5 nats).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from recipes.config import ModelArguments
from recipes.data import PromptBatch
from recipes.models import PPOModels, load_tokenizer
from recipes.model_cache import resolve_model_path
from recipes.ppo.config import PPOConfig, plan_batches
from recipes.ppo.trainer import PPOTrainer, RunProgress
from recipes.rewards.sources import ModelSource

REFERENCE = json.loads((Path(__file__).parent / "data" / "trl112_reference.json").read_text())
TOLERANCE = REFERENCE["tolerance"]
FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
          "response_length", "temperature", "learning_rate", "kl_coef", "kl_estimator", "whiten_rewards",
          "missing_eos_penalty", "stop_token_id", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
          "local_rollout_forward_batch_size", "total_episodes", "seed", "lr_scheduler_type", "warmup_steps", "optim",
          "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")  # fmt: skip


class ReplayedOrder(PPOTrainer):
    """The engine, shuffling each epoch's episodes as TRL did (its numpy draws, recorded)."""

    recorded: list[list[int]] = []

    def episode_order(self, episodes: int) -> np.ndarray:
        order = self.recorded.pop(0)
        assert len(order) == episodes
        return np.array(order)


def within(kit: float, trl: float, tolerance: dict) -> bool:
    return math.fabs(kit - trl) <= tolerance["abs"] + tolerance["rel"] * math.fabs(trl)


def fingerprint(module: torch.nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """The recorder's fingerprints: float64 sum and L2 norm of all parameters, and L2 distance from the start."""
    params = dict(module.named_parameters())
    flat = torch.cat([p.detach().double().flatten() for p in params.values()])
    moved = torch.cat([(params[n].detach().double() - initial[n].double()).flatten() for n in params])
    return {"sum": flat.sum().item(), "l2": flat.norm().item(), "l2_from_initial": moved.norm().item()}


def policy_path(case: dict, tiny_models) -> str:
    if case["policy"].startswith("recipes.tiny_models"):
        return str(tiny_models["policy"])
    return resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if "smollm2" in name else []) for name in REFERENCE["cases"]]
)
def test_engine_reproduces_trl_ppo_trainer(name, tiny_models, tmp_path):
    case = REFERENCE["cases"][name]
    torch.set_num_threads(REFERENCE["torch_num_threads"])
    policy_dir = policy_path(case, tiny_models)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"])))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (
        REFERENCE["tokenizer"]["pad_token_id"], REFERENCE["tokenizer"]["eos_token_id"]
    )  # fmt: skip

    config = PPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", num_sample_generations=0,
                       **{field: case["config"][field] for field in FIELDS})  # fmt: skip
    plan = plan_batches(config, processes=1, train_prompts=64)
    load = dict(dtype=torch.float32, attn_implementation=REFERENCE["attention"])
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"], num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"], num_labels=1, **load)
    models = PPOModels(
        policy=policy,
        reference=AutoModelForCausalLM.from_pretrained(policy_dir, **load),
        value=value,
        reward=ModelSource(reward.eval().requires_grad_(False)),
    )
    initial = {"policy": {n: p.detach().clone() for n, p in policy.named_parameters()},
               "value": {n: p.detach().clone() for n, p in value.named_parameters()}}  # fmt: skip
    # The models are the recorder's (same builder, seed and torch): checked before anything else.
    for part, module in (("policy", policy), ("value", value)):
        for key in ("sum", "l2"):
            assert fingerprint(module, initial[part])[key] == pytest.approx(case["weights_before"][part][key], rel=1e-9)

    prompts = type("Prompts", (), {"train": [], "eval": []})()
    trainer = ReplayedOrder(config, plan, Accelerator(), tokenizer, models, prompts, models.reward)
    module = trainer.accelerator.unwrap_model(trainer.model)
    progress = RunProgress()
    for recorded in case["updates"]:
        ReplayedOrder.recorded = [list(order) for order in recorded["permutations"]]
        queries, responses = torch.tensor(recorded["queries"]), torch.tensor(recorded["responses"])
        batch = PromptBatch(queries, [""] * len(queries), None)
        rollout = trainer.score(batch, queries, responses)
        if recorded["update"] == 1:
            # TRL's own rollout tensors (before masking, scores before the missing-EOS penalty), where they count.
            theirs = {key: torch.tensor(value) for key, value in case["rollout_update_1"].items()}
            close = dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(rollout.logprobs[~rollout.padding], theirs["logprobs"][~rollout.padding], **close)
            keep = ~rollout.padding_after_next
            torch.testing.assert_close(rollout.values[keep], theirs["values"][keep], **close)
            torch.testing.assert_close(rollout.scores_by_source["reward_model"], theirs["scores"], **close)
        stats = trainer.optimise(rollout)
        progress.update, progress.episode = recorded["update"], recorded["update"] * plan.episodes_per_update
        metrics = trainer.update_metrics(rollout, stats, progress)
        trainer.scheduler.step()

        expected = recorded["metrics"]
        mismatches = {
            key: (metrics[key], value)
            for key, value in expected.items()
            if key not in TOLERANCE["not_compared"]
            and (metrics[key] != value if key in TOLERANCE["exact"] else not within(metrics[key], value, TOLERANCE["metrics"]))
        }
        assert not mismatches, f"{name}, update {recorded['update']}: kit vs TRL {mismatches}"
        for part, weights in (("policy", module.policy), ("value", module.critic)):
            ours = fingerprint(weights, initial[part])
            for key, tolerance in TOLERANCE["weights_after"].items():
                assert within(ours[key], recorded["weights_after"][part][key], tolerance), (
                    f"{name}, update {recorded['update']}: {part} {key} {ours[key]} vs {recorded['weights_after'][part][key]}"
                )
