"""The seam between the kit and its PPO engine: the only module that imports TRL's PPO trainer.

TRL 1.12 is the last release with `PPOTrainer` (as `trl.experimental.ppo`). Configs and scripts only see the
names defined here (`PPOArguments`, `RecipePPOTrainer`), so the engine can be swapped without touching them.

`RecipePPOTrainer` keeps TRL's construction, PPO mathematics and metric names, and runs its own update loop
(`train`), built from TRL's rollout helpers, because TRL's `train()` cannot stop and continue: the kit's loop
checkpoints every `save_steps` updates and on SIGTERM, resumes exactly, and skips updates with non-finite values.

It also does less work per update than TRL's loop (bench/RESULTS.md): the policy's logits are computed only at
the positions that predict response tokens; the critic can be a value head on the policy's trunk (one forward
gives log-probs and values); the rollout's log-probs come from the same forward as training's, so the sampler's
full-vocabulary logits are not kept. Each update logs the seconds of its phases and the peak memory.
"""

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Set before the import: trl.experimental warns on import otherwise.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GenerationConfig, PreTrainedModel  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import (  # noqa: E402
    INVALID_LOGPROB,
    PolicyAndValueWrapper,
    batch_generation,
    masked_mean,
    masked_whiten,
    truncate_response,
)
from trl.experimental.utils import first_true_indices, get_reward  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from recipes.devices import apply_cpu_defaults  # noqa: E402
from recipes.errors import RecipeError  # noqa: E402


@dataclass
class PPOArguments(PPOConfig):
    """TRL's `PPOConfig` (all its fields: learning_rate, num_ppo_epochs, kl_coef, response_length, ...) plus the
    run-level fields the kit adds. Defaults differ from TRL where noted."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` (its files are replaced, nothing is deleted)."},
    )
    wandb_project: str = field(
        default="ppo-recipes", metadata={"help": "W&B project, used when `report_to` includes wandb."}
    )
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B run tags."})
    save_strategy: str = field(
        default="steps",
        metadata={"help": "Write a resumable checkpoint every `save_steps` updates ('steps') or only on SIGTERM ('no')."},
    )
    save_steps: float = field(
        default=25, metadata={"help": "Updates between checkpoints (a number below 1: a share of all updates)."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (the newest); null keeps all."}
    )
    max_nonfinite_updates: int = field(
        default=3,
        metadata={"help": "Stop after this many updates in a row skipped for a non-finite reward, advantage or loss."},
    )
    eval_every_updates: int = field(
        default=0,
        metadata={"help": "Evaluate the policy against its reference on the held-out prompts every this many updates "
                  "and after the last (0: never); logged as eval/<key>. See recipes.evaluation.HeldOutEvaluation."},
    )
    eval_reward_functions: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions the held-out evaluation reports beside the PPO reward's own sources "
                  "(e.g. [sentiment], the gold the proxy reward model was learnt from)."},
    )
    # TRL turns this deprecated alias on by default; None lets `activation_checkpointing` (off unless set) decide.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------
# The kit's PPO loop: TRL's mathematics (rollout, KL-shaped rewards, GAE, clipped policy and value losses, the same
# metric names), organised so that a run can stop at any update and continue exactly where it stopped.

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "update-"
PROGRESS_FILE = "progress.json"  # written last: a checkpoint without it is incomplete


@dataclass
class RunProgress:
    """What a checkpoint records besides tensors. `update` counts finished updates (1-based once started)."""

    update: int = 0
    episode: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    wandb_run_id: str | None = None
    elapsed_seconds: float = 0.0
    preempted: bool = False
    """Stopped by SIGTERM before its last update."""


@dataclass
class Rollout:
    """One update's episodes on this process. Token tensors [episodes, prompt_width + response_len]; per-token
    tensors [episodes, response_len]; per-episode tensors [episodes]."""

    query_responses: torch.Tensor
    responses: torch.Tensor
    prompt_width: int
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    padding_mask: torch.Tensor
    """True after each response's last token (its EOS included in the response)."""
    padding_mask_p1: torch.Tensor
    """The same, one position later: values are learnt one step past the last token."""
    scores: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.scores, self.logprobs, self.values, self.advantages))


