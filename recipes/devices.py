"""Precision and device defaults shared by the kit's trainer arguments (PPO and reward-model training), and the
process state of the scripts that run without a trainer (evaluation, the preference builder)."""

from dataclasses import dataclass

import torch
from accelerate import PartialState


def apply_cpu_defaults(args) -> None:
    """Without a GPU: fp32 unless `bf16` is set, and always `use_cpu`. TRL defaults to bf16 mixed precision, which
    transformers refuses without a GPU unless `use_cpu` is set; `use_cpu` also makes the processes started by
    `accelerate launch --num_processes N` join one gloo process group (otherwise each process trains alone).
    Call it in `__post_init__` before the parent's."""
    if not torch.cuda.is_available():
        if args.bf16 is None:
            args.bf16 = False
        args.use_cpu = True


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` started. Without a GPU the processes must say they run
    on the CPU to join one gloo group; otherwise each runs alone."""
    return PartialState(cpu=not torch.cuda.is_available())


def process_device(state: PartialState) -> torch.device:
    """Where this process's models go: its GPU, or the CPU. Named plainly 'cpu', as for a model loaded without a
    device, although accelerate says 'cpu:0' for several CPU processes: on 'cpu' transformers leaves the weights
    mapped from the safetensors file, on 'cpu:0' it copies them to memory aligned differently, and float32 matmuls
    on the CPU round differently in the last bits (reward scores differed in the 7th digit): one process and
    several must give the same figures."""
    return torch.device("cpu") if state.device.type == "cpu" else state.device


@dataclass(frozen=True)
class Shard:
    """Which of a job's numbered batches this process takes: those whose index k has k mod `count` = `index`. A
    batch is then the same work, seeded the same, whichever process does it; the results are gathered."""

    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, state: PartialState) -> "Shard":
        return cls(state.process_index, state.num_processes)

    def mine(self, batches: int) -> list[int]:
        return [k for k in range(batches) if k % self.count == self.index]
