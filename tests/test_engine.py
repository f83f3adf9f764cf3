"""The kit's forward through TRL's policy-and-critic wrapper, checked against plain forwards of the same models: logits
at the response positions only, values from a head on the policy's trunk or from a separate critic, rollout
log-probs equal to training's, and settings TRL leaves unapplied (activation checkpointing)."""

import pytest
import torch
from conftest import tiny_recipe_flags

from recipes import parse_recipe
from recipes.data import load_prompts
from recipes.engine import AdapterDisabled, model_inputs
from recipes.models import ValueHead, load_ppo_models, load_tokenizer
from recipes.run import make_trainer

RESPONSE = 8  # configs/tiny/ppo.yaml: response_length


def build_trainer(tiny_models, prompt_files, tmp_path, *flags):
    recipe = parse_recipe(tiny_recipe_flags(tiny_models, prompt_files["jsonl"], tmp_path / "run", *flags))
    tokenizer = load_tokenizer(recipe.model)
    torch.manual_seed(0)
    models = load_ppo_models(recipe.model, tokenizer)
    return make_trainer(recipe, tokenizer, load_prompts(recipe.data, tokenizer, seed=0), models)


def left_padded_batch(trainer) -> torch.Tensor:
    """Two prompts of different lengths, left-padded, each followed by RESPONSE arbitrary tokens."""
    tokenizer = trainer.processing_class
    prompts = tokenizer(["Write a short note", "Describe a rainy afternoon in the old harbour town"], padding=True,
                        padding_side="left", return_tensors="pt")["input_ids"]  # fmt: skip
    responses = torch.randint(100, 1000, (2, RESPONSE), generator=torch.Generator().manual_seed(1))
    return torch.cat([prompts, responses], 1)


def plain_forward(model, query_responses, pad_id, **kwargs):
    """A forward over every position, without the kit's logits_to_keep."""
    inputs = model_inputs(query_responses, pad_id, RESPONSE)
    inputs.pop("logits_to_keep")
    return model(**inputs, **kwargs)


@pytest.mark.parametrize("value_init", ["policy_trunk", "reward_model"])
def test_forward_gives_response_position_logits_and_values(tiny_models, prompt_files, tmp_path, value_init):
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--value_model_init", value_init)
    wrapper, pad_id = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class.pad_token_id
    batch = left_padded_batch(trainer)
    # A trained-looking head: the zero-initialised one would make every value 0 and the check vacuous.
    torch.nn.init.normal_(wrapper.value_model.score.weight)
    with torch.no_grad():
        logits, values = trainer.model(batch, pad_id, RESPONSE)
        full = plain_forward(wrapper.policy, batch, pad_id, output_hidden_states=True)
        width = batch.shape[1] - RESPONSE
        torch.testing.assert_close(logits, full.logits[:, width - 1 : -1])
        if value_init == "policy_trunk":
            assert isinstance(wrapper.value_model, ValueHead)
            hidden = full.hidden_states[-1]
        else:
            hidden = plain_forward(wrapper.critic_backbone, batch, pad_id, output_hidden_states=True).hidden_states[-1]
        expected = wrapper.value_model.score(hidden).squeeze(-1)[:, width - 1 : -1]
    assert logits.shape == (2, RESPONSE, wrapper.policy.config.vocab_size)
    assert values.shape == (2, RESPONSE)
    torch.testing.assert_close(values, expected)
    assert values.abs().sum() > 0


def test_rollout_starts_at_ratio_one_and_zero_kl(tiny_models, prompt_files, tmp_path):
    """Rollout log-probs come from the forward training repeats (bf16 weights here): before any step the ratio is 1
    to fp32 rounding; and with LoRA's B at zero the policy is its reference, so the KL is exactly 0."""
    trainer = build_trainer(tiny_models, prompt_files, tmp_path, "--value_model_init", "policy_trunk", "--dtype", "bfloat16")
    queries = trainer.processing_class(["Write a short note", "Tell me about the sea"], padding=True,
                                       padding_side="left", return_tensors="pt")["input_ids"]  # fmt: skip
    rollout = trainer.rollout(queries)
    with torch.no_grad():
        logits, _ = trainer.model(rollout.query_responses, trainer.processing_class.pad_token_id, RESPONSE)
    logprobs = torch.log_softmax(logits.float() / (trainer.args.temperature + 1e-7), -1)
    logprobs = logprobs.gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    kept = ~rollout.padding_mask
    torch.testing.assert_close(logprobs[kept], rollout.logprobs[kept], rtol=0, atol=1e-5)
    assert torch.equal(rollout.kl, torch.zeros_like(rollout.kl))


def test_activation_checkpointing_is_applied(tiny_models, prompt_files, tmp_path):
    """TRL's PPOTrainer never applies it (transformers' Trainer does, in the train() TRL replaces)."""
    off = build_trainer(tiny_models, prompt_files, tmp_path / "off")
    on = build_trainer(tiny_models, prompt_files, tmp_path / "on", "--activation_checkpointing", "true")
    for trainer, expected in ((off, False), (on, True)):
        wrapper = trainer.accelerator.unwrap_model(trainer.model)
        assert wrapper.policy.is_gradient_checkpointing is expected
        assert wrapper.value_model.is_gradient_checkpointing is expected


def test_adapter_disabled_view_is_the_base_model(tiny_models, prompt_files, tmp_path):
    trainer = build_trainer(tiny_models, prompt_files, tmp_path)
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    for name, parameter in policy.named_parameters():  # move the adapter away from the identity
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    reference = AdapterDisabled(policy, trainer.null_ref_context)
    batch = left_padded_batch(trainer)
    pad_id = trainer.processing_class.pad_token_id
    with torch.no_grad():
        with policy.disable_adapter():
            base = plain_forward(policy, batch, pad_id).logits
        adapted = plain_forward(policy, batch, pad_id).logits
        viewed = plain_forward(reference, batch, pad_id).logits
    torch.testing.assert_close(viewed, base)
    assert not torch.allclose(viewed, adapted)