class PromptOrder:
    """Which prompts each process uses in each update, from the seed and the update number alone: epoch e is a
    permutation drawn from a generator seeded with (seed, e), cut into global batches (a last partial one dropped)
    that are split between processes. A resumed run therefore draws exactly the prompts it would have drawn."""

    def __init__(self, dataset, local_batch: int, process_index: int, num_processes: int, seed: int, collate):
        self.dataset = dataset
        self.local_batch = local_batch
        self.process_index = process_index
        self.global_batch = local_batch * num_processes
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise RecipeError(f"{len(dataset)} training prompts are fewer than the {self.global_batch} of one update")
        self.seed = seed
        self.collate = collate

    def batch(self, update: int) -> dict:
        """The collated prompts of `update` (1-based) for this process."""
        epoch, index = divmod(update - 1, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        start = index * self.global_batch + self.process_index * self.local_batch
        return self.collate([self.dataset[i] for i in order[start : start + self.local_batch]])


def model_inputs(query_responses: torch.Tensor, pad_id: int, response_width: int) -> dict:
    """Forward arguments for left-padded prompts followed by responses [episodes, prompt_width + response_width]:
    pads masked (and replaced by a real id), positions counted from each row's first token, and logits computed
    only at the last `response_width + 1` positions (the lm_head over a large vocabulary is a large share of the
    cost; only the positions that predict response tokens are used, the extra one is dropped by the callers)."""
    attention_mask = query_responses != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    return {
        "input_ids": query_responses.masked_fill(~attention_mask, 0),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "logits_to_keep": response_width + 1,
        "return_dict": True,
    }


class PolicyAndValue(PolicyAndValueWrapper):
    """TRL's policy-and-critic wrapper with the kit's forward: `(logits, values)` at the `response_width`
    positions that predict each response token, i.e. [episodes, response_width, vocab] and [episodes,
    response_width]. With a value head on the policy's trunk (`models.ValueHead`) one forward of the policy gives
    both; with a separate critic, the critic's backbone runs as well."""

    def forward(self, query_responses: torch.Tensor, pad_id: int, response_width: int):
        inputs = model_inputs(query_responses, pad_id, response_width)
        shared_trunk = isinstance(self.critic_backbone, torch.nn.Identity)
        output = self.policy(**inputs, output_hidden_states=shared_trunk)
        if shared_trunk:
            hidden = output.hidden_states[-1]
        else:
            inputs.pop("logits_to_keep")
            hidden = self.critic_backbone(**inputs, output_hidden_states=True).hidden_states[-1]
        values = self.value_model.score(hidden[:, -response_width - 1 : -1].to(self.value_model.score.weight.dtype))
        return output.logits[:, :-1], values.squeeze(-1)


class AdapterDisabled:
    """The LoRA policy seen with its adapter disabled: the reference, for code that calls a model's `generate`
    and forward."""

    def __init__(self, policy, disabled_context):
        self.policy, self.disabled_context = policy, disabled_context

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def generate(self, *args, **kwargs):
        with self.disabled_context():
            return self.policy.generate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self.disabled_context():
            return self.policy(*args, **kwargs)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RecipePPOTrainer(PPOTrainer):
    """TRL's PPOTrainer, plus saving everything a run produces (policy, tokenizer, value model), and what a reward
    model that scores text (`reward_models.sources.RewardSourceModel`) needs: where each batch's prompts end, and
    its per-source scores logged as `reward/<source name>`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TRL 1.12's PPOTrainer skips `Trainer.__init__`, which sets this flag; `Trainer._save` reads it on every
        # process but the first, so saving failed there when several processes ran.
        self.is_distributed_loading_by_transformers = False
        # TRL 1.12 reads `self.model.policy` (reference log-probs with the adapter disabled, saving the policy) on
        # the model `accelerator.prepare` returned: with several processes the DDP wrapper, which has no such
        # attribute (huggingface/trl#2375). An alias, not a registered submodule, makes those reads work.
        unwrapped = self.accelerator.unwrap_model(self.model)
        if unwrapped is not self.model:
            object.__setattr__(self.model, "policy", unwrapped.policy)
        # TRL builds its policy-and-critic wrapper and prepares it (DDP, DeepSpeed) inside `__init__`; the kit's
        # forward (response positions only, a shared trunk) goes on that same object, whose parameters, optimiser
        # and distributed hooks stay as prepared. Gradients reach DDP's reducer only through the wrapper's forward.
        unwrapped.__class__ = PolicyAndValue
        # TRL's PPOTrainer never applies `activation_checkpointing` (transformers' Trainer does it in the `train()`
        # TRL replaces): without this the setting, on by default in TRL's examples, saves nothing.
        if self.args.activation_checkpointing:
            for module in (unwrapped.policy, unwrapped.value_model):
                if hasattr(module, "activation_checkpointing_enable"):
                    module.activation_checkpointing_enable(
                        activation_checkpointing_kwargs={"use_reentrant": False, **(self.args.activation_checkpointing_kwargs or {})}
                    )
        self.phase_seconds: dict[str, float] = {}
        self.held_out_evaluation = None
        """A `recipes.evaluation.HeldOutEvaluation`, run every `eval_every_updates` (set by `recipes.run`)."""
        # TRL scores each batch with `context_length` = the width of its left-padded prompts, which a reward model
        # that splits rows into prompt and completion text cannot see in its inputs; the loaders tell it as they
        # hand out each batch (training rollouts, and the evaluation batches of `generate_completions`).
        context = getattr(self.reward_model, "scoring_context", None)
        if context is not None:
            self.dataloader = PromptWidthRecorder(self.dataloader, context, training=True)
            self.eval_dataloader = PromptWidthRecorder(self.eval_dataloader, context, training=False)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean score of each reward source over the update's training rollouts (`reward/<name>`), averaged
        over all processes, to TRL's metrics. Every process calls `log` once per update."""
        take_logged_sums = getattr(self.reward_model, "take_logged_sums", None)
        if take_logged_sums is not None:
            sums = take_logged_sums()
            if sums:
                totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.accelerator.device)
                totals = self.accelerator.reduce(totals, reduction="sum")
                means = {f"reward/{name}": (total / count).item() for name, (total, count) in zip(sums, totals)}
                logs = {**logs, **means}
        super().log(logs, *args, **kwargs)

    # -- the loop ------------------------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None) -> RunProgress:
        """Runs the remaining updates. With `resume_from` (a checkpoint folder), continues after its update with
        its weights, optimiser, scheduler and random states. Writes a checkpoint every `save_steps` updates when
        `save_strategy: steps`, and on SIGTERM (then stops). Returns the progress at the end."""
        args, accelerator = self.args, self.accelerator
        if resume_from:
            progress = self.load_checkpoint(resume_from)
        else:
            progress = RunProgress()
            # TRL seeds only torch (per process); the mini-batch order comes from numpy's global generator.
            np.random.seed(self.local_seed % 2**32)
            random.seed(self.local_seed)
        order = PromptOrder(
            self.train_dataset, args.local_batch_size, accelerator.process_index, accelerator.num_processes,
            args.seed, self.data_collator,
        )  # fmt: skip
        self.state.global_step, self.state.episode = progress.update, progress.episode
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        self.state.logging_steps = 1
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        stop = PreemptionFlag()
        started = time.time() - progress.elapsed_seconds
        self.model.train()
        for update in range(progress.update + 1, args.num_total_batches + 1):
            queries = order.batch(update)["input_ids"].to(accelerator.device)
            self.phase_seconds = {}
            rollout = self.rollout(queries)
            finite = self._all_processes(rollout.is_finite())
            with self.phase("optimisation"):
                stats = self.optimise(rollout) if finite else None
            finite = finite and stats is not None
            progress.update, progress.episode = update, progress.episode + args.batch_size
            progress.elapsed_seconds = time.time() - started
            progress.skipped_nonfinite += not finite
            progress.nonfinite_in_a_row = 0 if finite else progress.nonfinite_in_a_row + 1
            self.state.global_step, self.state.episode = update, progress.episode
            self.state.epoch = progress.episode / self.train_dataset_len
            metrics = self.update_metrics(rollout, stats, progress)
            if self.held_out_evaluation is not None and self.held_out_evaluation.due(update, args.num_total_batches):
                with self.phase("evaluation"):
                    metrics.update(self.evaluate_held_out())
                metrics["time/evaluation_s"] = self.phase_seconds.pop("evaluation")
            self.log(metrics)
            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
                self.generate_completions(sampling=True)  # TRL's sample table (console, W&B)
            if progress.nonfinite_in_a_row >= args.max_nonfinite_updates:
                self.callback_handler.on_train_end(args, self.state, self.control)  # closes the progress bar
                raise NonFiniteRunError(
                    f"{progress.nonfinite_in_a_row} updates in a row had a non-finite reward, advantage or loss; "
                    f"stopped. The last good checkpoint is {self.latest_checkpoint() or 'none'}"
                )
            preempted = self._any_process(stop.requested)
            if finite and (preempted or self._checkpoint_due(update)):
                self.save_checkpoint(progress)
            if preempted:
                self.callback_handler.on_train_end(args, self.state, self.control)
                accelerator.print(f"SIGTERM: stopped after update {update}; rerun the same command to resume")
                progress.preempted = True
                return progress
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return progress

    # -- one update ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, queries: torch.Tensor) -> Rollout:
        """Samples responses to `queries` [episodes, prompt_width] (left-padded) and scores them: log-probs of the
        policy and the reference, values, reward-model scores, per-token KL-shaped rewards and GAE advantages."""
        args, pad_id = self.args, self.processing_class.pad_token_id
        width = queries.shape[1]
        context = getattr(self.reward_model, "scoring_context", None)
        if context is not None:
            context.prompt_width, context.training = width, True
        generation_kwargs = {
            "max_new_tokens": args.response_length,
            "temperature": args.temperature + 1e-7,
            "top_k": 0.0,
            "top_p": 1.0,
            "do_sample": True,
        }
        with self.phase("generation"), unwrap_model_for_generation(
            self.model, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=generation_kwargs,
        ) as unwrapped:  # fmt: skip
            # The sampler's logits are dropped at once: log-probs come from the forward below.
            query_responses = batch_generation(
                unwrapped.policy, queries, args.local_rollout_forward_batch_size, pad_id,
                GenerationConfig(**generation_kwargs),
            )[0]  # fmt: skip
        parts = {key: [] for key in ("logprobs", "ref_logprobs", "values", "scores", "lengths", "ended")}
        step = args.local_rollout_forward_batch_size
        with self.phase("scoring"):
            for start in range(0, len(queries), step):
                query_response = query_responses[start : start + step]
                response = query_response[:, width:]
                # The rollout's log-probs come from the forward that training repeats (not from the sampler's
                # logits, computed another way): the first PPO step starts at a ratio of exactly 1.
                logits, values = self.model(query_response, pad_id, response.shape[1])
                parts["logprobs"].append(selective_log_softmax(self._scaled(logits), response))
                parts["values"].append(values)
                parts["ref_logprobs"].append(self._reference_logprobs(query_response, response))
                # Scored as the text ends at the stop token; trained on as sampled (tokens after it are masked).
                if self.stop_token_id is not None:
                    response = truncate_response(self.stop_token_id, pad_id, response)
                parts["ended"].append((response == self.processing_class.eos_token_id).any(-1))
                parts["lengths"].append(first_true_indices(response == pad_id) - 1)
                scored = torch.cat((queries[start : start + step], response), 1)
                parts["scores"].append(get_reward(self.reward_model, scored, pad_id, width)[1])
        logprobs, ref_logprobs, values, scores, lengths, ended = (
            torch.cat(parts[k]) for k in ("logprobs", "ref_logprobs", "values", "scores", "lengths", "ended")
        )
        if self.args.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - self.args.missing_eos_penalty)
        return self._shape_rewards(query_responses, width, logprobs, ref_logprobs, values, scores, lengths)

    def _reference_logprobs(self, query_response: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """Log-probs of `response` [episodes, response_len] under the reference at the sampling temperature."""
        inputs = model_inputs(query_response, self.processing_class.pad_token_id, response.shape[1])
        if self.ref_model is None:
            with self.null_ref_context():
                logits = self.model.policy(**inputs).logits[:, :-1]
        else:
            logits = self.ref_model(**inputs).logits[:, :-1]
        return selective_log_softmax(self._scaled(logits), response)

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """The held-out evaluation of the current policy against the reference (the policy with its adapter
        disabled, or the separate reference model). Every process runs it (sampling under ZeRO-3 needs all of them);
        the training's random streams are left as they were."""
        policy = self.accelerator.unwrap_model(self.model).policy
        reference = self.ref_model if self.ref_model is not None else AdapterDisabled(policy, self.null_ref_context)
        self.model.eval()
        with torch.random.fork_rng(devices=[]), unwrap_model_for_generation(
            self.model, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ):  # fmt: skip
            results = self.held_out_evaluation(policy, reference)
        self.model.train()
        return results

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at the sampling temperature, in fp32 whatever the model's dtype (log-softmax needs the range)."""
        return logits.float() / (self.args.temperature + 1e-7)

    @contextmanager
    def phase(self, name: str):
        """Adds the wall time of the block to `phase_seconds[name]` (logged per update as `time/<name>`)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - started

    def _shape_rewards(self, query_responses, width, logprobs, ref_logprobs, values, scores, lengths) -> Rollout:
        """TRL's reward shaping and GAE: the score at each response's last token, −kl_coef × KL at every token,
        advantages by GAE(γ, λ) on the value estimates, whitened over the rollout. `lengths` [episodes]: index of
        each response's last token."""
        args = self.args
        responses = query_responses[:, width:]
        positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
        padding_mask = positions > lengths.unsqueeze(1)
        padding_mask_p1 = positions > (lengths + 1).unsqueeze(1)
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        values = values.masked_fill(padding_mask_p1, 0)
        log_ratio = ref_logprobs - logprobs
        kl = -log_ratio if args.kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        last = torch.where(lengths + 1 < rewards.shape[1], lengths + 1, lengths)
        rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0)
        advantages = torch.zeros_like(rewards)
        running = torch.zeros(len(rewards), device=rewards.device)
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            delta = rewards[:, t] + args.gamma * next_value - values[:, t]
            running = delta + args.gamma * args.lam * running
            advantages[:, t] = running
        returns = advantages + values
        advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)
        return Rollout(
            query_responses=query_responses, responses=responses, prompt_width=width, logprobs=logprobs,
            values=values, advantages=advantages, returns=returns, padding_mask=padding_mask,
            padding_mask_p1=padding_mask_p1, scores=scores, kl=kl, non_score_reward=non_score_reward,
        )  # fmt: skip

    def optimise(self, rollout: Rollout) -> dict[str, torch.Tensor] | None:
        """`num_ppo_epochs` passes over the rollout in shuffled mini-batches of micro-batches: PPO's clipped policy
        loss plus `vf_coef` × the clipped value loss. Returns the per-step statistics [epochs, mini-batches,
        micro-batches], or None (and no further optimiser step) at the first non-finite loss on any process."""
        args, accelerator = self.args, self.accelerator
        shape = (args.num_ppo_epochs, args.num_mini_batches, args.gradient_accumulation_steps)
        stats = {name: torch.zeros(shape, device=accelerator.device) for name in STAT_NAMES}
        pad_id, response_width = self.processing_class.pad_token_id, rollout.responses.shape[1]
        for epoch in range(args.num_ppo_epochs):
            order = np.random.permutation(args.local_batch_size)
            for mini, mini_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
                mini_batch = order[mini_start : mini_start + args.local_mini_batch_size]
                for micro, micro_start in enumerate(range(0, len(mini_batch), args.per_device_train_batch_size)):
                    index = mini_batch[micro_start : micro_start + args.per_device_train_batch_size]
                    with accelerator.accumulate(self.model):
                        logits, values = self.model(rollout.query_responses[index], pad_id, response_width)
                        losses = ppo_losses(args, rollout, index, self._scaled(logits), values)
                        if not self._all_processes(bool(torch.isfinite(losses["loss"]))):
                            self.optimizer.zero_grad()
                            return None
                        accelerator.backward(losses["loss"])
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for name in STAT_NAMES:
                        stats[name][epoch, mini, micro] = losses[name].detach()
        return stats

    def update_metrics(self, rollout: Rollout, stats: dict | None, progress: RunProgress) -> dict[str, float]:
        """TRL's metrics for one update (same names), averaged over processes, plus the kit's skip counter."""
        gather = lambda value: self.accelerator.gather_for_metrics(value).float().mean().item()  # noqa: E731
        response_mask = (~rollout.padding_mask).float()
        mean_non_score = rollout.non_score_reward.sum(1).mean()
        metrics = {
            # TRL rounds episodes/s down to an integer, which reads 0 on a CPU; the same name, unrounded.
            "eps": progress.episode / max(progress.elapsed_seconds, 1e-9),
            "objective/kl": gather(rollout.kl.sum(1).mean()),
            "objective/entropy": gather((-rollout.logprobs * response_mask).sum(1).mean()),
            "objective/non_score_reward": gather(mean_non_score),
            "objective/rlhf_reward": gather(mean_non_score + rollout.scores.mean()),
            "objective/scores": gather(rollout.scores.mean()),
        }
        if stats is not None:
            for name, key in STAT_METRICS.items():
                metrics[key] = gather(stats[name])
            metrics["val/ratio_var"] = self.accelerator.gather_for_metrics(stats["ratio"]).var().item()
        metrics["val/num_eos_tokens"] = (rollout.responses == self.processing_class.eos_token_id).sum().item()
        # Positions the sampler computed (rows that stopped early still take part until the last one stops).
        metrics["rollout/sampled_positions"] = rollout.responses.numel() * self.accelerator.num_processes
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = progress.episode
        metrics["nonfinite/skipped_updates"] = progress.skipped_nonfinite
        for name, seconds in self.phase_seconds.items():
            metrics[f"time/{name}_s"] = seconds
        self.phase_seconds = {}
        metrics["memory/peak_rss_gib"] = peak_rss_gib()
        return metrics

    # -- agreement between processes -----------------------------------------------------------------------------

    def _all_processes(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.accelerator.num_processes)

    def _any_process(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _checkpoint_due(self, update: int) -> bool:
        args = self.args
        if args.save_strategy != "steps" or update >= args.num_total_batches:
            return False
        every = math.ceil(args.num_total_batches * args.save_steps) if args.save_steps < 1 else int(args.save_steps)
        return update % max(every, 1) == 0

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters PPO trains (LoRA adapters or full weights of the policy, and the value model)."""
        model = self.accelerator.unwrap_model(self.model)
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, progress: RunProgress) -> Path:
        """Writes `output_dir/checkpoints/update-NNNNNN` through a hidden staging folder renamed into place once
        complete (`progress.json` last), then keeps the newest `save_total_limit`. Refuses non-finite weights."""
        accelerator = self.accelerator
        root = Path(self.args.output_dir) / CHECKPOINTS_DIR
        final = root / f"{CHECKPOINT_PREFIX}{progress.update:06d}"
        staging = root / f".partial-{final.name}"
        weights = self._trainable_state()
        if not all(bool(torch.isfinite(w).all()) for w in weights.values()):
            raise NonFiniteRunError(f"non-finite weights after update {progress.update}: no checkpoint written")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, staging / "trainable.safetensors")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(random_states(), staging / f"rng_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress.wandb_run_id = progress.wandb_run_id or current_wandb_run_id()
            (staging / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in complete_checkpoints(self.args.output_dir)[: -self.args.save_total_limit or None]:
                shutil.rmtree(old)
            accelerator.print(f"checkpoint: {final}")
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> RunProgress:
        """Restores what `save_checkpoint` wrote into this trainer; returns the progress to continue from."""
        path = Path(path)
        if not (path / PROGRESS_FILE).is_file():
            raise RecipeError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {PROGRESS_FILE})")
        rng_file = path / f"rng_{self.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise RecipeError(f"resume_from_checkpoint: {path} was written by fewer processes; resume with as many")
        model = self.accelerator.unwrap_model(self.model)
        saved = load_file(path / "trainable.safetensors")
        missing = set(self._trainable_state()) - set(saved)
        if missing:
            raise RecipeError(f"resume_from_checkpoint: {path} lacks {len(missing)} trained tensors (another recipe?)")
        model.load_state_dict(saved, strict=False)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        set_random_states(torch.load(rng_file, weights_only=False))
        progress = RunProgress(**{**json.loads((path / PROGRESS_FILE).read_text()), "preempted": False})
        self.accelerator.print(f"resuming after update {progress.update} from {path}")
        return progress

    def latest_checkpoint(self) -> Path | None:
        found = complete_checkpoints(self.args.output_dir)
        return found[-1] if found else None

    def save_outputs(self, output_dir: str | Path) -> None:
        """Saves the policy (LoRA adapter or full weights) with its tokenizer to `output_dir` and the value model
        to `output_dir/value_model`. Every process must call it (the trainer gathers sharded weights)."""
        output_dir = Path(output_dir)
        self.save_model(str(output_dir))
        if self.accelerator.is_main_process:
            value_model = self.accelerator.unwrap_model(self.model).value_model
            value_model.save_pretrained(output_dir / "value_model")
            if isinstance(value_model, PreTrainedModel):  # a value head alone has no tokenizer of its own
                self.processing_class.save_pretrained(output_dir / "value_model")
        self.accelerator.wait_for_everyone()


class PromptWidthRecorder:
    """Iterates a dataloader and, as it hands out each batch, records the batch's prompt width
    (`input_ids.shape[1]`) and whether it is a training batch in `context` (`reward_models.sources.ScoringContext`).
    Anything else is the wrapped dataloader's."""

    def __init__(self, dataloader, context, training: bool):
        self.dataloader = dataloader
        self.context = context
        self.training = training

    def __iter__(self):
        for batch in self.dataloader:
            self.context.prompt_width = batch["input_ids"].shape[1]
            self.context.training = self.training
            yield batch

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)

