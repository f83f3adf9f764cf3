"""Unit tests of recipes/ppo/core.py: each function against numbers worked out by hand (the arithmetic is in the
comments) or computed independently (a plain Python loop, numpy, torch.distributions, an exact expectation).

Conventions used throughout: STOP = 2 is the stop token, PAD = 0 the padding token, ε = 0.2 the clip range.
"""

import math

import numpy as np
import pytest
import torch

from recipes.ppo import core

STOP, PAD = 2, 0
T, F = True, False


def close(actual, expected, tol=1e-6):
    """True when every element of `actual` is within `tol` of `expected`."""
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)  # fmt: skip


# -- responses ----------------------------------------------------------------------------------------------------


def test_first_true_index_is_the_width_when_a_row_has_none():
    flags = torch.tensor([[F, T, F, T], [F, F, F, F], [T, F, F, F]])
    index = core.first_true_index(flags)
    assert index.dtype == torch.long
    assert index.tolist() == [1, 4, 0]


def test_cut_after_stop_keeps_the_first_stop_and_pads_the_rest():
    responses = torch.tensor([[5, STOP, 7, STOP],  # a second stop after the first is padded too
                              [STOP, 3, 4, 5],     # stop at position 0: a one-token response
                              [5, 6, 7, 8]])       # no stop: fills all T positions  # fmt: skip
    cut = core.cut_after_stop(responses, STOP, PAD)
    assert cut.tolist() == [[5, STOP, PAD, PAD], [STOP, PAD, PAD, PAD], [5, 6, 7, 8]]
    assert responses[0].tolist() == [5, STOP, 7, STOP], "the input must not be modified"


def test_cut_after_stop_without_a_stop_token_changes_nothing():
    responses = torch.tensor([[5, STOP, 7, STOP], [STOP, 3, 4, 5]])
    assert torch.equal(core.cut_after_stop(responses, None, PAD), responses)


def test_last_token_index_is_before_the_first_padding():
    scored = torch.tensor([[5, STOP, PAD, PAD], [STOP, PAD, PAD, PAD], [5, 6, 7, 8], [PAD, PAD, PAD, PAD]])
    # 1: stop at 1 is the last token; 0: stop at position 0; 3 = T − 1: full; −1: empty
    assert core.last_token_index(scored, PAD).tolist() == [1, 0, 3, -1]


def test_padding_masks_for_short_full_empty_and_one_token_responses():
    padding, after_next = core.padding_masks(torch.tensor([1, 3, -1, 0]), 4)
    assert padding.tolist() == [[F, F, T, T],   # last token at 1
                                [F, F, F, F],   # fills all 4 positions
                                [T, T, T, T],   # empty
                                [F, T, T, T]]   # one token  # fmt: skip
    # one position later: the position after the last token keeps its value (it carries the score)
    assert after_next.tolist() == [[F, F, F, T],
                                   [F, F, F, F],  # a full response: no True at all
                                   [F, T, T, T],
                                   [F, F, T, T]]  # fmt: skip


# -- log-probabilities, KL and entropy ----------------------------------------------------------------------------


def test_token_logprobs_by_hand_and_against_log_softmax():
    # logits [0, ln 3] → softmax [1/4, 3/4]: log p(token 1) = ln 0.75, log p(token 0) = ln 0.25
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert close(core.token_logprobs(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.25)]])

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=generator) * 3
    tokens = torch.randint(0, 7, (2, 4), generator=generator)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert close(core.token_logprobs(logits, tokens), expected, 1e-5)

    half = core.token_logprobs(logits.bfloat16(), tokens)
    assert half.dtype == torch.float32
    expected = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert close(half, expected, 1e-5)


def test_kl_estimators_by_hand_and_both_zero_at_padding():
    logprobs = torch.tensor([[math.log(0.5), core.MASKED_LOGPROB]])
    ref_logprobs = torch.tensor([[math.log(0.25), core.MASKED_LOGPROB]])
    # r = 0.25 / 0.5 = 0.5: k1 = −ln 0.5 = ln 2 ≈ 0.6931; k3 = (0.5 − 1) − ln 0.5 = ln 2 − 0.5 ≈ 0.1931
    assert close(core.kl_per_token(logprobs, ref_logprobs, "k1"), [[math.log(2), 0.0]])
    assert close(core.kl_per_token(logprobs, ref_logprobs, "k3"), [[math.log(2) - 0.5, 0.0]])


def test_kl_estimators_expectation_is_the_true_kl_of_a_two_token_distribution():
    policy, reference = [0.7, 0.3], [0.4, 0.6]
    true_kl = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)  # KL(policy ‖ reference) ≈ 0.1838
    logprobs = torch.tensor([[math.log(p) for p in policy]])  # one "episode" per outcome: token 0, token 1
    ref_logprobs = torch.tensor([[math.log(q) for q in reference]])
    for estimator in ("k1", "k3"):
        per_outcome = core.kl_per_token(logprobs, ref_logprobs, estimator)[0].tolist()
        expectation = sum(p * kl for p, kl in zip(policy, per_outcome))  # E over tokens drawn from the policy
        assert math.isclose(expectation, true_kl, abs_tol=1e-6), estimator
    k1 = core.kl_per_token(logprobs, ref_logprobs, "k1")[0]
    k3 = core.kl_per_token(logprobs, ref_logprobs, "k3")[0]
    assert k1[1] < 0, "k1 is negative where the reference likes the token more (−ln 2 here)"
    assert (k3 >= 0).all()


