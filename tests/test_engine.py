"""The PPO loop's own behaviour, in process on the tiny models: the forward of the trained module against plain
forwards of the same models, rollout log-probs equal to training's, the reference with the adapter disabled, the
batch arithmetic with gradient accumulation, sampling under activation checkpointing, and an update undone when a
loss turns non-finite part-way."""

import numpy as np
import pytest
import torch
from conftest import tiny_recipe_flags

from recipes import parse_recipe
from recipes.config import ModelArguments
from recipes.data import collate_prompts, load_prompts
from recipes.generation import forward_inputs
from recipes.models import load_policy, load_ppo_models, load_tokenizer
from recipes.ppo.config import plan_batches
from recipes.ppo.distributed import AdapterDisabled
from recipes.ppo.model import ValueHead
from recipes.ppo.trainer import PPOTrainer
from recipes.run import build_accelerator

RESPONSE = 8  # configs/tiny/ppo.yaml: response_length


def build_trainer(tiny_models, prompt_files, tmp_path, *flags, trainer_class=PPOTrainer) -> PPOTrainer:
    recipe = parse_recipe(tiny_recipe_flags(tiny_models, prompt_files["jsonl"], tmp_path / "run", *flags))
    tokenizer = load_tokenizer(recipe.model)
    prompts = load_prompts(recipe.data, tokenizer, seed=0)
    plan = plan_batches(recipe.training, 1, len(prompts.train))
    accelerator = build_accelerator(recipe.training, plan)
    torch.manual_seed(0)
    models = load_ppo_models(recipe.model, tokenizer)
    return trainer_class(recipe.training, plan, accelerator, tokenizer, models, prompts, models.reward)


def left_padded_batch(trainer) -> torch.Tensor:
    """Two prompts of different lengths, left-padded, each followed by RESPONSE arbitrary tokens."""
    prompts = trainer.tokenizer(["Write a short note", "Describe a rainy afternoon in the old harbour town"],
                                padding=True, padding_side="left", return_tensors="pt")["input_ids"]  # fmt: skip
    responses = torch.randint(100, 1000, (2, RESPONSE), generator=torch.Generator().manual_seed(1))
    return torch.cat([prompts, responses], 1)


def plain_forward(model, query_responses, pad_id, **kwargs):
    """A forward over every position (no logits_to_keep)."""
    inputs = forward_inputs(query_responses, pad_id, RESPONSE)
    inputs.pop("logits_to_keep")
    return model(**inputs, **kwargs)


def first_batch(trainer):
    return collate_prompts([trainer.train_prompts[i] for i in range(trainer.plan.local_episodes)], trainer.pad_token_id)


@pytest.mark.parametrize("value_init", ["policy_trunk", "reward_model"])
def test_forward_gives_response_position_logits_and_values(tiny_models, prompt_files, tmp_path, value_init):
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--value_model_init", value_init)
    module, pad_id = trainer.accelerator.unwrap_model(trainer.model), trainer.pad_token_id
    batch = left_padded_batch(trainer)
    # A trained-looking head: the zero-initialised one would make every value 0 and the check vacuous.
    torch.nn.init.normal_(module.critic.score.weight)
    with torch.no_grad():
        logits, values = trainer.model(batch, pad_id, RESPONSE)
        full = plain_forward(module.policy, batch, pad_id, output_hidden_states=True)
        width = batch.shape[1] - RESPONSE
        torch.testing.assert_close(logits, full.logits[:, width - 1 : -1])
        if value_init == "policy_trunk":
            assert isinstance(module.critic, ValueHead)
            hidden = full.hidden_states[-1]
        else:
            hidden = plain_forward(module.critic.model, batch, pad_id).last_hidden_state
        expected = module.critic.score(hidden).squeeze(-1)[:, width - 1 : -1]
    assert logits.shape == (2, RESPONSE, module.policy.config.vocab_size)
    assert values.shape == (2, RESPONSE)
    torch.testing.assert_close(values, expected.float())
    assert values.abs().sum() > 0


def test_rollout_starts_at_ratio_one_and_zero_kl(tiny_models, prompt_files, tmp_path):
    """Rollout log-probs come from the forward training repeats (bf16 weights here): before any step the ratio is 1
    to fp32 rounding; and with LoRA's B at zero the policy is its reference, so the KL is exactly 0."""
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--value_model_init", "policy_trunk",
                            "--dtype", "bfloat16")  # fmt: skip
    rollout = trainer.rollout(first_batch(trainer))
    with torch.no_grad():
        logits, _ = trainer.model(rollout.query_responses, trainer.pad_token_id, RESPONSE)
    logprobs = torch.log_softmax(logits.float() / (trainer.config.temperature + 1e-7), -1)
    logprobs = logprobs.gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    kept = ~rollout.padding
    torch.testing.assert_close(logprobs[kept], rollout.logprobs[kept], rtol=0, atol=1e-5)
    assert torch.equal(rollout.kl, torch.zeros_like(rollout.kl))


