"""The benchmark's FLOP counts (bench/ppo_bench.py) against torch's own count of the same forward and generation.
torch's FlopCounterMode counts matmuls; with eager attention the attention's matmuls are among them."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from bench.ppo_bench import forward_flops, generation_flops
from recipes.planner import Architecture
from recipes.tiny_models import tiny_llama_config


def tiny_eager_llama():
    config = tiny_llama_config(1000)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), Architecture.from_config(config.to_dict(), "tiny")


def counted(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def test_forward_flops_match_torchs_count():
    model, arch = tiny_eager_llama()
    ids = torch.randint(0, 1000, (3, 40))
    for logit_positions in (1, 9, 40):
        expected = counted(lambda: model(input_ids=ids, logits_to_keep=logit_positions))
        assert forward_flops(arch, 3, 40, logit_positions) == expected


def test_generation_flops_match_torchs_count():
    model, arch = tiny_eager_llama()
    prompts = torch.randint(0, 1000, (3, 20))
    run = lambda: model.generate(  # noqa: E731
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, min_new_tokens=8,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    assert generation_flops(arch, 3, 20, 8) == counted(run)
