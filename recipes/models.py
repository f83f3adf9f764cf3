"""Loading the tokenizer and the four PPO models (policy, reference, value, reward) as a recipe describes them."""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import get_peft_config

from recipes.config import ModelArguments
from recipes.errors import RecipeError
from recipes.hub import locate_model
from recipes.padding import unused_special_token
from recipes.ppo.model import ValueHead
from recipes.rewards.sources import FunctionSource, ModelSource, RewardSource, WeightedSum


@dataclass
class PPOModels:
    """What the PPO trainer needs. The policy carries its LoRA adapters when the recipe trains through LoRA;
    `reference` is None when that policy with its adapter disabled serves as the reference."""

    policy: PreTrainedModel
    reference: PreTrainedModel | None
    value: PreTrainedModel | ValueHead
    reward: RewardSource


def torch_dtype(name: str | None) -> torch.dtype | str | None:
    """'float32' → torch.float32; 'auto' and None pass through."""
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def quantization_config(mode: str, key: str, model_args: ModelArguments) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for `mode` ('none', '8bit', '4bit'). 4-bit uses the recipe's `bnb_4bit_quant_type`,
    `use_bnb_nested_quant` and `bnb_4bit_quant_storage` (ZeRO-3 shards 4-bit weights stored as bf16), computing in
    the recipe's `dtype`. `key` names the recipe field for the error when bitsandbytes is missing."""
    if mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RecipeError(
            f"{key}: {mode} loading needs the bitsandbytes package (pip install bitsandbytes), which is not installed"
        ) from error
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = torch_dtype(model_args.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=torch_dtype(model_args.bnb_4bit_quant_storage) or torch.uint8,
        bnb_4bit_compute_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
    )


def policy_quantization(model_args: ModelArguments) -> str:
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise RecipeError("load_in_4bit and load_in_8bit are both set: choose one")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise RecipeError("load_in_4bit/load_in_8bit: a quantized policy trains only through LoRA (use_peft: true)")
    return "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else "none"


