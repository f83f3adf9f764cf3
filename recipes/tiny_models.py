"""Tiny randomly initialised models for tests and the `tiny` recipe: a 2-layer Llama policy and a 2-layer Llama
reward model sharing a real tokenizer (by default SmolLM2's, from the offline cache)."""

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from recipes.model_cache import resolve_model_path

DEFAULT_TOKENIZER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """About 3.3M parameters with SmolLM2's 49k vocabulary, almost all of them in the tied embedding."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_models(output_dir: str | Path, tokenizer_name_or_path: str = DEFAULT_TOKENIZER, seed: int = 0) -> dict:
    """Writes `policy/` (causal LM) and `reward/` (one-label sequence classifier), each with the tokenizer, and
    returns their paths. Deterministic for a seed."""
    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name_or_path))
    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    paths = {"policy": output_dir / "policy", "reward": output_dir / "reward"}
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(paths["policy"])
    torch.manual_seed(seed + 1)
    reward_config = tiny_llama_config(len(tokenizer), num_labels=1, pad_token_id=config.pad_token_id)
    LlamaForSequenceClassification(reward_config).save_pretrained(paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths
