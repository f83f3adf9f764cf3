"""Sampling responses and reading their log-probabilities: the one path the PPO rollout, the evaluation and the
preference builder share.

Token layout everywhere: prompts left-padded to a common width W, responses right-padded to T tokens after them,
[B, W + T]; `pad_token_id` marks padding (it is distinct from EOS, so a sampled EOS is never mistaken for padding).
"""

import torch
from transformers import GenerationConfig

from recipes.ppo.core import token_logprobs


def sampling_config(
    max_new_tokens: int, temperature: float, eos_token_id: int, pad_token_id: int, greedy: bool = False
) -> GenerationConfig:
    """Plain sampling from softmax(logits / temperature): no top-k, no top-p, nor any other logits processor a
    model's own generation config may ask for (repetition penalties...), so that the distribution sampled from is
    the one PPO's ratio and KL are computed with. `greedy` for sample tables."""
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature + 1e-7,
        top_k=None if greedy else 0,
        top_p=None if greedy else 1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def sample_responses(
    model,
    prompts: torch.Tensor,
    config: GenerationConfig,
    batch_size: int,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """Responses [B, config.max_new_tokens] to the left-padded `prompts` [B, W], sampled `batch_size` prompts per
    `generate` call; a response that ends early (EOS) is padded after its EOS. `synced_gpus` keeps every process
    stepping until all have finished (needed when weights are sharded: ZeRO-3, FSDP)."""
    pad_token_id = config.pad_token_id
    width = prompts.shape[1]
    responses = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        attention_mask = batch != pad_token_id
        output = model.generate(
            input_ids=batch.masked_fill(~attention_mask, 0),
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=synced_gpus,
        )
        response = output[:, width:]
        missing = config.max_new_tokens - response.shape[1]
        responses.append(torch.nn.functional.pad(response, (0, missing), value=pad_token_id))
    return torch.cat(responses)


def forward_inputs(query_responses: torch.Tensor, pad_token_id: int, response_width: int) -> dict:
    """Forward arguments for [B, W + T] token rows: padding masked (and replaced by a real id), positions counted
    from each row's first token, logits only at the last T + 1 positions (the LM head over a large vocabulary is a
    large share of the cost; `response_logits` drops the extra one)."""
    attention_mask = query_responses != pad_token_id
    return {
        "input_ids": query_responses.masked_fill(~attention_mask, 0),
        "attention_mask": attention_mask,
        "position_ids": attention_mask.cumsum(1) - attention_mask.long(),
        "logits_to_keep": response_width + 1,
        "return_dict": True,
    }


def response_logits(model, query_responses: torch.Tensor, pad_token_id: int, response_width: int) -> torch.Tensor:
    """The logits that predict each of the last `response_width` tokens: [B, T, V], in the model's dtype."""
    return model(**forward_inputs(query_responses, pad_token_id, response_width)).logits[:, :-1]


@torch.no_grad()
def response_logprobs(
    model, query_responses: torch.Tensor, pad_token_id: int, response_width: int, temperature: float, batch_size: int
) -> torch.Tensor:
    """log p(token | prefix) of each of the last `response_width` tokens at the sampling temperature, `batch_size`
    rows per forward: [B, T] fp32, on the rows' device (padding positions hold meaningless values: mask them)."""
    outputs = []
    for start in range(0, len(query_responses), batch_size):
        rows = query_responses[start : start + batch_size]
        logits = response_logits(model, rows, pad_token_id, response_width)
        outputs.append(token_logprobs(scale_logits(logits, temperature), rows[:, -response_width:]))
    return torch.cat(outputs)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the sampling temperature, in fp32 whatever the model's dtype (log-softmax needs the range)."""
    return logits.float() / (temperature + 1e-7)


def model_device(model) -> torch.device:
    """Where a model (or a wrapper with a `device`, such as a DeepSpeed engine or an adapter-disabled view) runs."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device