def _from_pretrained(auto_class, name_or_path: str, key: str, **kwargs) -> PreTrainedModel:
    model = auto_class.from_pretrained(locate_model(name_or_path, key, kwargs.get("revision")), **kwargs)
    return contiguous_lm_head_input(model)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_lm_head_input(model: PreTrainedModel) -> PreTrainedModel:
    """Makes the LM head read a contiguous input. transformers hands it the hidden states sliced for
    `logits_to_keep` (the response positions in scoring and training, the last position when sampling starts);
    given that strided view, torch's linear falls back to a batched matmul over the weight expanded once per
    sequence, which a CPU copies in 16 bits: for SmolLM2 in bf16, 8 sequences cost 0.42 GiB and 1.1 s per forward
    against 0.15 s on a contiguous copy of the slice (the same values)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, padding on the left (PPO appends responses to the prompts), with a pad token
    distinct from EOS: TRL's trainer treats every pad id in a sequence as padding, so pad == EOS would mask the
    EOS token out of the loss and the reward."""
    if not model_args.model_name_or_path:
        raise RecipeError("model_name_or_path is not set: name the policy's folder or hub id")
    path = locate_model(model_args.model_name_or_path, "model_name_or_path", model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", revision=model_args.model_revision)
    if model_args.pad_token is not None:
        if model_args.pad_token not in tokenizer.get_vocab():
            raise RecipeError(f"pad_token: '{model_args.pad_token}' is not in the tokenizer's vocabulary")
        tokenizer.pad_token = model_args.pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = unused_special_token(tokenizer)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise RecipeError("pad_token: the pad token must differ from the EOS token for PPO")
    return tokenizer


def load_policy(model_args: ModelArguments) -> PreTrainedModel:
    quantization = quantization_config(policy_quantization(model_args), "load_in_4bit/load_in_8bit", model_args)
    check_model_kind(model_args.model_name_or_path, "model_name_or_path", "language model")
    return _from_pretrained(
        AutoModelForCausalLM,
        model_args.model_name_or_path,
        "model_name_or_path",
        **_model_kwargs(model_args, quantization, revision=model_args.model_revision),
    )


def reference_mode(model_args: ModelArguments) -> str:
    """'adapter_disabled' or 'separate', with 'auto' resolved."""
    if model_args.reference == "auto":
        return "adapter_disabled" if model_args.use_peft else "separate"
    if model_args.reference == "adapter_disabled" and not model_args.use_peft:
        raise RecipeError("reference: 'adapter_disabled' needs a LoRA policy (use_peft: true); use 'separate'")
    return model_args.reference


def load_reference_model(model_args: ModelArguments) -> PreTrainedModel | None:
    """None when the policy with its adapter disabled is the reference; otherwise a frozen separate model
    (default: the policy's base), in full precision, 8-bit or 4-bit."""
    if reference_mode(model_args) == "adapter_disabled":
        return None
    name = model_args.ref_model_name_or_path or model_args.model_name_or_path
    quantization = quantization_config(model_args.ref_quantization, "ref_quantization", model_args)
    check_model_kind(name, "ref_model_name_or_path", "language model")
    reference = _from_pretrained(
        AutoModelForCausalLM, name, "ref_model_name_or_path", **_model_kwargs(model_args, quantization)
    )
    return reference.eval().requires_grad_(False)


def check_reward_block(model_args: ModelArguments, with_critic: bool = True) -> None:
    """The reward fields fit together: some source, one weight per source, and (`with_critic`: PPO's runs) a value
    model that can start from what is configured."""
    functions = model_args.reward_functions or []
    has_model = bool(model_args.reward_model_name_or_path)
    if not has_model and not functions:
        raise RecipeError(
            "no reward: set reward_model_name_or_path (a reward model) and/or reward_functions "
            "('package.module:function' entries; see README.md, 'Bring your own reward')"
        )
    sources = int(has_model) + len(functions)
    if model_args.reward_weights is not None and len(model_args.reward_weights) != sources:
        listed = (["reward_model_name_or_path"] if has_model else []) + functions
        raise RecipeError(
            f"reward_weights has {len(model_args.reward_weights)} weights for {sources} reward sources "
            f"({', '.join(listed)}): give one per source, the reward model first"
        )
    if model_args.reward_model_tokenizer == "own" and not has_model:
        raise RecipeError("reward_model_tokenizer: 'own' applies to reward_model_name_or_path, which is not set")
    if with_critic and model_args.value_model_init == "reward_model":
        if not has_model:
            raise RecipeError(
                "value_model_init: 'reward_model' needs a reward model, and this recipe's reward is functions only; "
                "set value_model_init: policy"
            )
        if model_args.reward_model_tokenizer == "own":
            raise RecipeError(
                "value_model_init: 'reward_model' needs a reward model that reads the policy's tokens, and "
                "reward_model_tokenizer is 'own'; set value_model_init: policy"
            )


def describe_reward(model_args: ModelArguments) -> str:
    """One line naming each reward source and its weight, for the run's log."""
    names = list(model_args.reward_functions or [])
    if model_args.reward_model_name_or_path:
        names.insert(0, f"model {model_args.reward_model_name_or_path} ({model_args.reward_model_tokenizer} tokenizer)")
    weights = model_args.reward_weights or [1.0] * len(names)
    return " + ".join(name if weight == 1 else f"{weight:g} × {name}" for weight, name in zip(weights, names))


def load_reward(model_args: ModelArguments, with_critic: bool = True) -> RewardSource:
    """What PPO scores with: the reward model (reading the policy's tokens, or its own tokenizer's rendering of each
    prompt and completion), the reward functions, or their weighted sum. Methods without a critic (RLOO, GRPO,
    RAFT) pass `with_critic=False`: `value_model_init` is then not checked against the reward."""
    check_reward_block(model_args, with_critic)
    has_model = bool(model_args.reward_model_name_or_path)
    parts: list[RewardSource] = []
    if has_model:
        own_tokenizer = None
        if model_args.reward_model_tokenizer == "own":
            path = locate_model(model_args.reward_model_name_or_path, "reward_model_name_or_path")
            own_tokenizer = AutoTokenizer.from_pretrained(path)
        parts.append(ModelSource(_load_sequence_classifier(model_args), own_tokenizer, name="reward_model"))
    parts += [FunctionSource.from_spec(spec) for spec in model_args.reward_functions or []]
    weights = model_args.reward_weights or [1.0] * len(parts)
    if len(parts) == 1 and weights == [1.0]:
        return parts[0]
    return WeightedSum(list(zip(weights, parts)))


def _load_sequence_classifier(model_args: ModelArguments) -> PreTrainedModel:
    """The reward model, frozen."""
    name = model_args.reward_model_name_or_path
    check_model_kind(name, "reward_model_name_or_path", "reward model")
    quantization = quantization_config(model_args.reward_quantization, "reward_quantization", model_args)
    reward = _from_pretrained(
        AutoModelForSequenceClassification, name, "reward_model_name_or_path", **_model_kwargs(model_args, quantization)
    )
    return reward.eval().requires_grad_(False)


def load_value_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, policy: PreTrainedModel
) -> "PreTrainedModel | ValueHead":
    """The critic: a value head on the policy's trunk (`policy_trunk`), or a one-label sequence-classification
    model initialised from the reward model (its score head included) or from the policy's base (a fresh score
    head), trained in full, or with LoRA when `value_use_peft` (the score head then trains in full)."""
    if model_args.value_model_init == "policy_trunk":
        return ValueHead(policy.config.get_text_config().hidden_size)
    if model_args.value_model_init == "reward_model":
        name, key = model_args.reward_model_name_or_path, "reward_model_name_or_path"
        if not name:
            raise RecipeError("reward_model_name_or_path is not set (value_model_init: reward_model needs it)")
        check_model_kind(name, key, "reward model")
    else:
        name, key = model_args.model_name_or_path, "model_name_or_path"
    value = _from_pretrained(
        AutoModelForSequenceClassification, name, key, num_labels=1, **_model_kwargs(model_args, None)
    )
    if model_args.value_use_peft:
        value = get_peft_model(value, _value_lora_config(model_args))
    return value


