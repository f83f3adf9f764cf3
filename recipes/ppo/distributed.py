"""Where the PPO loop meets accelerate's backends (one process, DDP, DeepSpeed ZeRO-2/3, FSDP 2): what each needs
before `prepare`, where the frozen models go, how the policy samples, and how an update's steps are undone.

The loop itself is the same on every backend: `recipes.ppo.trainer` calls only what is here.
"""

import copy
import os
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from recipes.rewards.sources import ModelSource, RewardSource, WeightedSum


def fsdp_on_cpu(accelerator) -> bool:
    """An FSDP launch config on a machine without GPUs: accelerate selects FSDP only on GPU-like devices and falls
    back to plain DDP over gloo, silently. Switches the run to FSDP with accelerate's own plugin, read from the
    launch config, so that the same FSDP 2 path a GPU cluster runs is exercised on CPU processes (tests, CI)."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type == DistributedType.MULTI_CPU and not torch.cuda.is_available():
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        # Both shared states: every later AcceleratorState() copies the process state's type over its own.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        return True
    return False


class Backend:
    """The accelerate backend of a run, and what the loop does differently on it."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.is_fsdp = accelerator.distributed_type == DistributedType.FSDP
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        self.is_zero3 = self.is_deepspeed and plugin.zero_stage == 3

    def describe(self, model=None) -> str:
        """One line for the run's log, e.g. 'DeepSpeed ZeRO-3 on 2 processes (cpu)'; under FSDP with the number of
        units the prepared `model` is sharded in (one per transformer block, plus the root)."""
        if self.is_deepspeed:
            name = f"DeepSpeed ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"
        elif self.is_fsdp:
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(module, FSDPModule) for module in model.modules()) if model is not None else "?"
            name = f"FSDP {self.accelerator.state.fsdp_plugin.fsdp_version} ({units} units)"
        elif self.accelerator.num_processes > 1:
            name = "DDP"
        else:
            name = "one process"
        processes = self.accelerator.num_processes
        return f"{name} on {processes} process{'es' if processes > 1 else ''} ({self.accelerator.device.type})"

    def configure(self, plan, config) -> None:
        """DeepSpeed reads its batch sizes from its own config, which accelerate fills from a dataloader; the kit
        has none, so it sets them from the batch plan (and the gradient clipping from `max_grad_norm`)."""
        if not self.is_deepspeed:
            return
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = plan.micro_batch
        ds_config["gradient_accumulation_steps"] = plan.micro_batches_per_step
        ds_config["train_batch_size"] = plan.micro_batch * plan.micro_batches_per_step * self.accelerator.num_processes
        ds_config["gradient_clipping"] = config.max_grad_norm if config.max_grad_norm > 0 else 0.0

    def initialise(self, model, pad_token_id: int) -> None:
        """FSDP 2 sets up its state at the first forward of the module it wrapped, which must come through that
        root: a first forward of one of its layers (sampling calls the policy inside the trained module) would take
        them for roots of their own. One forward of a two-token row through the root, before anything else."""
        if not self.is_fsdp:
            return
        token = 1 if pad_token_id == 0 else 0
        with torch.no_grad():
            model(torch.full((1, 2), token, device=self.accelerator.device), pad_token_id, 1)
        # The root keeps its weights gathered after a forward (for the backward that usually follows); a checkpoint
        # loaded now would meet whole tensors where it expects shards.
        model.reshard()

    def prepare_frozen(self, model):
        """A frozen model (the separate reference) placed for inference: under DeepSpeed through its inference
        engine (sharded under ZeRO-3), otherwise whole on this process's device. None passes through."""
        if model is None:
            return None
        disable_dropout_in_model(model)
        model.eval().requires_grad_(False)
        if self.is_deepspeed:
            return prepare_deepspeed(model, self.accelerator)
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            return model  # bitsandbytes places quantized weights when loading
        return model.to(self.accelerator.device)

    def prepare_reward(self, source: RewardSource) -> None:
        """Places the reward models inside `source` as `prepare_frozen` places the reference."""
        if isinstance(source, WeightedSum):
            for part in source.parts:
                self.prepare_reward(part)
        elif isinstance(source, ModelSource):
            source.model = self.prepare_frozen(source.model)

    @property
    def rng_devices(self) -> list:
        """The devices whose random generators `torch.random.fork_rng` must save and restore around sampling that
        is not training's (held-out evaluation, sample tables): this process's GPU, if any."""
        device = self.accelerator.device
        return [device] if device.type == "cuda" else []

    @property
    def needs_synced_sampling(self) -> bool:
        """Whether `generate` must keep every process stepping until all are done: weights gathered layer by layer
        (FSDP, or ZeRO-3 without `ds3_gather_for_generation`) need every process at every forward."""
        return self.accelerator.num_processes > 1 and (self.is_fsdp or self.is_zero3)

    @contextmanager
    def sampling(self, model, config):
        """The policy ready to `generate`: activation checkpointing off (in train mode it drops the KV cache of
        checkpointed layers: each token would be sampled without its context), ZeRO-3 weights gathered when
        `ds3_gather_for_generation` (TRL's `unwrap_model_for_generation`), FSDP's root weights (embeddings, head)
        gathered for the whole call. The trained module stays in train mode throughout, its dropout disabled, as in
        TRL: bitsandbytes' 4-bit layers on a CPU repack their weights for inference the first time they run in eval
        mode without gradients, and no gradient flows through them after that."""
        kwargs = {"use_reentrant": False, **(config.activation_checkpointing_kwargs or {})}
        with unwrap_model_for_generation(
            model, self.accelerator, gather_deepspeed3_params=config.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=kwargs,
        ) as unwrapped:  # fmt: skip
            if self.is_fsdp:
                model.unshard()
            try:
                yield unwrapped.policy
            finally:
                if self.is_fsdp:
                    model.reshard()

    def snapshot(self, model, optimizer) -> "UpdateSnapshot":
        """What an update's optimizer steps change, copied before the first one, so that an update stopped by a
        non-finite loss or gradient can be undone. DeepSpeed steps inside its backward and keeps its own partitions
        of the optimizer state: there the loss is checked before each backward and nothing needs undoing."""
        if self.is_deepspeed:
            return UpdateSnapshot(None, None, None)
        return UpdateSnapshot(model, optimizer, self.accelerator.device)


class UpdateSnapshot:
    """The trainable weights and the optimizer state at an update's start, on the CPU (this process's shards)."""

    def __init__(self, model, optimizer, device):
        self.model, self.optimizer = model, optimizer
        if model is None:
            return
        self.weights = {name: _copy(p) for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer_state = _copy(optimizer.state_dict())

    def restore(self) -> None:
        if self.model is None:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.weights:
                    p.copy_(self.weights[name])
        self.optimizer.load_state_dict(self.optimizer_state)


def _copy(state):
    """A deep copy of tensors (nested in dicts and lists): plain tensors on the CPU, sharded ones (FSDP's DTensors)
    where they are, since moving them would gather them."""
    if isinstance(state, torch.Tensor):
        if type(state) is not torch.Tensor and not isinstance(state, torch.nn.Parameter):
            return state.detach().clone()
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy(value) for value in state)
    return copy.deepcopy(state)


class AdapterDisabled:
    """The LoRA policy seen with its adapter disabled: the reference, for code that samples from it and reads its
    logits (the held-out evaluation)."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def generate(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)
