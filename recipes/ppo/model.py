"""What PPO trains, as one module: the policy (LoRA adapters or every weight) and its critic. One module, so that
one optimizer, one distributed wrap (DDP, DeepSpeed, FSDP) and one checkpoint cover every trained weight, and every
forward (training, the rollout's scoring, the reference) goes through the wrap's own forward, as sharding needs.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from recipes.generation import forward_inputs

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """The critic as a linear head on the policy's last hidden state (`value_model_init: policy_trunk`), in fp32
    whatever the policy's dtype. It starts at zero: the first values are 0 and GAE starts from the raw returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.score(hidden_states.to(self.score.weight.dtype)).squeeze(-1)

    def save_pretrained(self, output_dir: str | Path, state_dict: dict | None = None, **_) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, Path(output_dir) / VALUE_HEAD_FILE)


class PolicyAndValue(torch.nn.Module):
    """The policy and its critic. The critic is a `ValueHead` on the policy's trunk (one forward of the policy gives
    both log-probs and values), or a separate one-label sequence-classification model (its own backbone runs too).

    `forward(query_responses, pad_token_id, response_width)` → (logits [B, T, V], values [B, T]) at the T positions
    that predict each response token; with `reference=True`, the logits of the policy with its LoRA adapter disabled
    (the reference, when no separate one is loaded) and no values."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy = policy
        self.critic = critic
        # The blocks FSDP's transformer auto-wrap shards one by one (accelerate reads this transformers attribute):
        # without it the whole module is one FSDP unit, gathered whole for every forward.
        self._no_split_modules = sorted(
            {name for model in (policy, critic) for name in getattr(model, "_no_split_modules", None) or []}
        )

    @property
    def shares_trunk(self) -> bool:
        return isinstance(self.critic, ValueHead)

    def forward(self, query_responses: torch.Tensor, pad_token_id: int, response_width: int, reference: bool = False):
        inputs = forward_inputs(query_responses, pad_token_id, response_width)
        if reference:
            with self.policy.disable_adapter():
                return self.policy(**inputs).logits[:, :-1], None
        output = self.policy(**inputs, output_hidden_states=self.shares_trunk)
        if self.shares_trunk:
            hidden = output.hidden_states[-1]
            values = self.critic(hidden[:, -response_width - 1 : -1])
        else:
            inputs.pop("logits_to_keep")
            # A LoRA critic (peft) is read through its base model, whose layers carry the adapters.
            critic = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
            hidden = getattr(critic, critic.base_model_prefix)(**inputs).last_hidden_state
            values = critic.score(hidden[:, -response_width - 1 : -1]).squeeze(-1).float()
        return output.logits[:, :-1], values

    # What TRL's `unwrap_model_for_generation` reads and toggles around sampling; the kit also samples in eval mode.
    # Activation checkpointing must be off while sampling: it drops the KV cache of checkpointed layers in train
    # mode, and each new token would be sampled without its context.
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_activation_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in (self.policy, self.critic):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for module in (self.policy, self.critic):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()
