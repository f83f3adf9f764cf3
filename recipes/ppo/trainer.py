"""The PPO loop: rollout → score → advantages → epochs of mini-batches, one update at a time, resumable at any
update. The mathematics is in `recipes.ppo.core`; checkpoints in `recipes.ppo.checkpoint`; how the models meet
accelerate, DeepSpeed and FSDP in `recipes.ppo.distributed`.

    trainer = PPOTrainer(config, plan, accelerator, tokenizer, models, prompts, reward)
    progress = trainer.train(resume_from=None)      # every update logged through `log`
    trainer.save_trained_models(output_dir)
"""

import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from recipes.generation import response_logits, sample_responses, sampling_config, scale_logits
from recipes.data import PromptBatch, collate_prompts
from recipes.errors import RecipeError
from recipes.ppo import checkpoint, core, distributed
from recipes.ppo.config import BatchPlan, PPOConfig
from recipes.ppo.model import PolicyAndValue
from trl.trainer.utils import disable_dropout_in_model
from recipes.rewards.sources import Episodes, RewardSource
from recipes.tracking import PhaseMeter, log_sample_table


class PromptOrder:
    """Which prompts each process uses in each update, from the seed and the update number alone: epoch e is a
    permutation drawn from a generator seeded with (seed, e), cut into global batches (a last partial one dropped)
    that are split between processes. A resumed run therefore draws exactly the prompts it would have drawn."""

    def __init__(self, dataset, local_batch: int, process_index: int, num_processes: int, seed: int, pad_token_id: int):
        self.dataset = dataset
        self.local_batch = local_batch
        self.process_index = process_index
        self.global_batch = local_batch * num_processes
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise RecipeError(f"{len(dataset)} training prompts are fewer than the {self.global_batch} of one update")
        self.seed = seed
        self.pad_token_id = pad_token_id

    def batch(self, update: int) -> PromptBatch:
        """The prompts of `update` (1-based) for this process."""
        epoch, index = divmod(update - 1, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        start = index * self.global_batch + self.process_index * self.local_batch
        rows = [self.dataset[i] for i in order[start : start + self.local_batch]]
        return collate_prompts(rows, self.pad_token_id)


@dataclass
class Rollout:
    """One update's episodes on this process, scored. Token tensors [B, W + T]; per-token tensors [B, T] (log-probs
    hold `core.MASKED_LOGPROB` at padding, values 0 after the position that follows the last token); per-episode
    [B]."""

    query_responses: torch.Tensor
    responses: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    padding: torch.Tensor
    padding_after_next: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor
    scores_by_source: dict[str, torch.Tensor]

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.scores, self.logprobs, self.values, self.advantages))


@dataclass
class RunProgress:
    """What a checkpoint records besides tensors. `update` counts finished updates."""

    update: int = 0
    episode: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    wandb_run_id: str | None = None
    elapsed_seconds: float = 0.0
    preempted: bool = False
    """Stopped by SIGTERM before its last update."""


class NonFiniteRunError(RecipeError):
    """The run stopped because of non-finite values; the last good checkpoint is intact."""


STAT_METRICS = {
    "approxkl": "policy/approxkl_avg",
    "pg_clipfrac": "policy/clipfrac_avg",
    "pg_loss": "loss/policy_avg",
    "vf_loss": "loss/value_avg",
    "vf_clipfrac": "val/clipfrac_avg",
    "entropy": "policy/entropy_avg",
    "ratio": "val/ratio",
}
"""The optimisation statistics, each averaged over every micro-batch of the update, under TRL's metric names."""