def test_kl_per_token_refuses_an_unknown_estimator():
    with pytest.raises(ValueError, match="'k2'"):
        core.kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k2")


def test_entropy_from_logits():
    assert close(core.entropy_from_logits(torch.zeros(1, 4)), [math.log(4)])  # uniform over 4 tokens: ln 4
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert close(core.entropy_from_logits(logits), expected, 1e-5)
    assert core.entropy_from_logits(logits.bfloat16()).dtype == torch.float32


# -- masked statistics ---------------------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, 1000.0, 1000.0], [5.0, -1000.0, 1000.0, 1000.0]])  # padding holds nonsense
KEEP = torch.tensor([[T, T, F, F], [T, F, F, F]])


def test_masked_mean_ignores_padding():
    assert close(core.masked_mean(VALUES, KEEP), 8 / 3)  # (1 + 2 + 5) / 3


def test_masked_var_is_bessel_corrected():
    # mean 8/3, deviations −5/3, −2/3, 7/3 → squares sum to (25 + 4 + 49) / 9 = 78/9; / (3 − 1) = 13/3
    assert close(core.masked_var(VALUES, KEEP), 13 / 3)
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    assert close(core.masked_var(values, keep), np.var(values[keep].numpy(), ddof=1), 1e-5)


@pytest.mark.parametrize("kept", [0, 1])
def test_masked_var_refuses_fewer_than_two_values(kept):
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep.view(-1)[:kept] = True
    with pytest.raises(ValueError, match="fewer than two"):
        core.masked_var(torch.ones(2, 4), keep)


def test_whiten_over_kept_positions_with_and_without_shifting_the_mean():
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(2, 6, generator=generator) * 5 + 3
    keep = torch.tensor([[T, T, T, T, F, F], [T, T, F, F, F, F]])
    whitened = core.whiten(values, keep)
    assert abs(whitened[keep].mean().item()) < 1e-5
    assert math.isclose(np.var(whitened[keep].numpy(), ddof=1), 1.0, abs_tol=1e-5)

    scaled = core.whiten(values, keep, shift_mean=False)
    assert math.isclose(scaled[keep].mean().item(), values[keep].mean().item(), abs_tol=1e-5)  # the mean is kept
    assert math.isclose(np.var(scaled[keep].numpy(), ddof=1), 1.0, abs_tol=1e-5)  # only the scale changes

    other_padding = values.masked_fill(~keep, 1e6)
    assert close(core.whiten(other_padding, keep)[keep], whitened[keep], 1e-5), "padding must not move statistics"


# -- rewards and advantages ----------------------------------------------------------------------------------------


def test_shape_rewards_puts_the_score_after_the_last_token():
    kl = torch.tensor([[0.2, 0.4, 0.6, 0.8]] * 4)
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    last_index = torch.tensor([1, 3, -1, 0])  # short, full, empty, one token
    rewards, non_score_reward = core.shape_rewards(scores, kl, 0.5, last_index)
    penalty = [-0.1, -0.2, -0.3, -0.4]  # −0.5 × KL
    assert close(non_score_reward, [penalty] * 4)
    assert close(rewards, [[-0.1, -0.2, -0.3 + 10, -0.4],   # last token 1: score at 2
                           [-0.1, -0.2, -0.3, -0.4 + 20],   # full: score stays at the last position, 3
                           [-0.1 + 30, -0.2, -0.3, -0.4],   # empty (−1): score at 0
                           [-0.1, -0.2 + 40, -0.3, -0.4]])  # one token at 0: score at 1  # fmt: skip


def gae_by_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One episode's GAE written the textbook way, on plain floats."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_generalized_advantages_by_hand():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = core.generalized_advantages(rewards, values, gamma=0.5, lam=0.5)
    # δ2 = 2 + 0.5·0 − 1.5 = 0.5;      A2 = 0.5
    # δ1 = 0 + 0.5·1.5 − 1.0 = −0.25;  A1 = −0.25 + 0.25·0.5 = −0.125
    # δ0 = 1 + 0.5·1.0 − 0.5 = 1.0;    A0 = 1.0 + 0.25·(−0.125) = 0.96875
    assert close(advantages, [[0.96875, -0.125, 0.5]])
    assert close(returns, [[1.46875, 0.875, 2.0]])  # A + V