def _value_lora_config(model_args: ModelArguments) -> LoraConfig:
    return LoraConfig(
        task_type="SEQ_CLS",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        bias="none",
    )


def check_model_kind(name: str, key: str, kind: str) -> None:
    """Reads the config of the model `key` names, before any weight is loaded: a 'language model' (what a policy or
    reference is: not a classifier, whose missing LM head would load as random weights) or a 'reward model' (a
    sequence classifier with one label). A LoRA adapter folder is checked when its base is loaded."""
    path = locate_model(name, key)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        return
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"{key}: '{name}' is not a model folder or hub model (no usable config.json)") from error
    architectures = config.architectures or []
    classifier = any(architecture.endswith("ForSequenceClassification") for architecture in architectures)
    if kind == "language model" and classifier:
        raise RecipeError(
            f"{key}: '{name}' is a classifier ({', '.join(architectures)}), not a language model that writes text; "
            "name a causal LM (...ForCausalLM)"
        )
    if kind == "reward model" and architectures and not classifier:
        raise RecipeError(
            f"{key}: '{name}' is {', '.join(architectures)}, not a reward model (a ...ForSequenceClassification with "
            "one label): train one with scripts/train_reward.py"
        )
    if kind == "reward model" and config.num_labels != 1:
        raise RecipeError(f"{key}: '{name}' has {config.num_labels} labels; a reward model has one score (num_labels=1)")


def _model_kwargs(model_args: ModelArguments, quantization: BitsAndBytesConfig | None, revision="main") -> dict:
    """`from_pretrained` arguments; the policy's dtype and attention implementation apply to all four models."""
    kwargs = {
        "revision": revision,
        "dtype": torch_dtype(model_args.dtype),
        "attn_implementation": model_args.attn_implementation,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def load_policy_for_training(model_args: ModelArguments) -> PreTrainedModel:
    """The policy as PPO trains it: with fresh LoRA adapters (fp32, whatever the base's dtype) when `use_peft`, on a
    4- or 8-bit base for QLoRA."""
    policy = load_policy(model_args)
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return policy
    if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
        # Gradients must reach the adapters through frozen quantized layers, also under activation checkpointing.
        policy.enable_input_require_grads()
    return get_peft_model(policy, peft_config)


def load_ppo_models(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> PPOModels:
    """Loads the reward first (the cheapest check of the recipe's most likely mistake), then the rest."""
    reward = load_reward(model_args)
    policy = load_policy_for_training(model_args)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return PPOModels(
        policy=policy,
        reference=load_reference_model(model_args),
        value=load_value_model(model_args, tokenizer, policy),
        reward=reward,
    )