def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; folders cut short (no progress file) are ignored."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / PROGRESS_FILE).is_file())


def random_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def current_wandb_run_id() -> str | None:
    wandb = sys.modules.get("wandb")
    return wandb.run.id if wandb is not None and wandb.run is not None else None


class PreemptionFlag:
    """Set by SIGTERM (the usual preemption notice): the loop checkpoints at the end of the update and stops."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class NonFiniteRunError(RecipeError):
    """The run stopped because of non-finite values; the last good checkpoint is intact."""


STAT_NAMES = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
STAT_METRICS = {
    "approxkl": "policy/approxkl_avg",
    "pg_clipfrac": "policy/clipfrac_avg",
    "pg_loss": "loss/policy_avg",
    "vf_loss": "loss/value_avg",
    "vf_clipfrac": "val/clipfrac_avg",
    "entropy": "policy/entropy_avg",
    "ratio": "val/ratio",
}


def ppo_losses(args, rollout: Rollout, index, logits: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate and clipped value losses on the micro-batch `index` of `rollout`, from the policy's
    temperature-scaled `logits` [micro, response_len, vocab] and the value head's `values` [micro, response_len]."""
    padding, padding_p1 = rollout.padding_mask[index], rollout.padding_mask_p1[index]
    old_values, returns, advantages = rollout.values[index], rollout.returns[index], rollout.advantages[index]
    new_logprobs = selective_log_softmax(logits, rollout.responses[index]).masked_fill(padding, INVALID_LOGPROB)
    values = values.masked_fill(padding_p1, 0)
    clipped_values = torch.clamp(values, old_values - args.cliprange_value, old_values + args.cliprange_value)
    value_losses = torch.square(values - returns)
    clipped_value_losses = torch.square(clipped_values - returns)
    vf_loss = 0.5 * masked_mean(torch.max(value_losses, clipped_value_losses), ~padding_p1)
    log_ratio = new_logprobs - rollout.logprobs[index]
    ratio = torch.exp(log_ratio)
    policy_losses = -advantages * ratio
    clipped_policy_losses = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = masked_mean(torch.max(policy_losses, clipped_policy_losses), ~padding)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
        stats = {
            "approxkl": 0.5 * (log_ratio**2).mean(),
            "pg_clipfrac": masked_mean((clipped_policy_losses > policy_losses).float(), ~padding),
            "vf_clipfrac": masked_mean((clipped_value_losses > value_losses).float(), ~padding_p1),
            "entropy": entropy.mean(),
            "ratio": ratio.mean(),
        }
    return {"loss": pg_loss + args.vf_coef * vf_loss, "pg_loss": pg_loss, "vf_loss": vf_loss, **stats}
