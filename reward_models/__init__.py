"""Reward sources for the PPO recipes: gold reward functions, preference data labelled by them, and trained
reward models (sequence classifiers with one score).

    from reward_models import gold_reward
    scores = gold_reward("sentiment")(prompts, completions)   # one float per completion

    python scripts/build_preferences.py --config configs/smollm2-135m/reward.yaml   # reward_models.preferences
    accelerate launch scripts/train_reward.py --config configs/smollm2-135m/reward.yaml   # reward_models.training
"""

from pathlib import Path

from reward_models.gold import GOLD_REWARDS, GoldReward, gold_reward, sentiment

DEFAULT_REWARD_RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m" / "reward.yaml")

__all__ = ["DEFAULT_REWARD_RECIPE", "GOLD_REWARDS", "GoldReward", "gold_reward", "sentiment"]