def test_adapter_disabled_reference_is_the_base_model(tiny_models, prompt_files, tmp_path):
    trainer = build_trainer(tiny_models, prompt_files, tmp_path)
    assert trainer.reference is None  # LoRA: the policy with its adapter disabled is the reference
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    for name, parameter in policy.named_parameters():  # move the adapter away from the identity
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    batch, pad_id = left_padded_batch(trainer), trainer.pad_token_id
    with torch.no_grad():
        with policy.disable_adapter():
            base = plain_forward(policy, batch, pad_id).logits
        adapted = plain_forward(policy, batch, pad_id).logits
        viewed = plain_forward(AdapterDisabled(policy), batch, pad_id).logits
        through_the_loop = trainer.reference_logits(batch, RESPONSE)
    torch.testing.assert_close(viewed, base)
    torch.testing.assert_close(through_the_loop, base[:, batch.shape[1] - RESPONSE - 1 : -1])
    assert not torch.allclose(viewed, adapted)


def test_gradient_accumulation_micro_batches_and_optimizer_steps(tiny_models, prompt_files, tmp_path):
    """2 per device × 4 accumulation = 8 episodes per update in 2 mini-batches of 4, each 2 micro-batches of 2:
    2 optimizer steps per epoch, every statistics slot filled (an empty slot would pull val/ratio towards 0)."""
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--per_device_train_batch_size", "2",
                            "--gradient_accumulation_steps", "4", "--num_mini_batches", "2", "--num_ppo_epochs", "3",
                            "--total_episodes", "8")  # fmt: skip
    plan = trainer.plan
    assert (plan.local_episodes, plan.local_mini_batch, plan.micro_batches_per_step) == (8, 4, 2)
    assert plan.optimizer_steps_per_update == 6
    rollout = trainer.rollout(first_batch(trainer))
    stats = trainer.optimise(rollout)
    assert stats["ratio"].shape == (3, 2, 2)
    assert torch.all(stats["ratio"] > 0.5) and torch.all(stats["entropy"] > 0)
    steps = {int(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {6}


def test_sampling_with_activation_checkpointing_is_sampling_without(tiny_models, prompt_files, tmp_path):
    """Checkpointing drops the KV cache of checkpointed layers in train mode; the sampler must turn it off, so that
    the same seed samples the same tokens, and turn it back on for the training forwards."""
    responses = {}
    for checkpointing in ("false", "true"):
        trainer = build_trainer(tiny_models, prompt_files, tmp_path / checkpointing,
                                "--activation_checkpointing", checkpointing)  # fmt: skip
        torch.manual_seed(0)
        responses[checkpointing] = trainer.rollout(first_batch(trainer)).responses
        module = trainer.accelerator.unwrap_model(trainer.model)
        assert module.is_gradient_checkpointing is (checkpointing == "true")
        assert module.critic.is_activation_checkpointing is (checkpointing == "true")
    assert torch.equal(responses["true"], responses["false"])


class LossTurnsNonFinite(PPOTrainer):
    """The third micro-batch's loss is NaN, after two optimizer steps of the update."""

    calls = 0

    def micro_batch_losses(self, rollout, index, response_width):
        losses = super().micro_batch_losses(rollout, index, response_width)
        LossTurnsNonFinite.calls += 1
        if LossTurnsNonFinite.calls == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_update_with_a_non_finite_loss_part_way_is_undone(tiny_models, prompt_files, tmp_path):
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--num_ppo_epochs", "2",
                            trainer_class=LossTurnsNonFinite)  # fmt: skip
    rollout = trainer.rollout(first_batch(trainer))
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    np.random.seed(0)
    assert trainer.optimise(rollout) is None
    assert LossTurnsNonFinite.calls == 3  # it stopped at the bad micro-batch
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, trained[name], rtol=0, atol=0, msg=name)
    assert trainer.optimizer.state_dict()["state"] == {}  # the two steps' Adam moments are gone too


def test_the_lm_head_reads_a_contiguous_input(tiny_models):
    """transformers hands the LM head the hidden states sliced for `logits_to_keep`; the kit's models give it a
    contiguous copy (on a strided slice torch's CPU 16-bit matmul copies the head's weight once per sequence)."""
    from transformers import AutoModelForCausalLM

    def seen_by_the_head(model) -> list[bool]:
        seen = []
        model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        logits = model(torch.ones(2, 6, dtype=torch.long), logits_to_keep=3).logits
        assert logits.shape[1] == 3
        return seen

    assert seen_by_the_head(AutoModelForCausalLM.from_pretrained(tiny_models["policy"])) == [False]
    assert seen_by_the_head(load_policy(ModelArguments(model_name_or_path=str(tiny_models["policy"])))) == [True]
