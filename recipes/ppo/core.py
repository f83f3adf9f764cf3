"""PPO's mathematics for language models, as pure functions on tensors: no models, no processes, no state.

Shapes: B episodes (prompt + sampled response each), T response positions. Log-probabilities, KL values and
entropies are in nats; rewards and values in the reward model's units. Masks are boolean: True marks padding,
i.e. the positions after a response's last token (`padding`), or after the position that follows it
(`padding_after_next`, where a value is still learnt: see `shape_rewards`).

These are the same computations, with the same numbers, as TRL 1.12's PPOTrainer (checked by tests/test_fidelity.py
against figures recorded from TRL itself): the kit keeps TRL's config fields and metric names, and a run logged
with either reads the same.
"""

import torch

MASKED_LOGPROB = 1.0
"""What log-prob tensors hold at padding positions. Not a real log-probability (those are ≤ 0), so a masking bug
shows up; a ratio of two of them is exactly 1 and their KL is 0."""


# -- responses ----------------------------------------------------------------------------------------------------


def first_true_index(flags: torch.Tensor) -> torch.Tensor:
    """Per row of `flags` [B, T] (bool), the index of its first True, or T when it has none: [B] long."""
    width = flags.shape[-1]
    positions = torch.arange(width, device=flags.device).expand_as(flags)
    return torch.where(flags, positions, width).min(-1).values


def cut_after_stop(responses: torch.Tensor, stop_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """The responses [B, T] as scored: every token after the first `stop_token_id` (which is kept) replaced by
    `pad_token_id`. With no stop token, unchanged."""
    if stop_token_id is None:
        return responses
    stops = responses == stop_token_id
    after_stop = stops.cumsum(-1) - stops.long() > 0
    return responses.masked_fill(after_stop, pad_token_id)


def last_token_index(scored_responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of each response's last token [B]: the position before its first padding (−1 for an empty one)."""
    return first_true_index(scored_responses == pad_token_id) - 1


def padding_masks(last_index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padding, padding_after_next) [B, width] for responses whose last tokens are at `last_index` [B]:
    `padding` is True after the last token; `padding_after_next` one position later, since the value of the
    position after the last token is learnt too (it carries the score: `shape_rewards`)."""
    positions = torch.arange(width, device=last_index.device).expand(len(last_index), width)
    return positions > last_index[:, None], positions > last_index[:, None] + 1


# -- log-probabilities and KL -------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: logits [B, T, V] (any float dtype, computed in fp32),
    tokens [B, T] → [B, T] fp32. Gathers before normalising, so no [B, T, V] log-softmax is kept alive."""
    logits = logits.float()
    taken = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return taken - torch.logsumexp(logits, dim=-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) on tokens sampled from the policy [B, T], nats.

    With r = p_ref / p_policy of the sampled token: 'k1' = −log r (unbiased, negative for some tokens), 'k3' =
    (r − 1) − log r (unbiased, never negative, lower variance; J. Schulman, "Approximating KL divergence")."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', not {estimator!r}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: [..., V] → [...], nats, computed in fp32."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# -- masked statistics ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `keep` is True (a scalar); 0 when nothing is kept (a micro-batch of responses that
    ended at their first token contributes no policy loss, rather than a NaN that would void the update)."""
    return (values * keep).sum() / keep.sum().clamp(min=1)


def masked_var(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of `values` where `keep` is True. Needs at least two kept values."""
    count = keep.sum()
    if count < 2:
        raise ValueError("masked_var: fewer than two values to take a variance of (a mini-batch of one token?)")
    centred = values - masked_mean(values, keep)
    return masked_mean(centred**2, keep) * count / (count - 1)


def whiten(values: torch.Tensor, keep: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean) / sqrt(var + 1e-8) over the kept positions; with `shift_mean=False` the mean is added back
    (only the scale changes). Statistics over all kept positions of all rows."""
    mean, var = masked_mean(values, keep), masked_var(values, keep)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# -- rewards and advantages ----------------------------------------------------------------------------------------


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, last_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: −kl_coef × KL at every position (the KL penalty, returned alone as the
    `non_score_reward` [B, T]), plus each episode's score [B] at the position after its last token, or at the last
    token when the response fills all T positions. The score sits one step late because the value of that position
    is learnt too (`padding_masks`): the last token's advantage still sees it through γλ."""
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    width = rewards.shape[1]
    score_at = torch.where(last_index + 1 < width, last_index + 1, last_index)
    rewards[torch.arange(len(rewards), device=rewards.device), score_at] += scores
    return rewards, non_score_reward


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) over the T positions of each response (Schulman et al. 2016): δ_t = r_t + γ V_{t+1} − V_t with
    V_T = 0, A_t = δ_t + γλ A_{t+1}. Returns (advantages, returns = advantages + values), both [B, T]."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


# -- losses --------------------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, keep: torch.Tensor, cliprange: float
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate, to minimise: mean over kept tokens of max(−A·ρ, −A·clip(ρ, 1 ± ε)), ρ = p / p_old.
    Inputs [B, T]; `keep` marks response tokens. Returns the loss and, detached: the share of kept tokens where the
    clip was active (`clipfrac`), mean ρ and ½·mean (log ρ)² (`approxkl`), both over all positions (padding holds
    ρ = 1 exactly, `MASKED_LOGPROB`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), keep)
    with torch.no_grad():
        return {
            "loss": loss,
            "clipfrac": masked_mean((clipped > unclipped).float(), keep),
            "ratio": ratio.mean(),
            "approxkl": 0.5 * (log_ratio**2).mean(),
        }


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, keep: torch.Tensor, cliprange_value: float
) -> dict[str, torch.Tensor]:
    """PPO's clipped value loss: ½ · mean over kept positions of max((V − R)², (clip(V, V_old ± ε) − R)²).
    Inputs [B, T]; `keep` marks the positions whose values are learnt. Returns the loss and the share of kept
    positions where the clipped error was the larger (`clipfrac`, detached)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = torch.square(values - returns)
    clipped_error = torch.square(clipped_values - returns)
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), keep)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), keep)
    return {"loss": loss, "clipfrac": clipfrac}