def test_generalized_advantages_against_a_loop_per_episode():
    rewards = [[0.1, -0.2, 0.0, 1.5, 0.0], [-0.3, 0.4, 2.0, 0.0, 0.0]]
    values = [[0.2, 0.5, -0.1, 0.7, 0.3], [1.0, -0.4, 0.6, 0.0, 0.0]]
    advantages, returns = core.generalized_advantages(torch.tensor(rewards), torch.tensor(values), 0.99, 0.95)
    for episode in range(2):
        expected = gae_by_loop(rewards[episode], values[episode], 0.99, 0.95)
        assert close(advantages[episode], expected, 1e-5)
        assert close(returns[episode], [a + v for a, v in zip(expected, values[episode])], 1e-5)
    # λ = 1: the return is the discounted sum of rewards to the end, whatever the values
    _, returns = core.generalized_advantages(torch.tensor(rewards), torch.tensor(values), 0.9, 1.0)
    assert close(returns[1], [-0.3 + 0.9 * 0.4 + 0.81 * 2.0, 0.4 + 0.9 * 2.0, 2.0, 0.0, 0.0], 1e-5)


# -- losses --------------------------------------------------------------------------------------------------------


def policy_inputs(ratios: list[list[float | None]], old_logprob: float = -1.0):
    """(logprobs, old_logprobs, keep) giving these ratios ρ; None marks padding (MASKED_LOGPROB on both sides)."""
    old = torch.tensor([[core.MASKED_LOGPROB if r is None else old_logprob for r in row] for row in ratios])
    new = torch.tensor([[core.MASKED_LOGPROB if r is None else old_logprob + math.log(r) for r in row]
                        for row in ratios])  # fmt: skip
    return new, old, torch.tensor([[r is not None for r in row] for row in ratios])


def test_clipped_policy_loss_by_hand():
    logprobs, old_logprobs, keep = policy_inputs([[1.5, 0.5, 0.5, None], [1.5, 1.1, None, None]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, 0.0], [-1.0, 2.0, 0.0, 0.0]])
    logprobs.requires_grad_(True)
    out = core.clipped_policy_loss(logprobs, old_logprobs, advantages, keep, cliprange=0.2)
    # per kept token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    #   ρ 1.5, A +1: max(−1.5, −1.2) = −1.2   clip binds (no credit for pushing ρ above 1 + ε)
    #   ρ 0.5, A −1: max( 0.5,  0.8) =  0.8   clip binds (no credit for pushing ρ below 1 − ε)
    #   ρ 0.5, A +1: max(−0.5, −0.8) = −0.5   the pessimistic side is the unclipped one
    #   ρ 1.5, A −1: max( 1.5,  1.2) =  1.5   likewise
    #   ρ 1.1, A +2: max(−2.2, −2.2) = −2.2   inside the range
    # loss = (−1.2 + 0.8 − 0.5 + 1.5 − 2.2) / 5 = −1.6 / 5 = −0.32; clipfrac = 2 / 5
    assert close(out["loss"], -0.32)
    assert close(out["clipfrac"], 0.4)
    # over all 8 positions, padding at ρ = 1 exactly: (1.5 + 0.5 + 0.5 + 1 + 1.5 + 1.1 + 1 + 1) / 8 = 8.1 / 8
    assert close(out["ratio"], 1.0125)
    log_sq = 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2
    assert close(out["approxkl"], 0.5 * log_sq / 8)

    # where the clip binds the gradient is zero; elsewhere d(−A·ρ)/d log p / 5 = −A·ρ / 5
    out["loss"].backward()
    assert close(logprobs.grad, [[0.0, 0.0, -0.1, 0.0], [0.3, -0.44, 0.0, 0.0]])
    assert not out["clipfrac"].requires_grad and not out["approxkl"].requires_grad


def test_clipped_policy_loss_at_the_first_step_has_ratio_exactly_one():
    logprobs, old_logprobs, keep = policy_inputs([[1.0, 1.0, None, None], [1.0, None, None, None]])
    out = core.clipped_policy_loss(logprobs, old_logprobs, torch.tensor([[1.0, -2.0, 0.0, 0.0]] * 2), keep, 0.2)
    assert out["ratio"].item() == 1.0 and out["approxkl"].item() == 0.0 and out["clipfrac"].item() == 0.0
    assert close(out["loss"], -(1.0 - 2.0 + 1.0) / 3)  # −mean(A) over kept tokens


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 1.0, 0.0, 100.0]])
    old_values = torch.tensor([[0.5, 0.9, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    keep = torch.tensor([[T, T, T, F]])
    out = core.clipped_value_loss(values, old_values, returns, keep, cliprange_value=0.2)
    # V 1.0, V_old 0.5, R 1.0: clip → 0.7; errors 0 and 0.09 → 0.09  (the clipped error is the larger)
    # V 1.0, V_old 0.9, R 0.0: clip → 1.0; errors 1 and 1     → 1
    # V 0.0, V_old 1.0, R 2.0: clip → 0.8; errors 4 and 1.44  → 4
    # padding (V = 100) is not counted: loss = ½ · (0.09 + 1 + 4) / 3 = 0.848333…
    assert close(out["loss"], 0.5 * 5.09 / 3)
    assert close(out["clipfrac"], 1 / 3)