class PPOTrainer:
    """Trains `models.policy` (and its critic) with PPO against `reward`. Every process runs the same calls."""

    def __init__(self, config: PPOConfig, plan: BatchPlan, accelerator, tokenizer, models, prompts, reward: RewardSource,
                 held_out=None, log: Callable[[int, dict], None] | None = None):  # fmt: skip
        self.config, self.plan, self.accelerator, self.tokenizer = config, plan, accelerator, tokenizer
        self.reward = reward
        self.held_out = held_out
        """A `recipes.evaluation.HeldOutEvaluation`, run every `eval_every_updates` updates (or None)."""
        self.log = log or (lambda update, metrics: None)
        self.train_prompts = prompts.train
        self.sample_prompts = prompts.eval
        self.stop_token_id = tokenizer.eos_token_id if config.stop_token == "eos" else config.stop_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.phases = PhaseMeter(accelerator.device)
        self.backend = distributed.Backend(accelerator)

        model = PolicyAndValue(models.policy, models.value)
        # No dropout anywhere (TRL's choice too): PPO's ratio and KL compare the same function before and after.
        disable_dropout_in_model(model)
        model.train()
        if config.activation_checkpointing:
            model.gradient_checkpointing_enable(config.activation_checkpointing_kwargs)
        self.optimizer = build_optimizer(config, model)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer, num_warmup_steps=config.get_warmup_steps(plan.updates),
            num_training_steps=plan.updates, scheduler_specific_kwargs=config.lr_scheduler_kwargs or {},
        )  # fmt: skip
        self.backend.configure(plan, config)
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.backend.initialise(self.model, self.pad_token_id)
        accelerator.print(f"backend: {self.backend.describe(self.model)}")
        accelerator.register_for_checkpointing(self.scheduler)
        accelerator.register_save_state_pre_hook(checkpoint.keep_trained_weights)
        self.reference = self.backend.prepare_frozen(models.reference)
        self.backend.prepare_reward(reward)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def train(self, resume_from=None) -> RunProgress:
        """Runs the remaining updates; with `resume_from` (a checkpoint folder), continues after its update with its
        weights, optimizer, scheduler and random states. Checkpoints every `save_steps` updates and on SIGTERM (then
        stops). Returns the progress at the end."""
        config, accelerator = self.config, self.accelerator
        if resume_from:
            progress = checkpoint.load(self, resume_from)
        else:
            progress = RunProgress()
            # Each process its own stream for sampling and mini-batch order (as TRL: seed + rank × a prime).
            local_seed = config.seed + accelerator.process_index * 100_003
            torch.manual_seed(local_seed)
            np.random.seed(local_seed % 2**32)
            random.seed(local_seed)
        order = PromptOrder(self.train_prompts, self.plan.local_episodes, accelerator.process_index,
                            accelerator.num_processes, config.seed, self.pad_token_id)  # fmt: skip
        stop = PreemptionFlag()
        started = time.time() - progress.elapsed_seconds
        bar = tqdm(total=self.plan.updates, initial=progress.update, desc="PPO updates", unit="update",
                   disable=config.disable_tqdm or not accelerator.is_main_process)  # fmt: skip
        for update in range(progress.update + 1, self.plan.updates + 1):
            self.phases.start_update()
            rollout = self.rollout(order.batch(update))
            finite = self.all_processes(rollout.is_finite())
            with self.phases("optimisation"):
                stats = self.optimise(rollout) if finite else None
            finite = finite and stats is not None
            progress.update, progress.episode = update, progress.episode + self.plan.episodes_per_update
            progress.elapsed_seconds = time.time() - started
            progress.skipped_nonfinite += not finite
            progress.nonfinite_in_a_row = 0 if finite else progress.nonfinite_in_a_row + 1
            metrics = self.update_metrics(rollout, stats, progress)
            if self.held_out is not None and self.held_out.due(update, self.plan.updates):
                with self.phases("evaluation"):
                    metrics.update(self.evaluate_held_out())
            if config.num_sample_generations and (update - 1) % self.sample_table_every() == 0:
                self.sample_table(update)
            metrics.update(self.phases.metrics())
            if self.logging_due(update):
                self.log(update, metrics)
            self.scheduler.step()
            bar.update(1)
            bar.set_postfix({"score": f"{metrics['objective/scores']:.3f}", "kl": f"{metrics['objective/kl']:.2f}"})
            if progress.nonfinite_in_a_row >= config.max_nonfinite_updates:
                bar.close()
                raise NonFiniteRunError(
                    f"{progress.nonfinite_in_a_row} updates in a row had a non-finite reward, advantage, loss or "
                    f"gradient; stopped. The last good checkpoint is {checkpoint.latest(config.output_dir) or 'none'}"
                )
            preempted = self.any_process(stop.requested)
            if finite and (preempted or self.checkpoint_due(update)):
                checkpoint.save(self, progress)
            if preempted:
                bar.close()
                accelerator.print(f"SIGTERM: stopped after update {update}; rerun the same command to resume")
                progress.preempted = True
                return progress
        bar.close()
        return progress

    # -- one update -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Samples responses to the batch's prompts and scores them: log-probs of the policy and the reference,
        values, rewards, per-token KL-shaped rewards and GAE advantages."""
        config, accelerator = self.config, self.accelerator
        queries = batch.input_ids.to(accelerator.device)
        width, response_width = queries.shape[1], config.response_length
        with self.phases("generation"), self.backend.sampling(self.model, config) as policy:
            responses = sample_responses(
                policy, queries,
                sampling_config(response_width, config.temperature, self.tokenizer.eos_token_id, self.pad_token_id),
                config.local_rollout_forward_batch_size, synced_gpus=self.backend.needs_synced_sampling,
            )  # fmt: skip
        return self.score(batch, queries, responses)

    @torch.no_grad()
    def score(self, batch: PromptBatch, queries: torch.Tensor, responses: torch.Tensor) -> Rollout:
        """Everything PPO needs of sampled `responses` [B, T] to the left-padded `queries` [B, W]."""
        config, accelerator = self.config, self.accelerator
        query_responses = torch.cat([queries, responses], 1)
        response_width = responses.shape[1]
        logprobs, ref_logprobs, values = [], [], []
        step = config.local_rollout_forward_batch_size
        with self.phases("scoring"), accelerator.autocast():
            for start in range(0, len(query_responses), step):
                rows = query_responses[start : start + step]
                # The rollout's log-probs come from the forward that training repeats: the first PPO step starts
                # at a ratio of exactly 1.
                logits, value = self.model(rows, self.pad_token_id, response_width)
                logprobs.append(core.token_logprobs(scale_logits(logits, config.temperature), rows[:, -response_width:]))
                values.append(value.float())
                ref_logits = self.reference_logits(rows, response_width)
                ref_logprobs.append(core.token_logprobs(scale_logits(ref_logits, config.temperature), rows[:, -response_width:]))
            scored = core.cut_after_stop(responses, self.stop_token_id, self.pad_token_id)
            episodes = Episodes(
                prompts=batch.prompts,
                completions=self.tokenizer.batch_decode(scored, skip_special_tokens=True),
                conversations=batch.conversations,
                token_ids=torch.cat([queries, scored], 1),
                pad_token_id=self.pad_token_id,
            )
            reward = self.reward.score(episodes)
        scores = reward.total.to(accelerator.device)
        if config.missing_eos_penalty is not None:
            ended = (scored == self.tokenizer.eos_token_id).any(-1)
            scores = torch.where(ended, scores, scores - config.missing_eos_penalty)
        last_index = core.last_token_index(scored, self.pad_token_id)
        padding, padding_after_next = core.padding_masks(last_index, response_width)
        logprobs = torch.cat(logprobs).masked_fill(padding, core.MASKED_LOGPROB)
        ref_logprobs = torch.cat(ref_logprobs).masked_fill(padding, core.MASKED_LOGPROB)
        values = torch.cat(values).masked_fill(padding_after_next, 0)
        kl = core.kl_per_token(logprobs, ref_logprobs, config.kl_estimator)
        rewards, non_score_reward = core.shape_rewards(scores, kl, config.kl_coef, last_index)
        if config.whiten_rewards:
            rewards = core.whiten(rewards, ~padding_after_next, shift_mean=False).masked_fill(padding_after_next, 0)
        advantages, returns = core.generalized_advantages(rewards, values, config.gamma, config.lam)
        advantages = core.whiten(advantages, ~padding).masked_fill(padding, 0)
        return Rollout(
            query_responses=query_responses, responses=responses, logprobs=logprobs, values=values,
            advantages=advantages, returns=returns, padding=padding, padding_after_next=padding_after_next,
            scores=scores, kl=kl, non_score_reward=non_score_reward, scores_by_source=reward.by_source,
        )  # fmt: skip

    def reference_logits(self, rows: torch.Tensor, response_width: int) -> torch.Tensor:
        """The reference's logits predicting each response token [B, T, V]: the separate reference model, or the
        trained module with its LoRA adapter disabled (through the same distributed wrap)."""
        if self.reference is None:
            return self.model(rows, self.pad_token_id, response_width, reference=True)[0]
        return response_logits(self.reference, rows, self.pad_token_id, response_width)

    def optimise(self, rollout: Rollout) -> dict[str, torch.Tensor] | None:
        """`num_ppo_epochs` passes over the rollout in shuffled mini-batches, one optimizer step each, of
        micro-batches whose gradients are averaged. Returns the statistics of every micro-batch [epochs,
        mini-batches, micro-batches], or None at the first non-finite loss or gradient on any process (the
        update's steps are then undone: `distributed.Backend.snapshot`)."""
        config, plan, accelerator = self.config, self.plan, self.accelerator
        shape = (config.num_ppo_epochs, plan.num_mini_batches, plan.micro_batches_per_step)
        stats = {name: torch.zeros(shape, device=accelerator.device) for name in STAT_METRICS}
        response_width = rollout.responses.shape[1]
        snapshot = self.backend.snapshot(self.model, self.optimizer)
        for epoch in range(config.num_ppo_epochs):
            order = self.episode_order(plan.local_episodes)
            for mini in range(plan.num_mini_batches):
                mini_batch = order[mini * plan.local_mini_batch : (mini + 1) * plan.local_mini_batch]
                for micro in range(plan.micro_batches_per_step):
                    index = mini_batch[micro * plan.micro_batch : (micro + 1) * plan.micro_batch]
                    with accelerator.accumulate(self.model):
                        losses = self.micro_batch_losses(rollout, index, response_width)
                        finite = self.all_processes(bool(torch.isfinite(losses["loss"])))
                        if finite:
                            accelerator.backward(losses["loss"])
                            finite = self.finite_gradients()
                        if not finite:
                            self.optimizer.zero_grad()
                            snapshot.restore()
                            return None
                        if accelerator.sync_gradients and config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for name in STAT_METRICS:
                        stats[name][epoch, mini, micro] = losses[name].detach()
        return stats

    def episode_order(self, episodes: int) -> np.ndarray:
        """The order of an epoch's episodes before they are cut into mini-batches: a fresh shuffle from numpy's
        generator (seeded per process; restored on resume)."""
        return np.random.permutation(episodes)

    def micro_batch_losses(self, rollout: Rollout, index, response_width: int) -> dict[str, torch.Tensor]:
        """The PPO loss of the episodes `index` of `rollout` under the current weights, with its statistics."""
        config = self.config
        logits, values = self.model(rollout.query_responses[index], self.pad_token_id, response_width)
        logits = scale_logits(logits, config.temperature)
        padding, padding_after_next = rollout.padding[index], rollout.padding_after_next[index]
        logprobs = core.token_logprobs(logits, rollout.responses[index]).masked_fill(padding, core.MASKED_LOGPROB)
        policy = core.clipped_policy_loss(logprobs, rollout.logprobs[index], rollout.advantages[index], ~padding,
                                          config.cliprange)  # fmt: skip
        value = core.clipped_value_loss(values.float().masked_fill(padding_after_next, 0), rollout.values[index],
                                        rollout.returns[index], ~padding_after_next, config.cliprange_value)  # fmt: skip
        with torch.no_grad():
            entropy = core.entropy_from_logits(logits).mean()
        return {
            "loss": policy["loss"] + config.vf_coef * value["loss"],
            "pg_loss": policy["loss"], "pg_clipfrac": policy["clipfrac"], "ratio": policy["ratio"],
            "approxkl": policy["approxkl"], "vf_loss": value["loss"], "vf_clipfrac": value["clipfrac"],
            "entropy": entropy,
        }  # fmt: skip

    def finite_gradients(self) -> bool:
        """Whether every process's gradients are finite (always true under DeepSpeed, which steps inside backward:
        its loss was checked instead)."""
        if self.backend.is_deepspeed:
            return True
        local = all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)
        return self.all_processes(local)

    def update_metrics(self, rollout: Rollout, stats: dict | None, progress: RunProgress) -> dict[str, float]:
        """TRL's metrics for one update (same names), averaged over processes, and the kit's own."""
        mean = lambda value: self.accelerator.gather_for_metrics(value.reshape(-1)).float().mean().item()  # noqa: E731
        non_score = rollout.non_score_reward.sum(1).mean()
        metrics = {
            "eps": progress.episode / max(progress.elapsed_seconds, 1e-9),
            "objective/kl": mean(rollout.kl.sum(1).mean()),
            "objective/entropy": mean((-rollout.logprobs * (~rollout.padding).float()).sum(1).mean()),
            "objective/non_score_reward": mean(non_score),
            "objective/rlhf_reward": mean(non_score + rollout.scores.mean()),
            "objective/scores": mean(rollout.scores.mean()),
        }
        if stats is not None:
            for name, key in STAT_METRICS.items():
                metrics[key] = mean(stats[name])
            metrics["val/ratio_var"] = self.accelerator.gather_for_metrics(stats["ratio"].reshape(-1)).var().item()
        for name, scores in rollout.scores_by_source.items():
            metrics[f"reward/{name}"] = mean(scores.to(self.accelerator.device).mean())
        eos = (rollout.responses == self.tokenizer.eos_token_id).sum()
        metrics["val/num_eos_tokens"] = self.accelerator.reduce(eos, reduction="sum").item()
        # Positions the sampler computed (rows that stopped early still take part until the last one stops).
        metrics["rollout/sampled_positions"] = rollout.responses.numel() * self.accelerator.num_processes
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["episode"] = progress.episode
        metrics["nonfinite/skipped_updates"] = progress.skipped_nonfinite
        return metrics

    # -- evaluation and samples -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """The held-out evaluation of the current policy against the reference. Every process runs it (sampling
        under sharded weights needs all of them); the training's random streams are left as they were."""
        keep_training_streams = torch.random.fork_rng(devices=self.backend.rng_devices)
        with keep_training_streams, self.backend.sampling(self.model, self.config) as policy:
            reference = self.reference or distributed.AdapterDisabled(policy)
            results = self.held_out(policy, reference, self.backend.needs_synced_sampling)
        return {f"eval/{key}": value for key, value in results.items()}

    def sample_table_every(self) -> int:
        return max(1, self.plan.updates // self.config.num_sample_generations)

    @torch.no_grad()
    def sample_table(self, update: int) -> None:
        """Greedy completions of a few held-out prompts with their scores: printed, and logged to W&B as
        `completions` (TRL's sample table)."""
        shown = min(self.config.per_device_eval_batch_size, len(self.sample_prompts))
        batch = collate_prompts([self.sample_prompts[i] for i in range(shown)], self.pad_token_id)
        queries = batch.input_ids.to(self.accelerator.device)
        config = sampling_config(self.config.response_length, 1.0, self.tokenizer.eos_token_id, self.pad_token_id,
                                 greedy=True)  # fmt: skip
        keep_training_streams = torch.random.fork_rng(devices=self.backend.rng_devices)
        with keep_training_streams, self.backend.sampling(self.model, self.config) as policy:
            responses = sample_responses(policy, queries, config, len(queries), self.backend.needs_synced_sampling)
        scored = core.cut_after_stop(responses, self.stop_token_id, self.pad_token_id)
        completions = self.tokenizer.batch_decode(scored, skip_special_tokens=True)
        scores = self.reward.score(Episodes(batch.prompts, completions, batch.conversations,
                                            torch.cat([queries, scored], 1), self.pad_token_id)).total  # fmt: skip
        if self.accelerator.is_main_process:
            log_sample_table(update, batch.prompts, completions, scores.tolist())

    # -- agreement between processes, schedules ---------------------------------------------------------------------

    def all_processes(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.accelerator.num_processes)

    def any_process(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def checkpoint_due(self, update: int) -> bool:
        config = self.config
        if config.save_strategy != "steps" or update >= self.plan.updates:
            return False
        return update % every(config.save_steps, self.plan.updates) == 0

    def logging_due(self, update: int) -> bool:
        return update % every(self.config.logging_steps, self.plan.updates) == 0 or update == self.plan.updates

    def save_trained_models(self, output_dir) -> None:
        checkpoint.save_trained_models(self, output_dir)


def every(steps: float, total: int) -> int:
    """A `*_steps` field as a whole number of updates: a number below 1 is a share of `total`."""
    return max(1, math.ceil(total * steps) if steps < 1 else int(steps))


NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
"""Parameters without weight decay, by name (as transformers' Trainer excludes them): biases, normalisation."""


def build_optimizer(config: PPOConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `optim` names (transformers' choice of class and arguments, as its Trainer makes it), over the
    trainable parameters, with weight decay on all but biases and normalisation weights."""
    from transformers import Trainer

    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decayed], "weight_decay": config.weight_decay},
        {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0},
    ]
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(config, model)
    return optimizer_class([group for group in groups if group["params"]], **kwargs)


class PreemptionFlag:
    """Set by SIGTERM (the usual preemption notice): the loop checkpoints at the end of the update and stops."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
