"""How the recipe's model settings become models: which reference, which layers are quantized, which are frozen."""

import bitsandbytes as bnb
import pytest
import torch

from recipes import ModelArguments, RecipeError, parse_recipe
from recipes.models import (
    load_policy,
    load_reference_model,
    load_reward_model,
    load_tokenizer,
    ValueHead,
    load_value_model,
    reference_mode,
)


def model_args(tiny_models, **overrides) -> ModelArguments:
    settings = dict(
        model_name_or_path=str(tiny_models["policy"]),
        reward_model_name_or_path=str(tiny_models["reward"]),
        dtype="float32",
        use_peft=True,
        lora_target_modules=["q_proj", "v_proj"],
    )
    settings.update(overrides)
    return ModelArguments(**settings)


@pytest.mark.parametrize(
    "use_peft, reference, expected",
    [(True, "auto", "adapter_disabled"), (False, "auto", "separate"), (True, "separate", "separate"),
     (True, "adapter_disabled", "adapter_disabled")],
)  # fmt: skip
def test_reference_mode(tiny_models, use_peft, reference, expected):
    assert reference_mode(model_args(tiny_models, use_peft=use_peft, reference=reference)) == expected


def test_adapter_disabled_reference_needs_lora(tiny_models):
    with pytest.raises(RecipeError, match="reference: 'adapter_disabled' needs a LoRA policy"):
        reference_mode(model_args(tiny_models, use_peft=False, reference="adapter_disabled"))


def test_shared_reference_loads_no_second_model(tiny_models):
    assert load_reference_model(model_args(tiny_models, reference="adapter_disabled")) is None


@pytest.mark.parametrize("mode, layer_type", [("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)])
def test_separate_reference_is_quantized_and_frozen(tiny_models, mode, layer_type):
    reference = load_reference_model(model_args(tiny_models, reference="separate", ref_quantization=mode))
    attention = reference.model.layers[0].self_attn
    assert isinstance(attention.q_proj, layer_type)
    assert isinstance(reference.model.layers[1].mlp.down_proj, layer_type)
    assert not reference.training
    assert not any(parameter.requires_grad for parameter in reference.parameters())


def test_separate_reference_in_full_precision(tiny_models):
    reference = load_reference_model(model_args(tiny_models, use_peft=False))
    assert type(reference.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert reference.dtype == torch.float32


def test_qlora_policy_is_4bit(tiny_models):
    policy = load_policy(model_args(tiny_models, load_in_4bit=True))
    assert isinstance(policy.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_4bit_and_8bit_policy_together_are_refused():
    with pytest.raises(RecipeError, match="8 bit and 4 bit"):
        parse_recipe(["--load_in_4bit", "true", "--load_in_8bit", "true"])


def test_reward_model_has_one_label_and_the_pad_token(tiny_models):
    args = model_args(tiny_models)
    tokenizer = load_tokenizer(args)
    reward = load_reward_model(args, tokenizer)
    assert reward.config.num_labels == 1
    assert reward.config.pad_token_id == tokenizer.pad_token_id
    assert not any(parameter.requires_grad for parameter in reward.parameters())


def test_reward_model_with_two_labels_is_refused(tiny_models, two_label_reward_model):
    args = model_args(tiny_models, reward_model_name_or_path=str(two_label_reward_model))
    with pytest.raises(RecipeError, match=r"reward_model_name_or_path: .* has 2 labels"):
        load_reward_model(args, load_tokenizer(args))


@pytest.mark.parametrize("init", ["reward_model", "policy"])
def test_value_model_is_a_trainable_one_label_classifier(tiny_models, init):
    args = model_args(tiny_models, value_model_init=init)
    tokenizer = load_tokenizer(args)
    value = load_value_model(args, tokenizer, load_policy(args))
    assert value.config.num_labels == 1
    assert value.config.pad_token_id == tokenizer.pad_token_id
    assert all(parameter.requires_grad for parameter in value.parameters())
    if init == "reward_model":
        reward = load_reward_model(args, tokenizer)
        assert torch.equal(value.score.weight, reward.score.weight)


def test_missing_model_folder_is_named(tiny_models, tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(RecipeError, match=rf"model_name_or_path: .*{absent}"):
        load_tokenizer(model_args(tiny_models, model_name_or_path=str(absent)))


def test_value_head_on_the_policy_trunk_starts_at_zero(tiny_models):
    args = model_args(tiny_models, value_model_init="policy_trunk")
    policy = load_policy(args)
    head = load_value_model(args, load_tokenizer(args), policy)
    assert isinstance(head, ValueHead)
    hidden = torch.randn(2, 5, policy.config.hidden_size, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (2, 5) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(2, 5))
    assert sum(p.numel() for p in head.parameters()) == policy.config.hidden_size + 1
