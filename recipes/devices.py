"""Precision and device defaults shared by the kit's trainer arguments (PPO and reward-model training)."""

import torch


def apply_cpu_defaults(args) -> None:
    """Without a GPU: fp32 unless `bf16` is set, and always `use_cpu`. TRL defaults to bf16 mixed precision, which
    transformers refuses without a GPU unless `use_cpu` is set; `use_cpu` also makes the processes started by
    `accelerate launch --num_processes N` join one gloo process group (otherwise each process trains alone).
    Call it in `__post_init__` before the parent's."""
    if not torch.cuda.is_available():
        if args.bf16 is None:
            args.bf16 = False
        args.use_cpu = True
