"""How the recipe's model settings become models: which reference, which layers are quantized, which are frozen,
which carry LoRA adapters, and what the reward is."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from recipes import ModelArguments, RecipeError, parse_recipe
from recipes.models import (
    PPOModels,
    load_policy,
    load_policy_for_training,
    load_ppo_models,
    load_reference_model,
    load_reward,
    load_tokenizer,
    load_value_model,
    policy_quantization,
    reference_mode,
)
from recipes.ppo.model import ValueHead
from recipes.rewards.sources import ModelSource


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


def test_quantized_policy_without_lora_is_refused(tiny_models):
    with pytest.raises(RecipeError, match="a quantized policy trains only through LoRA"):
        policy_quantization(model_args(tiny_models, use_peft=False, load_in_8bit=True))


def lora_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_policy_for_training_carries_its_lora_adapters(tiny_models):
    """Only the adapters on the recipe's target modules train; disabling them gives back the base model."""
    args = model_args(tiny_models, dtype="bfloat16")
    policy = load_policy_for_training(args)
    assert isinstance(policy, PeftModel)
    trainable = lora_names(policy)
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {"q_proj", "v_proj"}
    # Adapters in fp32 on a bf16 base.
    assert {p.dtype for n, p in policy.named_parameters() if n in trainable} == {torch.float32}
    assert policy.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16

    ids = torch.tensor([[1, 2, 3, 4]])
    base = load_policy(args)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.01)  # LoRA's B starts at zero: make the adapter change the output
        with policy.disable_adapter():
            disabled = policy(input_ids=ids).logits
        enabled = policy(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert torch.equal(disabled, expected)
    assert not torch.allclose(enabled.float(), expected.float())


def test_policy_for_training_without_lora_trains_every_weight(tiny_models):
    policy = load_policy_for_training(model_args(tiny_models, use_peft=False))
    assert not isinstance(policy, PeftModel)
    assert all(parameter.requires_grad for parameter in policy.parameters())


def test_qlora_policy_for_training_has_trainable_adapters_on_a_4bit_base(tiny_models):
    policy = load_policy_for_training(model_args(tiny_models, load_in_4bit=True))
    assert isinstance(policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    trainable = lora_names(policy)
    assert trainable and all("lora_" in name for name in trainable)


def test_reward_model_reads_the_policy_tokens_and_is_frozen(tiny_models):
    reward = load_reward(model_args(tiny_models))
    assert isinstance(reward, ModelSource)
    assert reward.name == "reward_model"
    assert reward.tokenizer is None  # the policy's tokenizer: it scores the policy's own token ids
    assert reward.model.config.num_labels == 1
    assert not reward.model.training
    assert not any(parameter.requires_grad for parameter in reward.model.parameters())


def test_reward_model_with_its_own_tokenizer_pads_apart_from_eos(tiny_models):
    reward = load_reward(model_args(tiny_models, reward_model_tokenizer="own", value_model_init="policy"))
    assert isinstance(reward, ModelSource) and reward.tokenizer is not None
    assert reward.tokenizer.name_or_path == str(tiny_models["reward"])
    # SmolLM2's tokenizer pads with EOS; the source gives it another pad token, as EOS closes each completion.
    assert reward.tokenizer.pad_token_id != reward.tokenizer.eos_token_id


def test_reward_model_with_two_labels_is_refused(tiny_models, two_label_reward_model):
    args = model_args(tiny_models, reward_model_name_or_path=str(two_label_reward_model))
    with pytest.raises(RecipeError, match=r"reward_model_name_or_path: .* has 2 labels"):
        load_reward(args)


@pytest.mark.parametrize("init", ["reward_model", "policy"])
def test_value_model_is_a_trainable_one_label_classifier(tiny_models, init):
    args = model_args(tiny_models, value_model_init=init)
    tokenizer = load_tokenizer(args)
    policy = load_policy(args)
    value = load_value_model(args, tokenizer, policy)
    assert value.config.num_labels == 1
    assert all(parameter.requires_grad for parameter in value.parameters())
    reward = load_reward(args).model
    if init == "reward_model":
        assert torch.equal(value.score.weight, reward.score.weight)
        assert torch.equal(value.model.embed_tokens.weight, reward.model.embed_tokens.weight)
    else:
        assert torch.equal(value.model.embed_tokens.weight, policy.model.embed_tokens.weight)
        assert not torch.equal(value.model.embed_tokens.weight, reward.model.embed_tokens.weight)


def test_value_model_with_lora_trains_adapters_and_its_score_head(tiny_models):
    args = model_args(tiny_models, value_model_init="policy", value_use_peft=True)
    value = load_value_model(args, load_tokenizer(args), load_policy(args))
    trainable = lora_names(value)
    assert any("lora_" in name for name in trainable)
    assert any("score" in name for name in trainable)  # a fresh head: it trains in full
    assert all("lora_" in name or "score" in name for name in trainable)


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


def test_ppo_models_for_a_lora_recipe(tiny_models):
    """The policy with its adapters, no second copy as the reference, a value head, the reward model; sampling pads
    with the kit's pad token."""
    args = model_args(tiny_models, value_model_init="policy_trunk")
    tokenizer = load_tokenizer(args)
    models = load_ppo_models(args, tokenizer)
    assert isinstance(models, PPOModels)
    assert isinstance(models.policy, PeftModel)
    assert models.reference is None
    assert isinstance(models.value, ValueHead)
    assert isinstance(models.reward, ModelSource)
    assert models.policy.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
